//! `netkit serve`: binds every front door that is not `off`, runs the services
//! together, and shuts them all down on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::cli::Listen;
use crate::service::Service;
use crate::tcp;
use crate::udp;

/// Command-line options of `netkit serve`: one flag per front door, each an address or `off`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HTTP: web app, /ws chat WebSocket, JSON API, /metrics.
    #[arg(long, default_value = "127.0.0.1:8080", env = "NETKIT_HTTP")]
    pub http: Listen,
    /// TCP line chat (`nc HOST PORT`).
    #[arg(long, default_value = "127.0.0.1:8330", env = "NETKIT_CHAT")]
    pub chat: Listen,
    /// TCP `rand` service.
    #[arg(long, default_value = "127.0.0.1:8001", env = "NETKIT_TCP")]
    pub tcp: Listen,
    /// UDP echo service.
    #[arg(long, default_value = "127.0.0.1:8002", env = "NETKIT_UDP")]
    pub udp: Listen,
    /// File drop: a `netkit recv` receiver storing into `<data-dir>/files`.
    #[arg(long, default_value = "127.0.0.1:8331", env = "NETKIT_DROP")]
    pub drop: Listen,
    /// Transfer relay where `netkit send` and `netkit recv CODE` meet.
    #[arg(long, default_value = crate::transfer::relay::DEFAULT_ADDR, env = "NETKIT_RELAY")]
    pub relay: Listen,
    /// Where state lives.
    #[arg(long, default_value = "./netkit-data", env = "NETKIT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Largest datagram the UDP service takes; larger ones are reported and dropped.
    #[arg(long, default_value = "64KiB", value_parser = crate::cli::parse_size, env = "NETKIT_UDP_MAX_DATAGRAM")]
    pub udp_max_datagram: u64,
    /// Limits of the file drop.
    #[command(flatten)]
    pub drop_limits: crate::transfer::recv::DropArgs,
    /// Limits of the transfer relay.
    #[command(flatten)]
    pub relay_limits: crate::transfer::relay::RelayLimitArgs,
    /// Limits of the TCP service.
    #[command(flatten)]
    pub tcp_limits: tcp::server::LimitArgs,
    /// Limits of the chat hub and its clients.
    #[command(flatten)]
    pub chat_limits: crate::chat::ChatLimitArgs,
    /// Chat accounts and application tokens.
    #[command(flatten)]
    pub chat_auth: crate::chat::auth::ChatAuthArgs,
    /// Chat moderation (admins) and abuse limits.
    #[command(flatten)]
    pub chat_moderation: crate::chat::moderation::ChatModerationArgs,
    /// Limits of the HTTP server.
    #[command(flatten)]
    pub http_limits: crate::http::HttpArgs,
    /// Limits and policy of files shared in chat rooms.
    #[command(flatten)]
    pub file_limits: crate::chat::files::FileArgs,
    /// Gossip cluster membership.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// Room messages through NATS JetStream (broker mode).
    #[command(flatten)]
    pub broker: crate::cluster::broker::BrokerArgs,
    /// TLS on the HTTP and chat doors.
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
    /// A generated certificate instead of --tls-cert/--tls-key.
    #[command(flatten)]
    pub tls_self_signed: crate::tls::SelfSignedArgs,
    /// Connections per address on each door.
    #[command(flatten)]
    pub per_ip: crate::net::limit::PerIpArgs,
}

/// Runs `netkit serve` until SIGINT or SIGTERM.
pub async fn run_command(args: ServeArgs) -> anyhow::Result<()> {
    run(args, crate::shutdown::on_signal()).await
}

/// Binds every enabled front door, then serves until `shutdown` is cancelled.
/// Binding happens first, so a taken port fails the whole command before
/// anything is served.
pub async fn run(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.broker.broker.is_some() && args.cluster.enabled() {
        anyhow::bail!(
            "--broker replaces the gossip cluster: hubs find each other through the message \
             broker, and gossip would relay every room message a second time; drop --join and \
             --cluster-listen (see docs/cluster.md, \"Broker mode\")"
        );
    }
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data dir {}: {e} — pass --data-dir DIR",
            args.data_dir.display()
        )
    })?;
    let tracker = TaskTracker::new();

    let http_listener = match args.http.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--http").await?),
        None => None,
    };
    let chat_listener = match args.chat.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--chat").await?),
        None => None,
    };
    let tcp_listener = match args.tcp.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--tcp").await?),
        None => None,
    };
    let udp_socket = match args.udp.addr() {
        Some(a) => Some(crate::cli::bind_udp(a, "--udp").await?),
        None => None,
    };
    let drop_listener = match args.drop.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--drop").await?),
        None => None,
    };
    let relay_listener = match args.relay.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--relay").await?),
        None => None,
    };
    let cluster = crate::cluster::bind(&args.cluster).await?;
    let listen: Vec<&str> = [args.http.addr(), args.chat.addr()]
        .into_iter()
        .flatten()
        .collect();
    let tls = crate::tls::serve_acceptor(
        &args.tls,
        &args.tls_self_signed,
        &args.data_dir,
        &listen,
        &shutdown,
    )?;
    let per_ip = args.per_ip.max_conns_per_ip;
    // The recorder before the first connection, so early refusals are counted.
    let _ = crate::http::metrics::handle();
    let local = |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    // Announced once every door's task is running (below), not before the
    // hub is open: a client or a signal sent on the line meets a ready server.
    let ready = crate::ready::Ready {
        http: local(&http_listener),
        chat: local(&chat_listener),
        drop: local(&drop_listener),
        tcp: local(&tcp_listener),
        udp: udp_socket.as_ref().and_then(|s| s.local_addr().ok()),
        cluster: cluster.as_ref().map(|c| c.id.addr),
        recv: None,
        relay: local(&relay_listener),
    };

    // Gossiped to the other nodes, so they can point users at this one.
    let meta = crate::cluster::NodeMeta {
        http: local(&http_listener),
        chat: local(&chat_listener),
    };

    // The handle is what /api/cluster and the chat relay read.
    let membership = match cluster {
        Some(bound) => Some(crate::cluster::membership::spawn(
            bound,
            meta.clone(),
            shutdown.clone(),
            &tracker,
        )?),
        None => None,
    };
    let mut cluster_info = crate::cluster::ClusterInfo {
        name: args
            .cluster
            .node_name
            .clone()
            .unwrap_or_else(crate::cluster::host_name),
        meta,
        membership,
        remote_users: Default::default(),
        broker: None,
    };

    // The hub exists only if a chat front door is open.
    let mut hub_writer = None;
    // With a hub, the drop posts into its rooms (`netkit send --room`).
    let mut room_door: Option<Arc<dyn crate::transfer::recv::RoomDoor>> = None;
    if http_listener.is_some() || chat_listener.is_some() {
        let mut hub_config = args.chat_limits.hub_config();
        hub_config.auth = args.chat_auth.auth_config()?;
        hub_config.moderation = args.chat_moderation.config();
        let (hub, writer) = crate::chat::Hub::open(&args.data_dir, hub_config).map_err(|e| {
            anyhow::anyhow!(
                "{e} — check that --data-dir {} is writable",
                args.data_dir.display()
            )
        })?;
        hub_writer = Some(writer);
        // Before any client connects: room messages go through the stream.
        let meta = cluster_info.meta.clone();
        let broker =
            crate::cluster::broker::start(&args.broker, &hub, meta, shutdown.clone(), &tracker)
                .await?;
        // Then /api/cluster shows the hubs the engine shows.
        cluster_info.broker = broker.map(|b| b.hubs());
        // Rooms span the cluster: the relay carries messages between nodes.
        if let Some(membership) = &cluster_info.membership {
            // The relay reads the hub's store (the one message log) on a
            // connection of its own.
            let log = crate::chat::store::Store::open_in(&args.data_dir)?;
            // Before any client connects: local messages carry the origin.
            hub.set_origin(log.origin(&membership.view().me.name)?);
            tracker.spawn(crate::cluster::relay::run(
                hub.clone(),
                membership.clone(),
                log,
                cluster_info.remote_users.clone(),
                shutdown.clone(),
            ));
        }
        let conn = args.chat_limits.conn_config();
        let files = Arc::new(
            crate::chat::files::FileStore::open(&args.data_dir, args.file_limits.limits())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open the room files under {}: {e} — check that --data-dir is writable",
                        args.data_dir.join("rooms").display()
                    )
                })?,
        );
        if let Some(retention) = files.limits().retention {
            tracker.spawn(crate::chat::files::run_retention(
                files.clone(),
                args.data_dir.clone(),
                retention,
                shutdown.clone(),
            ));
        }
        room_door = Some(Arc::new(crate::chat::files::RoomDrop::new(
            hub.clone(),
            files.clone(),
            &files_base(&args.file_limits, ready.http, tls.is_some()),
        )));
        if let Some(listener) = http_listener {
            let mut config = crate::http::HttpConfig::new(&args.http_limits, conn.clone());
            if config.peer_tls.tls_ca.is_some() {
                // A CA file that cannot be read is a start-up error, not a
                // failed fetch later.
                if let Err(e) = config.peer_tls.config() {
                    anyhow::bail!("--cluster-tls-ca: {e:#}");
                }
            }
            let https = tls.as_ref().map(|t| t.with_alpn(&[b"http/1.1"]));
            config.door = crate::net::door::Door::new("http", https, per_ip);
            config.files = Some(files.clone());
            let (hub, shutdown) = (hub.clone(), shutdown.clone());
            let cluster = cluster_info.clone();
            tracker.spawn(async move {
                if let Err(e) =
                    crate::http::run(listener, hub, config, Some(cluster), shutdown).await
                {
                    tracing::error!("http: server failed: {e}");
                }
            });
        }
        if let Some(listener) = chat_listener {
            tracker.spawn(crate::chat::line::run(
                listener,
                hub.clone(),
                conn,
                crate::net::door::Door::new("chat", tls.clone(), per_ip),
                shutdown.clone(),
            ));
        }
        let stop = shutdown.clone();
        tracker.spawn(async move {
            stop.cancelled().await;
            hub.shutdown();
        });
    }
    if let Some(listener) = drop_listener {
        let files = args.data_dir.join("files");
        crate::transfer::recv::prepare_dir(&files)?;
        let mut config = args.drop_limits.config(files);
        config.code = drop_password(&args.drop_limits, &listener)?;
        config.rooms = room_door.take();
        tracker.spawn(crate::transfer::recv::run(
            listener,
            config,
            shutdown.clone(),
        ));
    }
    // It holds a Hub clone, which would keep the hub's writer from ending.
    drop(room_door);
    if let Some(listener) = tcp_listener {
        let config = tcp::server::Config {
            door: crate::net::door::Door::new("tcp", None, per_ip),
            ..tcp::server::Config::new(Service::Rand, &args.tcp_limits)
        };
        tracker.spawn(tcp::server::run(
            listener,
            config,
            Arc::new(tcp::server::Stats::default()),
            shutdown.clone(),
        ));
    }
    if let Some(socket) = udp_socket {
        tracker.spawn(udp::server::run(
            socket,
            Service::Echo,
            udp::server::buffer_size(args.udp_max_datagram),
            Arc::new(udp::server::Stats::default()),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = relay_listener {
        tracker.spawn(crate::transfer::relay::run(
            listener,
            args.relay_limits.config(),
            shutdown.clone(),
        ));
    }
    if tracker.is_empty() {
        anyhow::bail!("every service is off; enable at least one (e.g. --http 127.0.0.1:8080)");
    }
    crate::ready::announce(&ready);
    info!(data_dir = %args.data_dir.display(), "netkit serve: running; SIGINT or SIGTERM stops it");
    tracker.close();
    tracker.wait().await;
    if let Some(writer) = hub_writer {
        // Every Hub clone is gone with the tasks: the writer commits its last batch and ends.
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }
    info!("netkit serve: stopped");
    Ok(())
}

/// The base of download links in file messages the drop posts:
/// `--public-url`, else the HTTP door's bound address (loopback for an
/// unspecified one).
fn files_base(
    files: &crate::chat::files::FileArgs,
    http: Option<std::net::SocketAddr>,
    tls: bool,
) -> String {
    if let Some(url) = &files.public_url {
        return url.trim_end_matches('/').to_string();
    }
    crate::chat::files::door_url(http, tls)
}

/// The drop's password (`--drop-password-file`), and a warning when a drop
/// without one listens beyond loopback, where anyone can write into it.
fn drop_password(
    limits: &crate::transfer::recv::DropArgs,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<Option<crate::transfer::CodeAuth>> {
    use crate::transfer::{CodeAuth, pake::Role};
    match &limits.drop_password_file {
        Some(p) => Ok(Some(CodeAuth::read_password_file(Role::Receiver, p)?)),
        None => {
            if let Ok(a) = listener.local_addr()
                && !a.ip().is_loopback()
            {
                tracing::warn!(
                    "the file drop listens on {a} without a password: anyone who reaches it can write into it — pass --drop-password-file FILE"
                );
            }
            Ok(None)
        }
    }
}

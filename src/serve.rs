//! `netkit serve`: binds every front door that is not `off`, runs the services
//! together, and shuts them all down on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::cli::Listen;
use crate::tcp;
use crate::tcp::service::Service;
use crate::udp;

/// Command-line options of `netkit serve`: one flag per front door, each an address or `off`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TCP `rand` service.
    #[arg(long, default_value = "127.0.0.1:8001", env = "NETKIT_TCP")]
    pub tcp: Listen,
    /// UDP echo service.
    #[arg(long, default_value = "127.0.0.1:8002", env = "NETKIT_UDP")]
    pub udp: Listen,
    /// Where state lives.
    #[arg(long, default_value = "./netkit-data", env = "NETKIT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Limits of the TCP service.
    #[command(flatten)]
    pub tcp_limits: tcp::server::LimitArgs,
    /// Gossip cluster membership.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
}

/// Runs `netkit serve` until SIGINT or SIGTERM.
pub async fn run_command(args: ServeArgs) -> anyhow::Result<()> {
    run(args, crate::shutdown::on_signal()).await
}

/// Binds every enabled front door, then serves until `shutdown` is cancelled.
/// Binding happens first, so a taken port fails the whole command before
/// anything is served.
pub async fn run(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data dir {}: {e} — pass --data-dir DIR",
            args.data_dir.display()
        )
    })?;
    let tracker = TaskTracker::new();

    let tcp_listener = match args.tcp.addr() {
        Some(a) => Some(crate::cli::bind_tcp(a, "--tcp").await?),
        None => None,
    };
    let udp_socket = match args.udp.addr() {
        Some(a) => Some(crate::cli::bind_udp(a, "--udp").await?),
        None => None,
    };
    let cluster = crate::cluster::bind(&args.cluster).await?;

    if let Some(listener) = tcp_listener {
        let config = tcp::server::Config::new(Service::Rand, &args.tcp_limits);
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
            65_536,
            Arc::new(udp::server::Stats::default()),
            shutdown.clone(),
        ));
    }
    // The handle is what the chat relay will subscribe to.
    let _membership = match cluster {
        Some(bound) => Some(crate::cluster::membership::spawn(
            bound,
            crate::cluster::NodeMeta::default(),
            shutdown.clone(),
            &tracker,
        )?),
        None => None,
    };
    if tracker.is_empty() {
        anyhow::bail!("every service is off; enable at least one (e.g. --tcp 127.0.0.1:8001)");
    }
    info!(data_dir = %args.data_dir.display(), "netkit serve: running; SIGINT or SIGTERM stops it");
    tracker.close();
    tracker.wait().await;
    info!("netkit serve: stopped");
    Ok(())
}

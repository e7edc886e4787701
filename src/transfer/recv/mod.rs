//! The receiving end: `netkit recv` and the file drop of `netkit serve`.
//!
//! One task per connection; per file, the socket task feeds a disk thread
//! (BLAKE3, then write) through a bounded queue, and fdatasync runs on a
//! thread of its own. A file is written as
//! `NAME.netkit-part` and renamed to its final name only after its hash
//! matched and its data is durable, so a partial file never appears under the
//! final name and a later `send` of the same file resumes from it.
//! This file holds the flags, the accept loop and the session; `admit` what
//! a connection must do to become a sender, `entry` one offered entry, and
//! `disk` the disk side.

mod admit;
mod entry;
mod room;

pub use room::{RoomDoor, RoomShare};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::conn::Frame;
use super::proto::{ReceiverFrame, SenderFrame};
use super::{Conn, FileReport, TransferError};
use crate::cli::{Listen, parse_duration, parse_size};
use crate::net::limit::IpPermit;

/// Command-line options of `netkit recv`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecvArgs {
    /// The code the sender printed (e.g. 7-crossword-hamster): receive
    /// through the relay (--relay) instead of listening.
    #[arg(value_name = "CODE", conflicts_with_all = ["code", "password_file"])]
    pub relay_code: Option<String>,
    /// The relay to meet the sender at, with a CODE.
    #[arg(long, default_value = crate::transfer::relay::DEFAULT_ADDR, env = "NETKIT_RELAY")]
    pub relay: String,
    /// Give up connecting to the relay after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_RECV_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8331", env = "NETKIT_RECV_LISTEN")]
    pub listen: Listen,
    /// Folder to store received files in.
    #[arg(long, default_value = ".", env = "NETKIT_RECV_DIR")]
    pub dir: PathBuf,
    /// Replace an existing different file instead of saving the new one as `name (1).ext`.
    #[arg(long, env = "NETKIT_RECV_OVERWRITE")]
    pub overwrite: bool,
    /// Refuse files larger than this (e.g. 10GiB).
    #[arg(long, value_parser = parse_size, env = "NETKIT_RECV_MAX_SIZE")]
    pub max_size: Option<u64>,
    /// Serve one sender, then exit (exit code 1 unless every file was stored).
    #[arg(long)]
    pub once: bool,
    /// Give up on a sender that sends nothing for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "NETKIT_RECV_TIMEOUT")]
    pub timeout: Duration,
    /// Most senders served at once; one more is told `busy` at once.
    #[arg(long, default_value_t = 64, env = "NETKIT_RECV_MAX_CONNS")]
    pub max_conns: usize,
    /// Close a connection that has not sent a valid netkit preamble within this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "NETKIT_RECV_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Duration,
    /// Most connections one address may have open before their preamble (0: no limit).
    #[arg(long, default_value_t = 16, env = "NETKIT_RECV_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: usize,
    /// Also refuse names Windows or macOS cannot store (CON, NUL, COM1, `:`, `\\`, trailing dots…).
    #[arg(long, env = "NETKIT_RECV_PORTABLE_NAMES")]
    pub portable_names: bool,
    /// Print one JSON object per received file on stdout.
    #[arg(long)]
    pub json: bool,
    /// Accept only a sender with this code (single use: implies --once).
    #[arg(long, env = "NETKIT_RECV_CODE", conflicts_with = "password_file")]
    pub code: Option<String>,
    /// Accept only senders who know the password in this file.
    #[arg(long, env = "NETKIT_RECV_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Skip fdatasync: faster on slow disks, but a crash or power loss can
    /// lose files the sender was told are stored.
    #[arg(long, env = "NETKIT_RECV_NO_SYNC")]
    pub no_sync: bool,
    /// Content each sender may have waiting for the disk (at least 1MiB);
    /// memory is bounded by this times --max-conns.
    #[arg(long, default_value = "32MiB", value_parser = parse_write_queue, env = "NETKIT_RECV_WRITE_QUEUE")]
    pub write_queue: usize,
}

/// `--write-queue`'s default (its flag says "32MiB"), also [`Config::new`]'s.
pub const WRITE_QUEUE: usize = 32 << 20;

/// A `--write-queue` size: at least one largest `Data` frame, or a frame
/// could never get room.
fn parse_write_queue(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    let min = crate::transfer::proto::MAX_DATA_FRAME as u64;
    if n < min {
        return Err(format!(
            "'{s}' is less than one data frame; give at least 1MiB"
        ));
    }
    usize::try_from(n).map_err(|_| format!("'{s}' is too large"))
}

/// Limits of the file drop in `netkit serve` (the receiver's flags, named `--drop-…`).
#[derive(Debug, Clone, clap::Args)]
pub struct DropArgs {
    /// Refuse dropped files larger than this (e.g. 10GiB).
    #[arg(long, value_parser = parse_size, env = "NETKIT_DROP_MAX_SIZE")]
    pub drop_max_size: Option<u64>,
    /// Give up on a sender to the drop that sends nothing for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "NETKIT_DROP_TIMEOUT")]
    pub drop_timeout: Duration,
    /// Most senders the drop serves at once; one more is told `busy` at once.
    #[arg(long, default_value_t = 64, env = "NETKIT_DROP_MAX_CONNS")]
    pub drop_max_conns: usize,
    /// Close a drop connection that has not sent a valid netkit preamble within this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "NETKIT_DROP_HANDSHAKE_TIMEOUT")]
    pub drop_handshake_timeout: Duration,
    /// Most drop connections one address may have open before their preamble (0: no limit).
    #[arg(long, default_value_t = 16, env = "NETKIT_DROP_MAX_PENDING_PER_IP")]
    pub drop_max_pending_per_ip: usize,
    /// Also refuse dropped names Windows or macOS cannot store.
    #[arg(long, env = "NETKIT_DROP_PORTABLE_NAMES")]
    pub drop_portable_names: bool,
    /// Replace an existing different file in the drop instead of saving it as `name (1).ext`.
    #[arg(long, env = "NETKIT_DROP_OVERWRITE")]
    pub drop_overwrite: bool,
    /// Content each sender to the drop may have waiting for the disk (at
    /// least 1MiB); memory is bounded by this times --drop-max-conns. Less
    /// than `netkit recv`'s 32MiB: the drop is a door of a server.
    #[arg(long, default_value = "8MiB", value_parser = parse_write_queue, env = "NETKIT_DROP_WRITE_QUEUE")]
    pub drop_write_queue: usize,
    /// Accept only senders who know the password in this file (`netkit send
    /// --password-file`); then every transfer to the drop is encrypted.
    #[arg(long, env = "NETKIT_DROP_PASSWORD_FILE")]
    pub drop_password_file: Option<PathBuf>,
}

impl DropArgs {
    /// The receiver configuration for the drop folder `dir`.
    pub fn config(&self, dir: impl Into<PathBuf>) -> Config {
        Config {
            overwrite: self.drop_overwrite,
            max_size: self.drop_max_size,
            timeout: self.drop_timeout,
            max_conns: self.drop_max_conns.max(1),
            handshake_timeout: self.drop_handshake_timeout,
            max_pending_per_ip: self.drop_max_pending_per_ip,
            portable_names: self.drop_portable_names,
            write_queue: self.drop_write_queue,
            door: "drop",
            ..Config::new(dir)
        }
    }
}

/// How a receiver behaves; built from [`RecvArgs`] or by hand.
#[derive(Debug, Clone)]
pub struct Config {
    /// Folder files are stored in (must exist).
    pub dir: PathBuf,
    /// Replace existing different files.
    pub overwrite: bool,
    /// Largest file accepted.
    pub max_size: Option<u64>,
    /// Timeout for every read and write on a connection.
    pub timeout: Duration,
    /// Most senders served at once (a slot is taken after a valid preamble).
    pub max_conns: usize,
    /// Time a new connection has to send a valid preamble.
    pub handshake_timeout: Duration,
    /// Most connections per address still before their preamble (0: no limit).
    pub max_pending_per_ip: usize,
    /// Refuse names Windows or macOS cannot store.
    pub portable_names: bool,
    /// Mode bits never given to a stored file or a new folder (the process umask).
    pub umask: u32,
    /// Name in logs and in `/metrics` (`recv`, `drop`).
    pub door: &'static str,
    /// Call fdatasync at all (off: faster, but a crash can lose confirmed files).
    pub durable: bool,
    /// Bytes of content one connection may have queued for its disk thread
    /// (at least [`MAX_DATA_FRAME`](crate::transfer::proto::MAX_DATA_FRAME)).
    pub write_queue: usize,
    /// Print one JSON object per file on stdout.
    pub json: bool,
    /// Require this code or password from every sender (then all is sealed).
    pub code: Option<super::CodeAuth>,
    /// The chat rooms a sender may post its files into (`netkit serve`).
    pub rooms: Option<Arc<dyn RoomDoor>>,
}

impl Config {
    /// A configuration storing into `dir`, with the default limits.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            overwrite: false,
            max_size: None,
            timeout: Duration::from_secs(30),
            max_conns: 64,
            handshake_timeout: Duration::from_secs(5),
            max_pending_per_ip: 16,
            portable_names: false,
            umask: super::disk::process_umask(),
            door: "recv",
            durable: true,
            write_queue: WRITE_QUEUE,
            json: false,
            code: None,
            rooms: None,
        }
    }
}

/// Runs `netkit recv`: serves until SIGINT/SIGTERM, or one sender with `--once`.
pub async fn run_command(args: RecvArgs) -> anyhow::Result<()> {
    crate::transfer::tune_allocator();
    let Some(addr) = args.listen.addr() else {
        anyhow::bail!("--listen off leaves nothing to receive on; give HOST:PORT");
    };
    let config = Config {
        overwrite: args.overwrite,
        max_size: args.max_size,
        timeout: args.timeout,
        max_conns: args.max_conns.max(1),
        handshake_timeout: args.handshake_timeout,
        max_pending_per_ip: args.max_pending_per_ip,
        portable_names: args.portable_names,
        json: args.json,
        durable: !args.no_sync,
        write_queue: args.write_queue,
        code: crate::transfer::send::code_auth(
            crate::transfer::pake::Role::Receiver,
            args.code.as_deref(),
            args.password_file.as_deref(),
        )?,
        ..Config::new(&args.dir)
    };
    prepare_dir(&config.dir)?;
    if let Some(code) = &args.relay_code {
        return through_relay(code, &args, config).await;
    }
    let listener = crate::cli::bind_tcp(addr, "--listen").await?;
    let shutdown = crate::shutdown::on_signal();
    crate::ready::announce(&crate::ready::Ready {
        recv: listener.local_addr().ok(),
        ..Default::default()
    });
    if !args.once && args.code.is_none() {
        run(listener, config, shutdown).await;
        return Ok(());
    }
    let local = listener.local_addr()?;
    info!(addr = %local, dir = %config.dir.display(), "recv: listening on {local} (one sender)");
    let (stream, peer) = tokio::select! {
        r = listener.accept() => r.map_err(|e| anyhow::anyhow!("accepting on {local}: {e}"))?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted before a sender connected"),
    };
    drop(listener);
    receive_once(stream, &format!("sender {peer}"), config, &shutdown).await
}

/// `netkit recv CODE`: meets the sender at the relay, then receives from it
/// as from a direct sender with `--code`.
async fn through_relay(code: &str, args: &RecvArgs, mut config: Config) -> anyhow::Result<()> {
    use crate::transfer::relay::{client, wire::Side};
    let code =
        crate::transfer::code::Code::parse(code).map_err(|e| anyhow::anyhow!("{code}: {e}"))?;
    let shutdown = crate::shutdown::on_signal();
    config.code = Some(super::CodeAuth::new(
        crate::transfer::pake::Role::Receiver,
        code.to_string(),
    ));
    let relay = &args.relay;
    let joined = client::join(relay, Side::Receiver, &code, args.connect_timeout).await?;
    if matches!(joined, client::Joined::Waiting { .. }) {
        info!(dir = %config.dir.display(), "recv: waiting at the relay {relay} for the sender");
    }
    let stream = tokio::select! {
        s = joined.paired() => s?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted before the sender came"),
    };
    let _ = stream.set_nodelay(true);
    receive_once(
        stream,
        &format!("sender via relay {relay}"),
        config,
        &shutdown,
    )
    .await
}

/// Receives from one sender on `stream` (`who` names it in errors) and
/// fails unless every entry was stored.
async fn receive_once(
    stream: tokio::net::TcpStream,
    who: &str,
    config: Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(config));
    let reports = tokio::select! {
        r = receive(stream, who.to_string(), &shared, None) => r,
        _ = shutdown.cancelled() => {
            shared.drain_writers().await;
            anyhow::bail!("interrupted; partial files are kept for resume")
        }
    };
    shared.drain_writers().await;
    let reports = reports.map_err(|e| anyhow::anyhow!("{who}: {e}"))?;
    let bad: Vec<_> = reports.iter().filter(|r| !r.verdict.confirmed()).collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "{} of {} entries from {who} were not stored",
            bad.len(),
            reports.len()
        );
    }
    Ok(())
}

/// Creates the receiving folder if needed and checks it is a folder.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create receiving folder {}: {e} — pass --dir DIR",
            dir.display()
        )
    })?;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a folder — pass --dir DIR", dir.display());
    }
    Ok(())
}

/// State shared by every connection of one receiver.
struct Shared {
    config: Config,
    /// Partial files being written right now; a second sender of the same name is refused.
    busy: Mutex<HashSet<PathBuf>>,
    /// Signalled whenever a name leaves `busy`.
    freed: tokio::sync::Notify,
    /// Disk writers; waited for on shutdown so every received byte is written.
    writers: TaskTracker,
    /// Pending connections, sender slots and refusals.
    gate: admit::Gate,
}

impl Shared {
    fn new(config: Config) -> Shared {
        Shared {
            gate: admit::Gate::new(&config),
            config,
            busy: Mutex::new(HashSet::new()),
            freed: tokio::sync::Notify::new(),
            writers: TaskTracker::new(),
        }
    }

    /// Waits until every disk writer has finished.
    async fn drain_writers(&self) {
        self.writers.close();
        self.writers.wait().await;
    }
}

/// Holds a name in [`Shared::busy`] until dropped.
struct BusyGuard {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut b) = self.shared.busy.lock() {
            b.remove(&self.path);
        }
        self.shared.freed.notify_waiters();
    }
}

/// Accepts senders on `listener` until `shutdown` is cancelled; one task per
/// connection. A connection becomes a sender (one of `config.max_conns`) only
/// after a valid preamble; before that it is bounded by the handshake timeout
/// and the per-address pending cap. On shutdown, connections in progress are
/// closed and their partial files kept for a later resume.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) {
    let local = listener.local_addr().ok();
    let door = config.door;
    info!(
        addr = ?local,
        dir = %config.dir.display(),
        "{door}: listening on {}",
        local.map(|a| a.to_string()).unwrap_or_default()
    );
    let shared = Arc::new(Shared::new(config));
    let tracker = TaskTracker::new();
    let mut acceptor = crate::net::accept::Acceptor::new(door);
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        let Some(pending) = shared.gate.admit_pending(&stream, peer.ip()) else {
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let span = info_span!("recv", %peer);
        tracker.spawn(
            async move {
                tokio::select! {
                    r = receive(stream, peer.to_string(), &shared, Some(pending)) => match r {
                        Err(e @ TransferError::Timeout { what: admit::HANDSHAKE, .. }) => {
                            debug!("sender {peer}: {e}")
                        }
                        Err(e) => warn!("sender {peer}: {e}"),
                        Ok(_) => {}
                    },
                    _ = shutdown.cancelled() => info!("closing on shutdown; partial files are kept for resume"),
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    shared.drain_writers().await;
    let refused: Vec<String> = shared
        .gate
        .refusals()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    info!(refused = %refused.join(" "), "{door}: stopped");
}

/// Serves one sender on `stream` until it says goodbye; returns a report per
/// offered entry. A connection-level error ends the session (an `Error`
/// frame tells the sender why); partial files stay for resume.
/// `pending` (the address's pending slot) is released once the preamble is in.
async fn receive<S>(
    stream: S,
    peer: String,
    shared: &Arc<Shared>,
    pending: Option<IpPermit>,
) -> Result<Vec<FileReport>, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream, shared.config.timeout);
    // A code handshake runs inside the preamble exchange, so within the
    // handshake timeout and before any sender slot is taken.
    conn.require_code(shared.config.code.clone());
    let result = async {
        let handshake = shared.gate.handshake(&mut conn).await;
        drop(pending);
        let _slot = handshake?;
        debug!("handshake done");
        session(&mut conn, &peer, shared).await
    }
    .await;
    if let Err(e) = &result {
        // Tell the sender why, unless the connection itself is gone.
        if !matches!(
            e,
            TransferError::Closed(_) | TransferError::Peer(_) | TransferError::Pake(_)
        ) {
            let _ = conn
                .send(&ReceiverFrame::Error {
                    reason: e.to_string(),
                })
                .await;
        }
    }
    conn.shutdown().await;
    result
}

async fn session<S>(
    conn: &mut Conn<S>,
    peer: &str,
    shared: &Arc<Shared>,
) -> Result<Vec<FileReport>, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut reports = Vec::new();
    let mut dest = room::Dest::folder(&shared.config.dir);
    loop {
        match conn
            .read::<SenderFrame>("waiting for the next offer")
            .await?
        {
            SenderFrame::Room { room, ticket } if reports.is_empty() && dest.share.is_none() => {
                let Some(door) = &shared.config.rooms else {
                    return Err(TransferError::Violation(
                        "this receiver does not post into chat rooms; send to a `netkit serve` drop"
                            .into(),
                    ));
                };
                let share = door
                    .open(&room, &ticket)
                    .map_err(TransferError::Violation)?;
                info!(peer, room, "posting into room '{room}'");
                dest = room::Dest::room(share);
            }
            SenderFrame::Offer(offer) => {
                let report = entry::handle_offer(conn, offer, &dest, shared).await?;
                info!(
                    peer,
                    name = %report.name,
                    size = report.size,
                    mb_per_s = format!("{:.1}", report.mb_per_s),
                    verdict = %report.verdict,
                    "{}",
                    report.line()
                );
                if shared.config.json {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("report serializes")
                    );
                }
                reports.push(report);
            }
            SenderFrame::Bye => return Ok(reports),
            SenderFrame::Error { reason } => return Err(TransferError::Peer(reason)),
            other => {
                return Err(TransferError::Unexpected {
                    expected: "Offer, Bye or (first) Room",
                    got: other.describe(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        recv: RecvArgs,
    }

    /// The flag's default string and `Config::new`'s constant say the same.
    #[test]
    fn write_queue_default_is_the_constant() {
        let cli = Cli::try_parse_from(["recv"]).unwrap();
        assert_eq!(cli.recv.write_queue, WRITE_QUEUE);
        assert_eq!(Config::new(".").write_queue, WRITE_QUEUE);
    }
}

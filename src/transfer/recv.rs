//! The receiving end: `netkit recv` and the file drop of `netkit serve`.
//!
//! One task per connection; per file, the socket task feeds a disk thread
//! (BLAKE3, then write) through a bounded queue, and fdatasync runs on a
//! thread of its own. A file is written as
//! `NAME.netkit-part` and renamed to its final name only after its hash
//! matched and its data is durable, so a partial file never appears under the
//! final name and a later `send` of the same file resumes from it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::names::{self, NameError};
use super::proto::{EntryKind, Offer, ReceiverFrame, SenderFrame};
use super::{Conn, FileReport, TransferError, Verdict, describe_sender, rate};
use crate::cli::{Listen, parse_duration, parse_size};

/// Chunks queued per connection for the disk writer and for the hasher.
const QUEUE: usize = 64;

/// Command-line options of `netkit recv`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecvArgs {
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
    /// Most senders served at once; more wait for a free slot.
    #[arg(long, default_value_t = 64, env = "NETKIT_RECV_MAX_CONNS")]
    pub max_conns: usize,
    /// Print one JSON object per received file on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip fdatasync: faster on slow disks, but a crash or power loss can
    /// lose files the sender was told are stored.
    #[arg(long, env = "NETKIT_RECV_NO_SYNC")]
    pub no_sync: bool,
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
    /// Most senders the drop serves at once; more wait for a free slot.
    #[arg(long, default_value_t = 64, env = "NETKIT_DROP_MAX_CONNS")]
    pub drop_max_conns: usize,
    /// Replace an existing different file in the drop instead of saving it as `name (1).ext`.
    #[arg(long, env = "NETKIT_DROP_OVERWRITE")]
    pub drop_overwrite: bool,
}

impl DropArgs {
    /// The receiver configuration for the drop folder `dir`.
    pub fn config(&self, dir: impl Into<PathBuf>) -> Config {
        Config {
            overwrite: self.drop_overwrite,
            max_size: self.drop_max_size,
            timeout: self.drop_timeout,
            max_conns: self.drop_max_conns.max(1),
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
    /// Most connections served at once.
    pub max_conns: usize,
    /// Make the data durable (fdatasync) every this many bytes, and at the end.
    pub sync_every: u64,
    /// Call fdatasync at all (off: faster, but a crash can lose confirmed files).
    pub durable: bool,
    /// Print one JSON object per file on stdout.
    pub json: bool,
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
            sync_every: 128 << 20,
            durable: true,
            json: false,
        }
    }
}

/// Runs `netkit recv`: serves until SIGINT/SIGTERM, or one sender with `--once`.
pub async fn run_command(args: RecvArgs) -> anyhow::Result<()> {
    super::tune_allocator();
    let Some(addr) = args.listen.addr() else {
        anyhow::bail!("--listen off leaves nothing to receive on; give HOST:PORT");
    };
    let config = Config {
        overwrite: args.overwrite,
        max_size: args.max_size,
        timeout: args.timeout,
        max_conns: args.max_conns.max(1),
        json: args.json,
        durable: !args.no_sync,
        ..Config::new(&args.dir)
    };
    prepare_dir(&config.dir)?;
    let listener = crate::cli::bind_tcp(addr, "--listen").await?;
    let shutdown = crate::shutdown::on_signal();
    if !args.once {
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
    let shared = Arc::new(Shared::new(config));
    let reports = tokio::select! {
        r = receive(stream, peer.to_string(), &shared) => r,
        _ = shutdown.cancelled() => {
            shared.drain_writers().await;
            anyhow::bail!("interrupted; partial files are kept for resume")
        }
    };
    shared.drain_writers().await;
    let reports = reports.map_err(|e| anyhow::anyhow!("sender {peer}: {e}"))?;
    let bad: Vec<_> = reports.iter().filter(|r| !r.verdict.confirmed()).collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "{} of {} entries from {peer} were not stored",
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
}

impl Shared {
    fn new(config: Config) -> Shared {
        Shared {
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
/// connection, at most `config.max_conns` at once. On shutdown, connections in
/// progress are closed and their partial files kept for a later resume.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) {
    let local = listener.local_addr().ok();
    info!(
        addr = ?local,
        dir = %config.dir.display(),
        "recv: listening on {}",
        local.map(|a| a.to_string()).unwrap_or_default()
    );
    let permits = Arc::new(Semaphore::new(config.max_conns.max(1)));
    let shared = Arc::new(Shared::new(config));
    let tracker = TaskTracker::new();
    let mut acceptor = crate::net::accept::Acceptor::new("recv");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await else {
            break;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let span = info_span!("recv", %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                tokio::select! {
                    r = receive(stream, peer.to_string(), &shared) => {
                        if let Err(e) = r {
                            warn!("sender {peer}: {e}");
                        }
                    }
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
    info!("recv: stopped");
}

/// Serves one sender on `stream` until it says goodbye; returns a report per
/// offered entry. A connection-level error ends the session (an `Error`
/// frame tells the sender why); partial files stay for resume.
async fn receive<S>(
    stream: S,
    peer: String,
    shared: &Arc<Shared>,
) -> Result<Vec<FileReport>, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream, shared.config.timeout);
    let result = session(&mut conn, &peer, shared).await;
    if let Err(e) = &result {
        // Tell the sender why, unless the connection itself is gone.
        if !matches!(e, TransferError::Closed(_) | TransferError::Peer(_)) {
            let _ = conn
                .send_receiver(&ReceiverFrame::Error {
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
    conn.write_preamble().await?;
    conn.read_preamble().await?;
    debug!("handshake done");
    let mut reports = Vec::new();
    loop {
        match conn.read_sender("waiting for the next offer").await? {
            SenderFrame::Offer(offer) => {
                let report = handle_offer(conn, offer, shared).await?;
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
                    expected: "Offer or Bye",
                    got: describe_sender(&other),
                });
            }
        }
    }
}

struct Outcome {
    verdict: Verdict,
    stored_as: Option<String>,
    reason: Option<String>,
    size: u64,
    transferred: u64,
    resumed_from: u64,
}

impl Outcome {
    fn rejected(reason: String) -> Outcome {
        Outcome {
            verdict: Verdict::Rejected,
            stored_as: None,
            reason: Some(reason),
            size: 0,
            transferred: 0,
            resumed_from: 0,
        }
    }
}

async fn handle_offer<S>(
    conn: &mut Conn<S>,
    offer: Offer,
    shared: &Arc<Shared>,
) -> Result<FileReport, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let out = match check_offer(&offer, &shared.config) {
        Err(reason) => {
            conn.send_receiver(&ReceiverFrame::Reject {
                reason: reason.clone(),
            })
            .await?;
            Outcome::rejected(reason)
        }
        Ok(comps) => match offer.kind {
            EntryKind::Dir => receive_dir(conn, &offer, &comps, &shared.config).await?,
            EntryKind::File => receive_file(conn, &offer, &comps, shared).await?,
        },
    };
    if let Some(r) = &out.reason {
        warn!(name = %offer.path, "{}: {r}", out.verdict);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FileReport {
        name: offer.path.clone(),
        stored_as: out.stored_as,
        kind: match offer.kind {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
        },
        size: out.size,
        transferred: out.transferred,
        resumed_from: out.resumed_from,
        verdict: out.verdict,
        reason: out.reason,
        seconds,
        mb_per_s: rate(out.transferred, seconds),
    })
}

/// Validates an offer before touching the disk; `Err` is the reason to reject it.
fn check_offer<'a>(offer: &'a Offer, config: &Config) -> Result<Vec<&'a str>, String> {
    let comps = names::validate(&offer.path).map_err(|e: NameError| format!("bad name: {e}"))?;
    if let (Some(size), Some(max)) = (offer.size, config.max_size)
        && size > max
    {
        return Err(format!(
            "{} is {size} bytes, over the receiver's --max-size of {max}",
            offer.path
        ));
    }
    Ok(comps)
}

async fn receive_dir<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    comps: &[&str],
    config: &Config,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let root = config.dir.clone();
    let path_comps: Vec<String> = comps.iter().map(|s| s.to_string()).collect();
    let (mode, mtime) = (offer.mode, offer.mtime);
    let res = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let c: Vec<&str> = path_comps.iter().map(|s| s.as_str()).collect();
        let parent = names::ensure_parents(&root, &c)?;
        let dir = parent.join(c[c.len() - 1]);
        names::ensure_real_dir(&dir, c[c.len() - 1])?;
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(&dir)?;
        apply_meta(&f, mode, mtime)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    match res {
        Ok(()) => {
            conn.send_receiver(&ReceiverFrame::Stored {
                name: offer.path.clone(),
                size: 0,
            })
            .await?;
            Ok(Outcome {
                verdict: Verdict::Stored,
                stored_as: Some(offer.path.clone()),
                reason: None,
                size: 0,
                transferred: 0,
                resumed_from: 0,
            })
        }
        Err(e) => {
            let reason = format!("cannot create folder {}: {e}", offer.path);
            conn.send_receiver(&ReceiverFrame::Reject {
                reason: reason.clone(),
            })
            .await?;
            Ok(Outcome::rejected(reason))
        }
    }
}

/// Sets permission bits and modification time through an open descriptor.
fn apply_meta(f: &File, mode: u32, mtime: Option<(i64, u32)>) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    if let Some((s, ns)) = mtime {
        let t = if s >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(s as u64, ns)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
                + Duration::from_nanos(ns as u64)
        };
        f.set_modified(t)?;
    }
    Ok(())
}

/// What the receiver found on disk for an offered file.
enum Found {
    /// A partial file of this length, and the hasher over it.
    Partial(u64, Box<blake3::Hasher>),
    /// A complete file of the offered size under the final name, with its hash.
    Same(blake3::Hash),
    /// Nothing usable: start from 0.
    Nothing,
}

/// Paths of one file being received.
struct Target {
    parent: PathBuf,
    file_name: String,
    part: PathBuf,
    /// Offered relative path of the parent folder ("" at the top).
    rel_parent: String,
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Looks for a partial or an identical file (blocking).
fn inspect(t: &Target, size: Option<u64>) -> io::Result<Found> {
    match std::fs::symlink_metadata(&t.part) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a regular file; remove it",
                    names::part_name(&t.file_name)
                ),
            ));
        }
        Ok(m) => {
            if let Some(size) = size
                && m.len() <= size
                && m.len() > 0
            {
                let f = open_nofollow(&t.part)?;
                let h = super::hash_prefix(&f, m.len())?;
                return Ok(Found::Partial(m.len(), Box::new(h)));
            }
            return Ok(Found::Nothing);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fin = t.parent.join(&t.file_name);
    match (std::fs::symlink_metadata(&fin), size) {
        (Ok(m), Some(size)) if m.file_type().is_file() && m.len() == size => {
            let f = open_nofollow(&fin)?;
            Ok(Found::Same(super::hash_prefix(&f, size)?.finalize()))
        }
        _ => Ok(Found::Nothing),
    }
}

/// Free bytes for unprivileged users on the filesystem holding `dir`.
fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in folder path"))?;
    // SAFETY: statvfs writes only into the struct we pass; `c` is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}

async fn receive_file<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    comps: &[&str],
    shared: &Arc<Shared>,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = &shared.config;
    let file_name = comps[comps.len() - 1].to_string();
    let rel_parent = comps[..comps.len() - 1].join("/");
    let parent = match names::ensure_parents(&config.dir, comps) {
        Ok(p) => p,
        Err(e) => return reject(conn, format!("cannot store {}: {e}", offer.path)).await,
    };
    let part = parent.join(names::part_name(&file_name));
    let target = Target {
        parent,
        file_name,
        part,
        rel_parent,
    };

    // One sender per name at a time.
    // One sender per name at a time. A sender that reconnects right after an
    // interruption may find its old session still flushing: wait a little.
    if !reserve(shared, &target.part, config.timeout / 2).await {
        return reject(
            conn,
            format!(
                "{} is being received from another sender right now; try again later",
                offer.path
            ),
        )
        .await;
    }
    let guard = BusyGuard {
        shared: shared.clone(),
        path: target.part.clone(),
    };

    let target = Arc::new(target);
    let found = {
        let t = target.clone();
        let size = offer.size;
        tokio::task::spawn_blocking(move || inspect(&t, size))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => return reject(conn, format!("cannot store {}: {e}", offer.path)).await,
    };

    // Answer: resume, check for an identical file, or start fresh.
    let (answer, partial_len) = match &found {
        Found::Partial(len, h) => (
            ReceiverFrame::Accept {
                offset: *len,
                prefix_hash: *h.finalize().as_bytes(),
            },
            *len,
        ),
        Found::Same(h) => (
            ReceiverFrame::Check {
                hash: *h.as_bytes(),
            },
            0,
        ),
        Found::Nothing => (
            ReceiverFrame::Accept {
                offset: 0,
                prefix_hash: [0; 32],
            },
            0,
        ),
    };
    if let (Some(size), ReceiverFrame::Accept { offset, .. }) = (offer.size, &answer) {
        let need = size - offset;
        match free_space(&target.parent) {
            Ok(free) if free < need.saturating_add(16 << 20) => {
                return reject(
                    conn,
                    format!(
                        "not enough free space for {}: it needs {need} bytes, the receiving folder has {free}",
                        offer.path
                    ),
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => warn!("cannot check free space: {e}"),
        }
    }
    conn.send_receiver(&answer).await?;

    // The sender hashes its prefix (resume) or whole file (Check) first.
    let to_hash = match &answer {
        ReceiverFrame::Accept { offset, .. } => *offset,
        _ => offer.size.unwrap_or(0),
    };
    let start = match conn
        .read_sender_after_hashing("waiting for Start", to_hash)
        .await?
    {
        SenderFrame::Same if matches!(found, Found::Same(_)) => {
            let name = join_rel(&target.rel_parent, &target.file_name);
            conn.send_receiver(&ReceiverFrame::Skipped { name: name.clone() })
                .await?;
            return Ok(Outcome {
                verdict: Verdict::Skipped,
                stored_as: Some(name),
                reason: None,
                size: offer.size.unwrap_or(0),
                transferred: 0,
                resumed_from: 0,
            });
        }
        SenderFrame::Start { offset } if offset == 0 || offset == partial_len => offset,
        SenderFrame::Error { reason } => return Err(TransferError::Peer(reason)),
        other => {
            return Err(TransferError::Unexpected {
                expected: "Start(0), Start(partial length) or Same",
                got: describe_sender(&other),
            });
        }
    };
    let hasher = match found {
        Found::Partial(len, h) if start == len => *h,
        _ => blake3::Hasher::new(),
    };
    receive_content(conn, offer, target, start, hasher, guard, shared).await
}

/// Reserves `part` for this connection, waiting up to `wait` for another to release it.
async fn reserve(shared: &Shared, part: &Path, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let freed = shared.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if shared
            .busy
            .lock()
            .expect("busy set poisoned")
            .insert(part.to_path_buf())
        {
            return true;
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            return false;
        }
    }
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

async fn reject<S>(conn: &mut Conn<S>, reason: String) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    conn.send_receiver(&ReceiverFrame::Reject {
        reason: reason.clone(),
    })
    .await?;
    Ok(Outcome::rejected(reason))
}

/// Hashes each chunk and writes it at its offset (while the chunk is still
/// in this core's cache), leaving holes for all-zero chunks. With `sync_every`, a second thread makes the data durable (fdatasync)
/// each time that many more bytes are written, overlapping the disk flush
/// with the transfer instead of stalling it. Returns the end offset.
fn write_loop(
    file: &File,
    mut pos: u64,
    mut rx: mpsc::Receiver<Bytes>,
    mut hasher: blake3::Hasher,
    sync_every: Option<u64>,
) -> io::Result<(u64, blake3::Hasher)> {
    std::thread::scope(|scope| {
        let (kick, kicked) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = sync_every.map(|_| {
            scope.spawn(move || -> io::Result<()> {
                while kicked.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
        });
        let every = sync_every.unwrap_or(u64::MAX);
        let mut unsynced = 0u64;
        let mut kicked_at = pos;
        let mut result = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            if !is_zero(&chunk)
                && let Err(e) = file.write_all_at(&chunk, pos)
            {
                result = Err(e);
                break;
            }
            pos += chunk.len() as u64;
            unsynced += chunk.len() as u64;
            if pos - kicked_at >= WRITEBACK_STEP {
                start_writeback(file, kicked_at, pos - kicked_at);
                kicked_at = pos;
            }
            if unsynced >= every {
                // A flush still running covers less, but the next one (or the
                // final fdatasync before the rename) covers the rest.
                let _ = kick.try_send(());
                unsynced = 0;
            }
        }
        drop(kick);
        if let Some(s) = syncer {
            let synced = s
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("fdatasync thread panicked")));
            result = result.and(synced);
        }
        result.map(|()| (pos, hasher))
    })
}

/// How often the disk thread asks the kernel to start writing back what it wrote.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writeback of `len` bytes at `off` without waiting for it, so dirty
/// pages never pile up to the kernel's throttling threshold and the periodic
/// fdatasync finds little left to do. Best effort: errors surface at fdatasync.
fn start_writeback(file: &File, off: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                off as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, off, len);
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, so reinterpreting aligned bytes is sound.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Opens (creating if needed) the partial file without following a symlink,
/// cut to `start` bytes.
fn open_part(path: &Path, start: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_len(start)?;
    Ok(f)
}

#[allow(clippy::too_many_arguments)]
async fn receive_content<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    target: Arc<Target>,
    start: u64,
    hasher: blake3::Hasher,
    guard: BusyGuard,
    shared: &Shared,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Up to QUEUE chunks (8 MiB) in flight to the disk thread, so a short
    // stall (dirty-page throttling, a busy core) does not stop the socket.
    let (wtx, wrx) = mpsc::channel::<Bytes>(QUEUE);
    let config = &shared.config;
    let sync_every = config.durable.then_some(config.sync_every);
    let part = target.part.clone();
    // The writer owns the busy guard: the name stays reserved until the last
    // queued chunk is on disk, even if this connection dies first.
    let writer = shared.writers.spawn_blocking(move || {
        let _guard = guard;
        let file = open_part(&part, start).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", part.display()))
        })?;
        let (end, hasher) = write_loop(&file, start, wrx, hasher, sync_every)?;
        Ok::<_, io::Error>((file, end, hasher))
    });

    let limit = offer.size.or(config.max_size);
    let mut received = start;
    // Once the writer has failed, the rest of the content is read and dropped
    // so the session can go on with the next file.
    let mut sink_ok = true;
    let sent_hash = loop {
        match conn.read_sender("receiving file content").await? {
            SenderFrame::Data(chunk) => {
                received += chunk.len() as u64;
                if let Some(limit) = limit
                    && received > limit
                {
                    let what = if offer.size.is_some() {
                        "its declared size"
                    } else {
                        "the receiver's --max-size"
                    };
                    return Err(TransferError::Violation(format!(
                        "sender sent more than {what} of {limit} bytes for {}",
                        offer.path
                    )));
                }
                if chunk.is_empty() || !sink_ok {
                    continue;
                }
                if wtx.send(chunk).await.is_err() {
                    sink_ok = false;
                }
            }
            SenderFrame::Done { hash } => break hash,
            SenderFrame::Error { reason } => return Err(TransferError::Peer(reason)),
            other => {
                return Err(TransferError::Unexpected {
                    expected: "Data or Done",
                    got: describe_sender(&other),
                });
            }
        }
    };
    drop(wtx);
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    let (file, written, ours) = match written {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("cannot write {}: {e}", offer.path);
            return failed(conn, offer, &target, start, received, reason).await;
        }
    };
    let ours = ours.finalize();
    if let Some(size) = offer.size
        && written != size
    {
        let reason = format!(
            "sender declared {size} bytes for {} but sent {written}",
            offer.path
        );
        return failed(conn, offer, &target, start, received, reason).await;
    }
    if ours.as_bytes() != &sent_hash {
        let reason = format!(
            "BLAKE3 mismatch for {}: the data was damaged in transit or the file changed while sending; send it again",
            offer.path
        );
        return failed(conn, offer, &target, start, received, reason).await;
    }

    // Durable, then visible under the final name.
    let (overwrite, mode, mtime, durable) =
        (config.overwrite, offer.mode, offer.mtime, config.durable);
    let t = target.clone();
    let fin = tokio::task::spawn_blocking(move || -> io::Result<String> {
        file.set_len(written)?;
        if durable {
            file.sync_data()?;
        }
        apply_meta(&file, mode, mtime)?;
        let name = commit(&t, overwrite)?;
        if durable {
            File::open(&t.parent)?.sync_all()?;
        }
        Ok(name)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    match fin {
        Ok(name) => {
            let stored_as = join_rel(&target.rel_parent, &name);
            conn.send_receiver(&ReceiverFrame::Stored {
                name: stored_as.clone(),
                size: written,
            })
            .await?;
            Ok(Outcome {
                verdict: Verdict::Stored,
                stored_as: Some(stored_as),
                reason: None,
                size: written,
                transferred: received - start,
                resumed_from: start,
            })
        }
        Err(e) => {
            let reason = format!("cannot store {}: {e}", offer.path);
            failed(conn, offer, &target, start, received, reason).await
        }
    }
}

/// Moves the verified partial file to its final name: the offered one if
/// free (or with `overwrite`), else `name (n).ext`. Never replaces a file
/// without `overwrite`: the new name is claimed with a hard link, which fails
/// if the name exists.
fn commit(t: &Target, overwrite: bool) -> io::Result<String> {
    let fin = t.parent.join(&t.file_name);
    if overwrite {
        if let Ok(m) = std::fs::symlink_metadata(&fin)
            && m.is_dir()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a folder; not replacing it", t.file_name),
            ));
        }
        std::fs::rename(&t.part, &fin)?;
        return Ok(t.file_name.clone());
    }
    for n in 0..10_000u32 {
        let name = if n == 0 {
            t.file_name.clone()
        } else {
            names::numbered(&t.file_name, n)
        };
        if name.len() > names::MAX_COMPONENT {
            break;
        }
        match std::fs::hard_link(&t.part, t.parent.join(&name)) {
            Ok(()) => {
                std::fs::remove_file(&t.part)?;
                return Ok(name);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free name for {} — pass --overwrite or clear the folder",
            t.file_name
        ),
    ))
}

async fn failed<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    target: &Target,
    start: u64,
    received: u64,
    reason: String,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // The partial file cannot be trusted; remove it so a retry starts clean.
    let _ = std::fs::remove_file(&target.part);
    conn.send_receiver(&ReceiverFrame::Failed {
        reason: reason.clone(),
    })
    .await?;
    Ok(Outcome {
        verdict: Verdict::Failed,
        stored_as: None,
        reason: Some(reason),
        size: offer.size.unwrap_or(received),
        transferred: received - start,
        resumed_from: start,
    })
}

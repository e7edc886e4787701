//! The sending end: `netkit send PATH... --to ADDR`.
//!
//! Files and folders are walked into a list of entries (folders after their
//! contents, so their mode and mtime stick); each is offered in turn. Content
//! is read by one thread and hashed by another while the socket task sends
//! it, so hashing never delays the first byte. The command succeeds only when
//! the receiver confirmed every entry. Reading, hashing and streaming a
//! source's content is in `content`.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

mod content;

use content::{hash_source, resume_point, stream_content};

use super::conn::Frame;
use super::progress::{Mode, Progress};
use super::proto::{EntryKind, Offer, ReceiverFrame, SenderFrame};
use super::report::{kind_name, rate};
use super::{CodeAuth, Conn, FileReport, TransferError, Verdict, names};
use crate::cli::parse_duration;

/// Command-line options of `netkit send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Files and folders to send; `-` reads stdin (needs --name).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,
    /// Receiver address, HOST:PORT. Without it the transfer goes through the
    /// relay (--relay) with a code, printed for the receiver
    /// (`netkit recv CODE`).
    #[arg(long, env = "NETKIT_SEND_TO")]
    pub to: Option<String>,
    /// Code the receiver was given (e.g. 7-crossword-hamster): authenticates
    /// both ends and encrypts the transfer. Through the relay: the code to
    /// use instead of a generated one.
    #[arg(long, env = "NETKIT_SEND_CODE", conflicts_with = "password_file")]
    pub code: Option<String>,
    /// The relay to meet the receiver at, when there is no --to.
    #[arg(long, default_value = crate::transfer::relay::DEFAULT_ADDR, env = "NETKIT_RELAY")]
    pub relay: String,
    /// File holding the password of a receiver started with --password-file.
    #[arg(long, env = "NETKIT_SEND_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Name to store under: required for `-`, optional for a single PATH.
    #[arg(long)]
    pub name: Option<String>,
    /// Give up when the receiver answers nothing for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "NETKIT_SEND_TIMEOUT")]
    pub timeout: Duration,
    /// Give up connecting after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_SEND_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Print one JSON object per entry on stdout instead of a text line.
    #[arg(long)]
    pub json: bool,
    /// Post each file into this chat room of the `netkit serve` at --to
    /// (its drop door); needs --ticket.
    #[arg(long, env = "NETKIT_SEND_ROOM", requires_all = ["ticket", "to"])]
    pub room: Option<String>,
    /// An upload ticket for --room, from the chat (`file_ticket`, or
    /// `/ticket ROOM` on the line door); its holder must stay in the room.
    #[arg(long, env = "NETKIT_SEND_TICKET", requires = "room")]
    pub ticket: Option<String>,
}

/// Where an entry's content comes from.
#[derive(Debug)]
pub enum Source {
    /// A file on disk.
    Path(PathBuf),
    /// Standard input that is a regular file (`< file`): size known, re-readable.
    StdinFile(File),
    /// Standard input from a pipe: size unknown, read once.
    StdinPipe,
    /// A folder (no content).
    Dir,
}

/// One file or folder to send.
#[derive(Debug)]
pub struct Entry {
    /// Content source.
    pub source: Source,
    /// The offer made for it.
    pub offer: Offer,
}

/// Options of a send session.
#[derive(Debug, Clone)]
pub struct Options {
    /// Timeout for every read and write.
    pub timeout: Duration,
    /// Progress output.
    pub progress: Mode,
    /// The chat room (and upload ticket) the receiver posts each file into.
    pub room: Option<(String, String)>,
}

/// Runs `netkit send`.
pub async fn run_command(args: SendArgs) -> anyhow::Result<()> {
    super::tune_allocator();
    let entries = collect(&args.paths, args.name.as_deref())?;
    if entries.is_empty() {
        anyhow::bail!("nothing to send");
    }
    let (stream, code) = match &args.to {
        Some(to) => {
            let code = code_auth(
                super::pake::Role::Sender,
                args.code.as_deref(),
                args.password_file.as_deref(),
            )?;
            (connect(to, args.connect_timeout).await?, code)
        }
        None => through_relay(&args).await?,
    };
    let opts = Options {
        timeout: args.timeout,
        progress: if args.json { Mode::Off } else { Mode::detect() },
        room: args.room.clone().zip(args.ticket.clone()),
    };
    let n = entries.len();
    let started = Instant::now();
    let mut printed = 0;
    let result = send_with_code(stream, entries, &opts, code, |r| {
        printed += 1;
        if args.json {
            println!("{}", serde_json::to_string(r).expect("report serializes"));
        } else {
            println!("{}", r.line());
        }
    })
    .await;
    let reports = result.map_err(|e| {
        if matches!(e, TransferError::Pake(_)) {
            return anyhow::anyhow!("{e}");
        }
        anyhow::anyhow!("{e} — {printed} of {n} entries done; run the same command again to resume")
    })?;
    let bad = reports.iter().filter(|r| !r.verdict.confirmed()).count();
    let bytes: u64 = reports.iter().map(|r| r.transferred).sum();
    let secs = started.elapsed().as_secs_f64();
    info!(
        "sent {n} entries, {bytes} bytes in {secs:.2}s ({:.1} MB/s)",
        rate(bytes, secs)
    );
    if bad > 0 {
        anyhow::bail!("{bad} of {n} entries were not stored by the receiver (see above)");
    }
    Ok(())
}

/// Meets the receiver at the relay: registers a code (`--code`, or a
/// generated one), prints it for the receiver, and waits to be paired.
async fn through_relay(args: &SendArgs) -> anyhow::Result<(TcpStream, Option<CodeAuth>)> {
    use super::relay::client;
    if args.password_file.is_some() {
        anyhow::bail!(
            "--password-file is for a receiver you can reach: pass --to HOST:PORT (through the relay, a code is used)"
        );
    }
    let chosen = match &args.code {
        Some(c) => {
            Some(super::code::Code::parse(c).map_err(|e| anyhow::anyhow!("--code {c}: {e}"))?)
        }
        None => None,
    };
    let (code, joined) = client::join_as_sender(&args.relay, chosen, args.connect_timeout).await?;
    let relay_flag = if args.relay == super::relay::DEFAULT_ADDR {
        String::new()
    } else {
        format!(" --relay {}", args.relay)
    };
    if args.json {
        let line = serde_json::json!({ "code": code.to_string(), "relay": args.relay });
        println!("{line}");
    } else {
        println!("code: {code} — on the other side run: netkit recv {code}{relay_flag}");
    }
    use std::io::Write;
    let _ = io::stdout().flush();
    if matches!(joined, client::Joined::Waiting { .. }) {
        info!("waiting at the relay {} for the receiver", args.relay);
    }
    let stream = joined.paired().await?;
    let _ = stream.set_nodelay(true);
    let auth = CodeAuth::new(super::pake::Role::Sender, code.to_string());
    Ok((stream, Some(auth)))
}

/// Connects to `to` within `timeout`, with an error that says what to check.
pub async fn connect(to: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    connect_peer(to, timeout, "`netkit recv`", "--to").await
}

/// Connects to `to` (where `what` should run; `flag` names it) within
/// `timeout`, with an error that says what to check.
pub(crate) async fn connect_peer(
    to: &str,
    timeout: Duration,
    what: &str,
    flag: &str,
) -> anyhow::Result<TcpStream> {
    let s = match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Err(_) => anyhow::bail!(
            "cannot connect to {to}: no answer within {} — check the address and any firewall",
            humantime::format_duration(timeout)
        ),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            anyhow::bail!("cannot connect to {to}: connection refused — is {what} running there?")
        }
        Ok(Err(e)) => anyhow::bail!("cannot connect to {to}: {e} — pass {flag} HOST:PORT"),
        Ok(Ok(s)) => s,
    };
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Builds the list of entries for `paths` (`-` is stdin, named by `name`).
pub fn collect(paths: &[String], name: Option<&str>) -> anyhow::Result<Vec<Entry>> {
    if name.is_some() && paths.len() > 1 {
        anyhow::bail!("--name applies to a single PATH; send several paths without it");
    }
    let mut out = Vec::new();
    for p in paths {
        if p == "-" {
            let Some(name) = name else {
                anyhow::bail!("sending stdin needs a name: pass --name NAME");
            };
            out.push(stdin_entry(name)?);
            continue;
        }
        let path = PathBuf::from(p);
        let meta = std::fs::metadata(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {p}: {e} — check the path"))?;
        let base = match name {
            Some(n) => n.to_string(),
            None => base_name(&path)?,
        };
        if meta.is_dir() {
            walk(&path, &base, &mut out)?;
        } else if meta.is_file() {
            out.push(file_entry(path, base, &meta));
        } else {
            anyhow::bail!("{p} is neither a file nor a folder");
        }
    }
    for e in &out {
        names::validate(&e.offer.path).map_err(|err| {
            anyhow::anyhow!(
                "cannot send {:?}: {err}; rename it or pass --name",
                e.offer.path
            )
        })?;
    }
    Ok(out)
}

fn base_name(path: &Path) -> anyhow::Result<String> {
    let norm: PathBuf = std::path::absolute(path)?.components().collect();
    let name = norm
        .file_name()
        .map(|n| n.to_owned())
        .or_else(|| {
            std::fs::canonicalize(path)
                .ok()?
                .file_name()
                .map(|n| n.to_owned())
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no name to send it under; pass --name",
                path.display()
            )
        })?;
    name.to_str().map(str::to_string).ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not valid UTF-8; pass --name or rename it",
            path.display()
        )
    })
}

fn mtime_of(m: &std::fs::Metadata) -> Option<(i64, u32)> {
    Some((m.mtime(), u32::try_from(m.mtime_nsec()).ok()?))
}

fn file_entry(path: PathBuf, name: String, m: &std::fs::Metadata) -> Entry {
    Entry {
        source: Source::Path(path),
        offer: Offer {
            path: name,
            kind: EntryKind::File,
            size: Some(m.len()),
            mode: m.mode() & 0o7777,
            mtime: mtime_of(m),
        },
    }
}

fn stdin_entry(name: &str) -> anyhow::Result<Entry> {
    let fd = io::stdin().as_fd().try_clone_to_owned()?;
    let f = File::from(fd);
    let m = f.metadata()?;
    let (source, size) = if m.is_file() {
        (Source::StdinFile(f), Some(m.len()))
    } else {
        (Source::StdinPipe, None)
    };
    Ok(Entry {
        source,
        offer: Offer {
            path: name.to_string(),
            kind: EntryKind::File,
            size,
            mode: 0o644,
            mtime: None,
        },
    })
}

/// Adds `dir` (named `rel`) and everything below it: files first, each
/// folder after its contents. Symlinks are skipped with a warning.
fn walk(dir: &Path, rel: &str, out: &mut Vec<Entry>) -> anyhow::Result<()> {
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dir.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dir.display()))?;
    children.sort_by_key(|c| c.file_name());
    for c in children {
        let path = c.path();
        let Some(name) = c.file_name().to_str().map(str::to_string) else {
            anyhow::bail!(
                "{} is not valid UTF-8; rename it to send it",
                path.display()
            );
        };
        let child_rel = format!("{rel}/{name}");
        let m = std::fs::symlink_metadata(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if m.file_type().is_symlink() {
            warn!("skipping symlink {}", path.display());
        } else if m.is_dir() {
            walk(&path, &child_rel, out)?;
        } else if m.is_file() {
            out.push(file_entry(path, child_rel, &m));
        } else {
            warn!("skipping {} (not a file or folder)", path.display());
        }
    }
    let m = std::fs::metadata(dir)?;
    out.push(Entry {
        source: Source::Dir,
        offer: Offer {
            path: rel.to_string(),
            kind: EntryKind::Dir,
            size: None,
            mode: m.mode() & 0o7777,
            mtime: mtime_of(&m),
        },
    });
    Ok(())
}

/// Sends `entries` over `stream` and returns a report per entry (each also
/// passed to `on_report` as soon as it is confirmed). An `Err` means the
/// session broke off; what was confirmed before stays stored at the receiver.
pub async fn send(
    stream: TcpStream,
    entries: Vec<Entry>,
    opts: &Options,
    on_report: impl FnMut(&FileReport),
) -> Result<Vec<FileReport>, TransferError> {
    send_with_code(stream, entries, opts, None, on_report).await
}

/// The code (`--code`) or password (`--password-file`) of one end, if any.
pub fn code_auth(
    role: super::pake::Role,
    code: Option<&str>,
    password_file: Option<&Path>,
) -> anyhow::Result<Option<CodeAuth>> {
    match (code, password_file) {
        (Some(c), _) => {
            let code =
                super::code::Code::parse(c).map_err(|e| anyhow::anyhow!("--code {c}: {e}"))?;
            Ok(Some(CodeAuth::new(role, code.to_string())))
        }
        (None, Some(p)) => Ok(Some(CodeAuth::read_password_file(role, p)?)),
        (None, None) => Ok(None),
    }
}

/// [`send`] with a code handshake first when `code` is given: then every
/// frame is sealed, and nothing is offered unless the receiver knows the code.
pub async fn send_with_code(
    stream: TcpStream,
    entries: Vec<Entry>,
    opts: &Options,
    code: Option<CodeAuth>,
    mut on_report: impl FnMut(&FileReport),
) -> Result<Vec<FileReport>, TransferError> {
    let mut conn = Conn::new(stream, opts.timeout);
    conn.require_code(code);
    let total = entries
        .iter()
        .map(|e| e.offer.size)
        .try_fold(0u64, |acc, s| s.map(|s| acc + s));
    let progress = Progress::new(opts.progress, total);
    let result = async {
        conn.write_preamble().await?;
        conn.read_preamble().await.map_err(|e| match e {
            TransferError::Closed(_) | TransferError::Timeout { .. } => {
                TransferError::Violation(format!(
                    "{e}; the peer did not answer with a netkit handshake — is it `netkit recv`?"
                ))
            }
            e => e,
        })?;
        if let Some((room, ticket)) = &opts.room {
            conn.send(&SenderFrame::Room {
                room: room.clone(),
                ticket: ticket.clone(),
            })
            .await?;
        }
        let mut reports = Vec::new();
        for entry in entries {
            let r = send_entry(&mut conn, entry, &progress).await?;
            on_report(&r);
            reports.push(r);
        }
        conn.send(&SenderFrame::Bye).await?;
        Ok(reports)
    }
    .await;
    progress.finish();
    match &result {
        // A failed socket or file operation may have left a frame half
        // written: close without another frame.
        Err(
            TransferError::Peer(_)
            | TransferError::Closed(_)
            | TransferError::Io { .. }
            | TransferError::Pake(_),
        )
        | Ok(_) => {}
        Err(e) => {
            let _ = conn
                .send(&SenderFrame::Error {
                    reason: e.to_string(),
                })
                .await;
        }
    }
    conn.shutdown().await;
    result
}

async fn send_entry(
    conn: &mut Conn<TcpStream>,
    entry: Entry,
    progress: &Progress,
) -> Result<FileReport, TransferError> {
    let started = Instant::now();
    let offer = entry.offer.clone();
    conn.send(&SenderFrame::Offer(offer.clone())).await?;
    let mut report = unconfirmed(&offer);
    // The receiver may hash a partial or existing file of up to this size first.
    conn.allow_hashing(offer.size.unwrap_or(0));
    let answer = conn
        .read::<ReceiverFrame>("waiting for the answer to an offer")
        .await?;
    let confirmation = match (answer, &entry.source) {
        (ReceiverFrame::Reject { reason }, _) => {
            report.verdict = Verdict::Rejected;
            report.reason = Some(reason);
            None
        }
        (ReceiverFrame::Stored { .. } | ReceiverFrame::Skipped { .. }, _)
            if offer.kind == EntryKind::File =>
        {
            return Err(TransferError::Violation(
                "receiver confirmed a file before its content".into(),
            ));
        }
        (f @ ReceiverFrame::Stored { .. }, Source::Dir) => Some(f),
        (ReceiverFrame::Error { reason }, _) => return Err(TransferError::Peer(reason)),
        (ReceiverFrame::Check { hash }, src) if offer.size.is_some() => {
            let size = offer.size.expect("checked");
            let ours = hash_source(src, size).await?;
            let plan = if ours.as_bytes() == &hash {
                Plan::Same
            } else {
                Plan::From(0, Box::new(blake3::Hasher::new()))
            };
            Some(carry_out(conn, &entry, plan, &mut report, progress).await?)
        }
        (
            ReceiverFrame::Accept {
                offset,
                prefix_hash,
            },
            src,
        ) if offer.kind == EntryKind::File => {
            let (start, hasher) = resume_point(src, offer.size, offset, prefix_hash).await?;
            let plan = Plan::From(start, Box::new(hasher));
            Some(carry_out(conn, &entry, plan, &mut report, progress).await?)
        }
        (other, _) => {
            return Err(TransferError::Unexpected {
                expected: "Accept, Check or Reject",
                got: other.describe(),
            });
        }
    };
    if let Some(frame) = confirmation {
        confirm(&mut report, frame)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.mb_per_s = rate(report.transferred, report.seconds);
    Ok(report)
}

/// A report for `offer` before the receiver confirmed anything.
fn unconfirmed(offer: &Offer) -> FileReport {
    FileReport {
        name: offer.path.clone(),
        stored_as: None,
        kind: kind_name(offer.kind),
        size: offer.size.unwrap_or(0),
        transferred: 0,
        resumed_from: 0,
        verdict: Verdict::Failed,
        reason: None,
        seconds: 0.0,
        mb_per_s: 0.0,
    }
}

/// How the sender goes on once it has the receiver's answer to a file.
enum Plan {
    /// The receiver holds an identical file: say so, send nothing.
    Same,
    /// Send the content from this offset, with the hasher over what is before it.
    From(u64, Box<blake3::Hasher>),
}

/// Carries out `plan` for `entry` and returns the receiver's confirmation.
async fn carry_out(
    conn: &mut Conn<TcpStream>,
    entry: &Entry,
    plan: Plan,
    report: &mut FileReport,
    progress: &Progress,
) -> Result<ReceiverFrame, TransferError> {
    match plan {
        Plan::Same => conn.send(&SenderFrame::Same).await?,
        Plan::From(start, hasher) => {
            conn.send(&SenderFrame::Start { offset: start }).await?;
            report.resumed_from = start;
            report.transferred = stream_content(conn, entry, start, *hasher, progress).await?;
        }
    }
    conn.read::<ReceiverFrame>("waiting for confirmation").await
}

/// Records the receiver's verdict on an entry in its report.
fn confirm(report: &mut FileReport, frame: ReceiverFrame) -> Result<(), TransferError> {
    match frame {
        ReceiverFrame::Stored { name, size } => {
            report.verdict = Verdict::Stored;
            report.stored_as = Some(name);
            report.size = size;
        }
        ReceiverFrame::Skipped { name } => {
            report.verdict = Verdict::Skipped;
            report.stored_as = Some(name);
        }
        ReceiverFrame::Failed { reason } => {
            report.verdict = Verdict::Failed;
            report.reason = Some(reason);
        }
        ReceiverFrame::Error { reason } => return Err(TransferError::Peer(reason)),
        other => {
            return Err(TransferError::Unexpected {
                expected: "Stored, Skipped or Failed",
                got: other.describe(),
            });
        }
    }
    Ok(())
}

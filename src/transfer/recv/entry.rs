//! One offered entry at the receiver: check the offer, answer it (resume,
//! check for an identical file, or start fresh), take the content through a
//! disk thread, and confirm or fail it. The disk work itself is in `disk`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::room::Dest;
use super::{BusyGuard, Config, Shared};
use crate::transfer::conn::Frame;
use crate::transfer::disk::{self, Found, Meta, StoreRules, Target};
use crate::transfer::names::{self, NameError};
use crate::transfer::proto::{EntryKind, Offer, ReceiverFrame, SenderFrame};
use crate::transfer::report::{kind_name, rate};
use crate::transfer::{Conn, FileReport, TransferError, Verdict};

/// Chunks queued per connection, whatever their size: a sender of small
/// frames cannot make the queue hold more buffers than this.
const QUEUE_CHUNKS: usize = 256;

/// What became of one entry, before it is timed into a [`FileReport`].
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

    /// Stored under `name` with no content crossing the network (a folder, or an identical file).
    fn without_content(verdict: Verdict, name: String, size: u64) -> Outcome {
        Outcome {
            verdict,
            stored_as: Some(name),
            reason: None,
            size,
            transferred: 0,
            resumed_from: 0,
        }
    }
}

/// Handles one `Offer` to its end and reports on it.
pub(super) async fn handle_offer<S>(
    conn: &mut Conn<S>,
    offer: Offer,
    dest: &Dest,
    shared: &Arc<Shared>,
) -> Result<FileReport, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let out = match check_offer(&offer, &shared.config) {
        Err(reason) => reject(conn, reason).await?,
        Ok(comps) => match offer.kind {
            EntryKind::Dir => receive_dir(conn, &offer, &comps, dest, &shared.config).await?,
            EntryKind::File => receive_file(conn, &offer, &comps, dest, shared).await?,
        },
    };
    if let Some(r) = &out.reason {
        warn!(name = %offer.path, "{}: {r}", out.verdict);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FileReport {
        name: offer.path.clone(),
        stored_as: out.stored_as,
        kind: kind_name(offer.kind),
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
    let bad_name = |e: NameError| format!("bad name: {e}");
    let comps = names::validate(&offer.path).map_err(bad_name)?;
    if config.portable_names {
        names::check_portable(&offer.path, &comps).map_err(bad_name)?;
    }
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
    dest: &Dest,
    config: &Config,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let root = dest.dir.clone();
    let path_comps: Vec<String> = comps.iter().map(|s| s.to_string()).collect();
    let meta = Meta::of(offer, config.umask);
    let res = tokio::task::spawn_blocking(move || disk::make_dir(&root, &path_comps, meta))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    match res {
        Ok(()) => {
            conn.send(&ReceiverFrame::Stored {
                name: offer.path.clone(),
                size: 0,
            })
            .await?;
            Ok(Outcome::without_content(
                Verdict::Stored,
                offer.path.clone(),
                0,
            ))
        }
        Err(e) => reject(conn, format!("cannot create folder {}: {e}", offer.path)).await,
    }
}

/// Answers a file offer from what is on disk, then takes its content.
async fn receive_file<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    comps: &[&str],
    dest: &Dest,
    shared: &Arc<Shared>,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = &shared.config;
    let target = match Target::prepare(&dest.dir, comps) {
        Ok(t) => t,
        Err(e) => return reject(conn, format!("cannot store {}: {e}", offer.path)).await,
    };

    // One sender per name at a time. A sender that reconnects right after an
    // interruption may find its old session still flushing: wait a little.
    if !reserve(shared, &target.part, config.timeout / 2).await {
        let reason = format!(
            "{} is being received from another sender right now; try again later",
            offer.path
        );
        return reject(conn, reason).await;
    }
    let guard = BusyGuard {
        shared: shared.clone(),
        path: target.part.clone(),
    };

    let target = Arc::new(target);
    let found = {
        let (t, size) = (target.clone(), offer.size);
        tokio::task::spawn_blocking(move || disk::inspect(&t, size))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => return reject(conn, format!("cannot store {}: {e}", offer.path)).await,
    };
    let answer = answer_for(&found);
    if let Some(reason) = lacks_space(offer, &answer, &target) {
        return reject(conn, reason).await;
    }
    conn.send(&answer).await?;

    // The sender hashes its prefix (resume) or whole file (Check) first.
    let (to_hash, partial_len) = match &answer {
        ReceiverFrame::Accept { offset, .. } => (*offset, *offset),
        _ => (offer.size.unwrap_or(0), 0),
    };
    conn.allow_hashing(to_hash);
    let same_allowed = matches!(found, Found::Same(_));
    let Some(start) = read_start(conn, partial_len, same_allowed).await? else {
        let name = target.stored_name(&target.file_name);
        conn.send(&ReceiverFrame::Skipped { name: name.clone() })
            .await?;
        let size = offer.size.unwrap_or(0);
        return Ok(Outcome::without_content(Verdict::Skipped, name, size));
    };
    let hasher = match found {
        Found::Partial(len, h) if start == len => *h,
        _ => blake3::Hasher::new(),
    };
    let incoming = Incoming {
        offer,
        target,
        start,
        hasher,
        guard,
    };
    receive_content(conn, incoming, dest, shared).await
}

/// Reads the sender's choice after our answer: `Some(offset)` for `Start`
/// (0, or `partial_len` to resume), `None` for `Same` (only when allowed).
async fn read_start<S>(
    conn: &mut Conn<S>,
    partial_len: u64,
    same_allowed: bool,
) -> Result<Option<u64>, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match conn.read::<SenderFrame>("waiting for Start").await? {
        SenderFrame::Same if same_allowed => Ok(None),
        SenderFrame::Start { offset } if offset == 0 || offset == partial_len => Ok(Some(offset)),
        SenderFrame::Error { reason } => Err(TransferError::Peer(reason)),
        other => Err(TransferError::Unexpected {
            expected: "Start(0), Start(partial length) or Same",
            got: other.describe(),
        }),
    }
}

/// The answer to a file offer: resume a partial file, check an identical
/// one, or start fresh.
fn answer_for(found: &Found) -> ReceiverFrame {
    match found {
        Found::Partial(len, h) => ReceiverFrame::Accept {
            offset: *len,
            prefix_hash: *h.finalize().as_bytes(),
        },
        Found::Same(h) => ReceiverFrame::Check {
            hash: *h.as_bytes(),
        },
        Found::Nothing => ReceiverFrame::Accept {
            offset: 0,
            prefix_hash: [0; 32],
        },
    }
}

/// The reason to reject `offer` when the receiving folder cannot hold the
/// rest of it (with 16 MiB to spare); `None` when it can or cannot be told.
fn lacks_space(offer: &Offer, answer: &ReceiverFrame, target: &Target) -> Option<String> {
    let (Some(size), ReceiverFrame::Accept { offset, .. }) = (offer.size, answer) else {
        return None;
    };
    let need = size - offset;
    match disk::free_space(&target.parent) {
        Ok(free) if free < need.saturating_add(16 << 20) => Some(format!(
            "not enough free space for {}: it needs {need} bytes, the receiving folder has {free}",
            offer.path
        )),
        Ok(_) => None,
        Err(e) => {
            warn!("cannot check free space: {e}");
            None
        }
    }
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

async fn reject<S>(conn: &mut Conn<S>, reason: String) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    conn.send(&ReceiverFrame::Reject {
        reason: reason.clone(),
    })
    .await?;
    Ok(Outcome::rejected(reason))
}

/// A file whose offer was answered and whose content is about to arrive.
struct Incoming<'a> {
    offer: &'a Offer,
    target: Arc<Target>,
    /// Offset the content starts at: 0 or the partial file's length.
    start: u64,
    /// The hash over the bytes before `start`.
    hasher: blake3::Hasher,
    /// The name's reservation; the disk writer holds it to its last byte.
    guard: BusyGuard,
}

/// Takes the content of `inc` from the socket to the disk thread, checks
/// its size and hash, and stores it under its final name.
async fn receive_content<S>(
    conn: &mut Conn<S>,
    inc: Incoming<'_>,
    dest: &Dest,
    shared: &Shared,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Incoming {
        offer,
        target,
        start,
        hasher,
        guard,
    } = inc;
    // Up to --write-queue bytes (32 MiB: 64 of the netkit sender's 512 KiB
    // frames) in flight to the disk thread, so a short stall (dirty-page
    // throttling, a busy core) does not stop the socket. On tmpfs 8 MiB
    // moved 8-10 % less: the socket task waited for room more often.
    let config = &shared.config;
    let (wtx, wrx) = disk::disk_queue(config.write_queue, QUEUE_CHUNKS);
    let durable = config.durable;
    let part = target.part.clone();
    // The writer owns the busy guard: the name stays reserved until the last
    // queued chunk is on disk, even if this connection dies first.
    let writer = shared.writers.spawn_blocking(move || {
        let _guard = guard;
        disk::write_part(&part, start, wrx, hasher, durable)
    });
    let limit = offer.size.or(config.max_size);
    let (received, sent_hash) = read_content(conn, offer, start, limit, wtx).await?;
    let span = Span { start, received };
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    let (file, written, ours) = match written {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("cannot write {}: {e}", offer.path);
            return failed(conn, offer, &target, span, reason).await;
        }
    };
    let hash = ours.finalize();
    if let Some(reason) = mismatch(offer, written, hash, sent_hash) {
        return failed(conn, offer, &target, span, reason).await;
    }

    // Durable, then visible under the final name.
    let meta = Meta::of(offer, config.umask);
    let rules = StoreRules {
        overwrite: config.overwrite,
        durable: config.durable,
    };
    let t = target.clone();
    let fin = tokio::task::spawn_blocking(move || disk::store(file, written, &t, meta, rules))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    match fin {
        Ok(name) => {
            let stored_as = match &dest.share {
                None => target.stored_name(&name),
                // Posted before the sender is told: a Stored reply means the message is out.
                Some(room) => {
                    let (path, file_name) = (target.parent.join(&name), target.file_name.clone());
                    match room.share(path.clone(), file_name, written, hash).await {
                        Ok(link) => link,
                        Err(reason) => {
                            let _ = std::fs::remove_file(&path);
                            return failed(conn, offer, &target, span, reason).await;
                        }
                    }
                }
            };
            conn.send(&ReceiverFrame::Stored {
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
            failed(conn, offer, &target, span, reason).await
        }
    }
}

/// Reads `Data` frames into the disk queue `wtx` until `Done`; returns the
/// end offset and the sender's hash. Past `limit` bytes the sender broke the
/// protocol. Once the disk writer has failed, the rest of the content is
/// read and dropped so the session can go on with the next file.
async fn read_content<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    start: u64,
    limit: Option<u64>,
    wtx: disk::QueueTx,
) -> Result<(u64, [u8; 32]), TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut received = start;
    let mut sink_ok = true;
    loop {
        match conn.read::<SenderFrame>("receiving file content").await? {
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
            SenderFrame::Done { hash } => return Ok((received, hash)),
            SenderFrame::Error { reason } => return Err(TransferError::Peer(reason)),
            other => {
                return Err(TransferError::Unexpected {
                    expected: "Data or Done",
                    got: other.describe(),
                });
            }
        }
    }
}

/// Why the written file does not match what was offered and sent, if it does not.
fn mismatch(offer: &Offer, written: u64, ours: blake3::Hash, sent: [u8; 32]) -> Option<String> {
    if let Some(size) = offer.size
        && written != size
    {
        return Some(format!(
            "sender declared {size} bytes for {} but sent {written}",
            offer.path
        ));
    }
    (ours.as_bytes() != &sent).then(|| {
        format!(
            "BLAKE3 mismatch for {}: the data was damaged in transit or the file changed while sending; send it again",
            offer.path
        )
    })
}

/// The content of one file on the wire: where it started and where it ended.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    received: u64,
}

async fn failed<S>(
    conn: &mut Conn<S>,
    offer: &Offer,
    target: &Target,
    span: Span,
    reason: String,
) -> Result<Outcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // The partial file cannot be trusted; remove it so a retry starts clean.
    let _ = std::fs::remove_file(&target.part);
    conn.send(&ReceiverFrame::Failed {
        reason: reason.clone(),
    })
    .await?;
    Ok(Outcome {
        verdict: Verdict::Failed,
        stored_as: None,
        reason: Some(reason),
        size: offer.size.unwrap_or(span.received),
        transferred: span.received - span.start,
        resumed_from: span.start,
    })
}

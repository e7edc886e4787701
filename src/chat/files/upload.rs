//! Receiving an upload's bytes: one request's body is streamed to a disk
//! thread that hashes and writes each chunk at its offset; a complete file
//! is made durable (fsync of the file, rename to its BLAKE3, fsync of the
//! folder) before anyone is told of it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::names::{SNIFF_LEN, sniff};
use super::{FileError, FileStore, Upload, lock};
use crate::transfer::disk::{Writeback, write_in_pieces};

/// Batches queued between a request and its disk thread.
const DISK_QUEUE: usize = 8;

/// The bytes gathered into one batch for the disk thread. HTTP bodies come
/// in chunks of the connection's read buffer (32 KiB here); handing those
/// over one by one cost a thread wake-up and a write each, about a fifth of
/// the server's CPU in a 1 GiB upload. At most `DISK_QUEUE` batches are
/// queued, and as many come back to be reused: about 4 MiB per upload.
const DISK_BATCH: usize = 256 << 10;

/// An upload's part file and the hash of what it holds.
#[derive(Debug)]
pub(super) struct Part {
    path: PathBuf,
    /// `None` once a write failed (the upload is then cancelled).
    hasher: Option<blake3::Hasher>,
}

impl Part {
    /// Creates the empty part file at `path`.
    pub(super) fn create(path: PathBuf) -> io::Result<Part> {
        File::create_new(&path)?;
        Ok(Part {
            path,
            hasher: Some(blake3::Hasher::new()),
        })
    }
}

/// Where an upload stands after a request.
#[derive(Debug)]
pub enum Progress {
    /// Not all bytes yet: resume from this offset.
    Partial(u64),
    /// Complete, verified and stored.
    Complete(StoredFile),
}

/// A complete file, stored durably under its BLAKE3.
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// Room it is in.
    pub room: String,
    /// The uploader's name for it.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3, 64 hex digits.
    pub blake3: String,
    /// Media type sniffed from the content.
    pub mime: String,
    /// True if the room already held identical content (stored once).
    pub deduplicated: bool,
    /// True when a thumbnail was made for it ([`super::thumbs`]).
    pub thumb: bool,
}

impl StoredFile {
    /// The message's view of this file, its link under `base` (the HTTP
    /// door's URL without a trailing `/`).
    pub fn file_ref(&self, base: &str) -> crate::chat::protocol::FileRef {
        let name =
            percent_encoding::utf8_percent_encode(&self.name, percent_encoding::NON_ALPHANUMERIC);
        crate::chat::protocol::FileRef {
            name: self.name.clone(),
            size: self.size,
            blake3: self.blake3.clone(),
            url: format!("{base}/files/{}/{}/{name}", self.room, self.blake3),
            mime: self.mime.clone(),
            expired: false,
            thumb: self
                .thumb
                .then(|| format!("{base}/thumbs/{}/{}.png", self.room, self.blake3)),
        }
    }
}

/// How a request's body ended.
enum Ended {
    /// The body ended.
    Done,
    /// More than the declared size arrived.
    Lie,
    /// Nothing arrived for the stall timeout.
    Stalled,
    /// The body failed (connection cut) or the server is stopping.
    Cut,
}

impl FileStore {
    /// Appends a request's `body` to `up`, which must stand at `offset`;
    /// when the last byte arrives, verifies and stores the file. A body
    /// that breaks off or stalls leaves the upload resumable at what was
    /// written; more bytes than declared, a full disk or a write error
    /// cancel it (the part file is removed).
    pub async fn write<S, E>(
        &self,
        up: &Arc<Upload>,
        offset: u64,
        body: S,
        shutdown: &CancellationToken,
    ) -> Result<Progress, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let mut part = up.part.try_lock().map_err(|_| FileError::InUse)?;
        up.touch();
        let have = up.offset();
        if offset != have {
            return Err(FileError::Offset {
                have,
                asked: offset,
            });
        }
        let Some(hasher) = part.hasher.take() else {
            return Err(FileError::NoSuchUpload(up.id.clone()));
        };
        let free = self.check_free(
            &lock(&self.uploads),
            &self.files_dir(&up.room),
            up.size - have,
            Some(&up.id),
        );
        if let Err(e) = free {
            self.cancel(up);
            return Err(e);
        }
        let file = OpenOptions::new().write(true).open(&part.path)?;
        let (tx, rx) = mpsc::channel(DISK_QUEUE);
        let (back, pool) = std::sync::mpsc::channel();
        let disk = tokio::task::spawn_blocking(move || write_loop(&file, have, rx, &back));
        let mut hasher = hasher;
        let feeder = Feeder {
            tx,
            pool,
            hasher: &mut hasher,
        };
        let ended = self.feed(body, feeder, up.size - have, shutdown).await;
        let written = disk
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("disk thread: {e}"))));
        // Every byte hashed was queued and, unless the disk thread failed
        // (which cancels the upload here), written: the hash and the part
        // file agree.
        let pos = match written {
            Ok(pos) => pos,
            Err(e) => {
                self.cancel(up);
                return Err(FileError::Io(e));
            }
        };
        up.offset.store(pos, Ordering::Release);
        up.touch();
        part.hasher = Some(hasher);
        match ended {
            Ended::Lie => {
                self.cancel(up);
                return Err(FileError::SizeLie { size: up.size });
            }
            Ended::Stalled => return Err(FileError::Stalled(self.limits.stall_timeout, pos)),
            Ended::Cut => return Err(FileError::Cut(pos)),
            Ended::Done if pos < up.size => return Ok(Progress::Partial(pos)),
            Ended::Done => {}
        }
        let hasher = part.hasher.take().expect("set just above");
        let stored = self.finish(up, part.path.clone(), hasher).await;
        lock(&self.uploads).remove(&up.id);
        if stored.is_err() {
            let _ = std::fs::remove_file(&part.path);
        }
        stored.map(Progress::Complete)
    }

    /// Hashes the chunks of `body` and passes them to the disk thread, in
    /// batches, until the body ends, stalls, breaks, would pass `room` more
    /// bytes, or the disk thread fails (a full disk is answered at once,
    /// not after the client's next chunk). The hashing happens here, on
    /// bytes just copied and still in the CPU's cache, so that the disk
    /// thread only writes: the two run side by side.
    async fn feed<S, E>(
        &self,
        mut body: S,
        to: Feeder<'_>,
        mut room: u64,
        shutdown: &CancellationToken,
    ) -> Ended
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let stall = self.limits.stall_timeout;
        let mut batch = Vec::new();
        let ended = loop {
            let next = tokio::select! {
                n = tokio::time::timeout(stall, body.next()) => n,
                _ = shutdown.cancelled() => break Ended::Cut,
                // The disk thread failed; it reports why.
                _ = to.tx.closed() => return Ended::Cut,
            };
            let chunk = match next {
                Err(_) => break Ended::Stalled,
                Ok(None) => break Ended::Done,
                Ok(Some(Err(_))) => break Ended::Cut,
                Ok(Some(Ok(c))) => c,
            };
            if chunk.len() as u64 > room {
                return Ended::Lie;
            }
            room -= chunk.len() as u64;
            if batch.capacity() == 0 {
                batch = to.pool.try_recv().unwrap_or_default();
                batch.reserve(DISK_BATCH);
            }
            batch.extend_from_slice(&chunk);
            to.hasher.update(&chunk);
            if batch.len() >= DISK_BATCH && to.tx.send(std::mem::take(&mut batch)).await.is_err() {
                // The disk thread failed; it reports why.
                return Ended::Cut;
            }
        };
        // What arrived before the end is written, so a resume starts after it.
        if !batch.is_empty() && to.tx.send(batch).await.is_err() {
            return Ended::Cut;
        }
        ended
    }

    /// Makes a complete upload durable under its BLAKE3 in the room's
    /// folder (or drops it if identical content is there already).
    async fn finish(
        &self,
        up: &Upload,
        part: PathBuf,
        hasher: blake3::Hasher,
    ) -> Result<StoredFile, FileError> {
        let hex = hasher.finalize().to_hex().to_string();
        let size = up.size;
        let mime = tokio::task::spawn_blocking(move || -> io::Result<String> {
            let mut f = OpenOptions::new().read(true).write(true).open(&part)?;
            f.set_len(size)?;
            f.sync_all()?;
            let mut head = Vec::with_capacity(SNIFF_LEN);
            (&mut f).take(SNIFF_LEN as u64).read_to_end(&mut head)?;
            Ok(sniff(&head))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        let deduplicated = self.commit(&up.room, &self.part_path(up), &hex, size)?;
        // Made (and durable) before the message that names it is posted.
        let thumb = self.make_thumbnail(&up.room, &hex, &mime, size).await;
        Ok(StoredFile {
            room: up.room.clone(),
            name: up.name.clone(),
            size,
            blake3: hex,
            mime,
            deduplicated,
            thumb,
        })
    }
}

impl FileStore {
    /// Moves the durable file `from` into `room`'s store as `hex` (or
    /// removes it when identical content is there already, which it
    /// returns as true), makes the folder entry durable and counts it.
    pub(super) fn commit(&self, room: &str, from: &Path, hex: &str, size: u64) -> io::Result<bool> {
        let dir = self.files_dir(room);
        let dest = dir.join(hex);
        // Under the lock, so two identical uploads finishing together are counted once.
        let mut used = lock(&self.used);
        let deduplicated = dest.is_file();
        if deduplicated {
            std::fs::remove_file(from)?;
            // Reshared now: retention counts from here, not from the first upload.
            File::options()
                .write(true)
                .open(&dest)?
                .set_modified(std::time::SystemTime::now())?;
        } else {
            std::fs::rename(from, &dest)?;
            File::open(&dir)?.sync_all()?;
            if let Some(n) = used.get_mut(room) {
                *n = n.saturating_add(size);
            }
        }
        Ok(deduplicated)
    }
}

/// The request's side of an upload's disk thread: where batches go, the
/// emptied batches that come back to be filled again (no fresh allocation,
/// page faults and zeroing per batch), and the hash of what was sent.
struct Feeder<'a> {
    tx: mpsc::Sender<Vec<u8>>,
    pool: std::sync::mpsc::Receiver<Vec<u8>>,
    hasher: &'a mut blake3::Hasher,
}

/// Writes each batch from `rx` at its offset, from `pos` on, and hands the
/// emptied buffer `back`, until the queue closes; returns the end offset.
/// What is written is handed to the disk as it goes ([`Writeback`]), as the
/// transfer receiver does: the upload ends in an fsync anyway, which then
/// finds little left to write, and the page cache never holds much of the
/// upload dirty. Without it a 1 GiB upload spent over half the server's CPU
/// copying into the page cache on this machine (a VM whose fresh pages are
/// costly to touch): 406-563 MB/s against 584-830 with it, alternated.
fn write_loop(
    file: &File,
    mut pos: u64,
    mut rx: mpsc::Receiver<Vec<u8>>,
    back: &std::sync::mpsc::Sender<Vec<u8>>,
) -> io::Result<u64> {
    let mut writeback = Writeback::from(pos);
    while let Some(mut batch) = rx.blocking_recv() {
        write_in_pieces(file, &batch, pos)?;
        pos += batch.len() as u64;
        batch.clear();
        let _ = back.send(batch);
        writeback.written(file, pos);
    }
    Ok(pos)
}

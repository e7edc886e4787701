//! The receiver's side of the disk, all blocking (run it off the runtime):
//! what is already there for an offer, the partial file and its write loop,
//! the commit under the final name with metadata, free space, and hashing
//! a file's prefix (which the sender uses too).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::CHUNK;
use super::names;
use super::proto::Offer;

/// Permission bits and modification time an offer carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    /// Permission bits to apply: the offer's, without setuid, setgid and
    /// sticky, and with the receiver's umask cleared.
    pub(crate) mode: u32,
    /// Seconds and nanoseconds since the epoch, if the sender knew them.
    pub(crate) mtime: Option<(i64, u32)>,
}

impl Meta {
    /// The metadata of `offer`, its mode limited to the rwx bits `umask` allows
    /// (rsync's default without `--perms`): a sender never plants a setuid file.
    pub(crate) fn of(offer: &Offer, umask: u32) -> Meta {
        Meta {
            mode: offer.mode & 0o777 & !umask,
            mtime: offer.mtime,
        }
    }
}

/// This process's umask, read without changing it (`/proc/self/status`);
/// 0o022 where that is unavailable.
pub(crate) fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o022)
}

/// Sets permission bits and modification time through an open descriptor.
fn apply_meta(f: &File, Meta { mode, mtime }: Meta) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
    apply_mtime(f, mtime)
}

/// Sets the modification time, if the sender knew it.
fn apply_mtime(f: &File, mtime: Option<(i64, u32)>) -> io::Result<()> {
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
pub(crate) enum Found {
    /// A partial file of this length, and the hasher over it.
    Partial(u64, Box<blake3::Hasher>),
    /// A complete file of the offered size under the final name, with its hash.
    Same(blake3::Hash),
    /// Nothing usable: start from 0.
    Nothing,
}

/// Paths of one file being received.
pub(crate) struct Target {
    /// The folder the file goes into (created, never through a symlink).
    pub(crate) parent: PathBuf,
    /// The offered file name (last component).
    pub(crate) file_name: String,
    /// The partial file: `NAME.netkit-part` in `parent`.
    pub(crate) part: PathBuf,
    /// Offered relative path of the parent folder ("" at the top).
    rel_parent: String,
}

impl Target {
    /// Creates the parent folders of the validated components `comps` under
    /// `root` (blocking) and names the partial file.
    pub(crate) fn prepare(root: &Path, comps: &[&str]) -> io::Result<Target> {
        let file_name = comps[comps.len() - 1].to_string();
        let rel_parent = comps[..comps.len() - 1].join("/");
        let parent = names::ensure_parents(root, comps)?;
        let part = parent.join(names::part_name(&file_name));
        Ok(Target {
            parent,
            file_name,
            part,
            rel_parent,
        })
    }

    /// The relative path reported for `name` stored in this target's folder.
    pub(crate) fn stored_name(&self, name: &str) -> String {
        if self.rel_parent.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.rel_parent)
        }
    }
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Looks for a partial or an identical file (blocking).
pub(crate) fn inspect(t: &Target, size: Option<u64>) -> io::Result<Found> {
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
                let h = hash_prefix(&f, m.len())?;
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
            Ok(Found::Same(hash_prefix(&f, size)?.finalize()))
        }
        _ => Ok(Found::Nothing),
    }
}

/// Free bytes for unprivileged users on the filesystem holding `dir`.
pub(crate) fn free_space(dir: &Path) -> io::Result<u64> {
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

/// The socket's end of a connection's queue to its disk thread: at most
/// `bytes` of content and `chunks` chunks wait in it, whatever size of
/// frame the sender chose.
pub(crate) struct QueueTx {
    tx: mpsc::Sender<Bytes>,
    room: Arc<Semaphore>,
}

/// The disk thread's end of the queue. Dropping it (the thread ended, on
/// an error too) closes the queue, and a sender waiting for room gets `Err`.
pub(crate) struct QueueRx {
    rx: mpsc::Receiver<Bytes>,
    room: Arc<Semaphore>,
}

/// A queue to a disk thread holding at most `bytes` and `chunks`. It always
/// has room for one largest frame ([`MAX_DATA_FRAME`](super::proto::MAX_DATA_FRAME)),
/// whatever `bytes` says: a frame that could never get room would stop the
/// connection for good. More than a semaphore can count (2^61 bytes, which
/// `--write-queue` accepts) is the same as no byte bound.
pub(crate) fn disk_queue(bytes: usize, chunks: usize) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(chunks);
    let bytes = bytes.clamp(super::proto::MAX_DATA_FRAME, Semaphore::MAX_PERMITS);
    let room = Arc::new(Semaphore::new(bytes));
    (
        QueueTx {
            tx,
            room: room.clone(),
        },
        QueueRx { rx, room },
    )
}

impl QueueTx {
    /// Queues `chunk` (at most [`MAX_DATA_FRAME`](super::proto::MAX_DATA_FRAME)
    /// bytes) once there is room; `Err` once the disk thread has ended.
    pub(crate) async fn send(&self, chunk: Bytes) -> Result<(), ()> {
        let n = u32::try_from(chunk.len()).map_err(|_| ())?;
        self.room.acquire_many(n).await.map_err(|_| ())?.forget();
        self.tx.send(chunk).await.map_err(|_| ())
    }
}

impl QueueRx {
    /// The next chunk, blocking; `None` once the socket's end is dropped and
    /// the queue is empty. Its room is given back by [`QueueRx::done`].
    fn blocking_recv(&mut self) -> Option<Bytes> {
        self.rx.blocking_recv()
    }

    /// Gives back the room of a chunk of `len` bytes that is written.
    fn done(&self, len: usize) {
        self.room.add_permits(len);
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.room.close();
    }
}

/// Hashes each chunk and writes it at its offset (while the chunk is still
/// in this core's cache), leaving holes for all-zero chunks. When the file
/// is to be `durable`, every [`WRITEBACK_STEP`] written is handed to the disk
/// at once (see [`start_writeback`]), so the one fdatasync before the rename
/// finds little left to write. Returns the end offset.
///
/// No fdatasync runs while writing. One every 128 MiB on a thread of its own
/// (what this did before) made a durable 1 GiB transfer 0.96-0.97 x `nc` plus
/// one fsync on this machine's disk when the disk was slow (`dd
/// conv=fdatasync` 365 MB/s): each is a journal commit and a cache flush of
/// the device. Without them: 1.37-1.47 x (bench/results/transfer-2026-11-29.txt).
fn write_loop(
    file: &File,
    mut pos: u64,
    mut rx: QueueRx,
    mut hasher: blake3::Hasher,
    durable: bool,
) -> io::Result<(u64, blake3::Hasher)> {
    let mut writeback = durable.then(|| Writeback::from(pos));
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        if !is_zero(&chunk) {
            write_in_pieces(file, &chunk, pos)?;
        }
        pos += chunk.len() as u64;
        rx.done(chunk.len());
        if let Some(w) = &mut writeback {
            w.written(file, pos);
        }
    }
    Ok((pos, hasher))
}

/// The most one write(2) into the page cache carries. The kernel sizes a
/// page-cache folio after the write that creates it, and on this machine's
/// ext4 (a VM, kernel 6.18) writing 1 GiB cost 1.1-2.3 s of CPU in writes
/// of 64-512 KiB some or all of the time, against 0.47-0.75 s in writes of
/// 16 or 32 KiB every time (`dd bs=...` from tmpfs, alternated; tmpfs itself
/// does not care). `nc` writes 16 KiB. Each extra call costs well under a
/// microsecond.
const WRITE_PIECE: usize = 32 << 10;

/// Writes `buf` at `pos` in [`WRITE_PIECE`] slices.
pub(crate) fn write_in_pieces(file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
    for (i, piece) in buf.chunks(WRITE_PIECE).enumerate() {
        file.write_all_at(piece, pos + (i * WRITE_PIECE) as u64)?;
    }
    Ok(())
}

/// How often the disk thread of a durable transfer asks the kernel to start
/// writing back what it wrote.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Hands what a file's writer wrote to the disk every [`WRITEBACK_STEP`]
/// (see [`start_writeback`]), for a file that ends in an fsync anyway.
pub(crate) struct Writeback {
    /// Where the part not yet handed over starts.
    from: u64,
}

impl Writeback {
    /// For a writer that starts at `pos`.
    pub(crate) fn from(pos: u64) -> Writeback {
        Writeback { from: pos }
    }

    /// The writer has written up to `pos`: starts writeback of what it
    /// wrote since the last time, once that is a step.
    pub(crate) fn written(&mut self, file: &File, pos: u64) {
        if pos - self.from >= WRITEBACK_STEP {
            start_writeback(file, self.from, pos - self.from);
            self.from = pos;
        }
    }
}

/// Starts writeback of `len` bytes at `off` without waiting for it, so the
/// disk writes while the transfer goes on and the final fdatasync finds
/// little left to do. Not for `--no-sync`: there the page cache takes the
/// file as it does for `nc`, and the kernel writes it back when it will.
/// Best effort: errors surface at fdatasync.
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

/// Opens (creating if needed) `part` cut to `start` bytes, then writes the
/// chunks from `rx` after it (see [`write_loop`]) until the queue closes.
/// Returns the file, the end offset and the hasher over everything written.
pub(crate) fn write_part(
    part: &Path,
    start: u64,
    rx: QueueRx,
    hasher: blake3::Hasher,
    durable: bool,
) -> io::Result<(File, u64, blake3::Hasher)> {
    let file = open_part(part, start)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", part.display())))?;
    let (end, hasher) = write_loop(&file, start, rx, hasher, durable)?;
    Ok((file, end, hasher))
}

/// How a verified file is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreRules {
    /// Replace an existing different file.
    pub(crate) overwrite: bool,
    /// Make the data and the rename durable (fdatasync, fsync of the folder).
    pub(crate) durable: bool,
}

/// Stores the verified partial `file` of `len` bytes under its final name
/// (blocking): cut to length, durable, metadata, rename, folder durable.
/// Returns the name it was stored under.
pub(crate) fn store(
    file: File,
    len: u64,
    t: &Target,
    meta: Meta,
    rules: StoreRules,
) -> io::Result<String> {
    set_len_if_other(&file, len)?;
    if rules.durable {
        file.sync_data()?;
    }
    apply_meta(&file, meta)?;
    let name = commit(t, rules.overwrite)?;
    if rules.durable {
        File::open(&t.parent)?.sync_all()?;
    }
    Ok(name)
}

/// Creates the folder named by the validated components `comps` under
/// `root` (blocking), never through a symlink, and applies `meta` to it.
/// A folder that already existed gets the bits it has *and* the offer has:
/// an offer never widens a folder (0700 stays 0700), and a parent folder
/// created earlier with the default mode still gets the offered one.
pub(crate) fn make_dir(root: &Path, comps: &[String], meta: Meta) -> io::Result<()> {
    let c: Vec<&str> = comps.iter().map(|s| s.as_str()).collect();
    let parent = names::ensure_parents(root, &c)?;
    let dir = parent.join(c[c.len() - 1]);
    names::ensure_real_dir(&dir, c[c.len() - 1])?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(&dir)?;
    let has = f.metadata()?.permissions().mode();
    let meta = Meta {
        mode: meta.mode & has,
        ..meta
    };
    apply_meta(&f, meta)
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
    set_len_if_other(&f, start)?;
    Ok(f)
}

/// Cuts or extends `f` to `len` unless it has that length already. A
/// truncate to the length a file has is not free: on ext4 a new file cut
/// to 0 is marked to have its delayed blocks allocated and flushed when it
/// is closed (the replace-by-truncate heuristic), which cost `--no-sync`
/// on this machine's disk the time `nc` does not spend.
fn set_len_if_other(f: &File, len: u64) -> io::Result<()> {
    if f.metadata()?.len() != len {
        f.set_len(len)?;
    }
    Ok(())
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

/// Hashes the first `len` bytes of `file` with BLAKE3 (blocking; run it off the runtime).
pub(crate) fn hash_prefix(file: &File, len: u64) -> io::Result<blake3::Hasher> {
    hash_range(file, blake3::Hasher::new(), 0..len, None)
}

/// Feeds the bytes of `file` in `range` to `h` (blocking), reading CHUNK at
/// a time; gives up with `Interrupted` once `stop` is set.
pub(crate) fn hash_range(
    file: &File,
    mut h: blake3::Hasher,
    range: std::ops::Range<u64>,
    stop: Option<&AtomicBool>,
) -> io::Result<blake3::Hasher> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = range.start;
    while pos < range.end {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "sending stopped",
            ));
        }
        let want = (range.end - pos).min(CHUNK as u64) as usize;
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ended at {pos} bytes, expected {}", range.end),
            ));
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h)
}

/// Reads up to `want` bytes of `file` at `pos` straight into the spare
/// capacity of `buf` (reserved here) and appends them; returns how many (0
/// at the end of the file). Nothing is zeroed first: the senders read every
/// byte they send this way, clear and sealed.
pub(crate) fn pread_append(
    file: &File,
    pos: u64,
    want: usize,
    buf: &mut bytes::BytesMut,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.reserve(want);
    // SAFETY: pread writes at most `want` bytes into the spare capacity,
    // which holds at least that many (reserved above); no reference to the
    // uninitialised bytes is made.
    let n = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buf.spare_capacity_mut().as_mut_ptr().cast(),
            want,
            pos as libc::off_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pread initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Writeback is started once per step written, from where the last one ended.
    #[test]
    fn writeback_is_started_once_a_step_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let mut w = Writeback::from(5);
        w.written(&f, 5 + WRITEBACK_STEP - 1);
        assert_eq!(w.from, 5);
        w.written(&f, 5 + WRITEBACK_STEP);
        assert_eq!(w.from, 5 + WRITEBACK_STEP);
        w.written(&f, 5 + 3 * WRITEBACK_STEP);
        assert_eq!(w.from, 5 + 3 * WRITEBACK_STEP);
    }

    /// The queue holds at most its byte budget: a chunk that does not fit
    /// waits until the disk thread gives back the room of a written one.
    #[tokio::test]
    async fn queue_is_bounded_in_bytes() {
        let (tx, mut rx) = disk_queue(1 << 20, 256);
        tx.send(Bytes::from(vec![1u8; 600 << 10])).await.unwrap();
        let second = tx.send(Bytes::from(vec![2u8; 600 << 10]));
        tokio::pin!(second);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            second.as_mut().poll(&mut cx).is_pending(),
            "1.2 MiB queued past a 1 MiB budget"
        );
        let first = tokio::task::spawn_blocking(move || {
            let c = rx.blocking_recv().unwrap();
            rx.done(c.len());
            (c, rx)
        });
        let (c, mut rx) = first.await.unwrap();
        assert_eq!(c[0], 1);
        second.await.unwrap();
        let c = tokio::task::spawn_blocking(move || rx.blocking_recv().unwrap())
            .await
            .unwrap();
        assert_eq!(c[0], 2);
    }

    /// A buffer written in pieces lands whole at its offset, the last piece short.
    #[test]
    fn pieces_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let buf: Vec<u8> = (0..(3 * WRITE_PIECE + 7))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        f.write_all_at(b"head!", 0).unwrap();
        write_in_pieces(&f, &buf, 5).unwrap();
        let got = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(&got[..5], b"head!");
        assert_eq!(&got[5..], &buf[..]);
    }

    /// A queue configured below one largest frame still takes one.
    #[tokio::test]
    async fn queue_always_has_room_for_one_largest_frame() {
        let (tx, _rx) = disk_queue(1000, 256);
        let frame = Bytes::from(vec![0u8; crate::transfer::proto::MAX_DATA_FRAME]);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let send = tx.send(frame);
        tokio::pin!(send);
        assert!(
            send.as_mut().poll(&mut cx).is_ready(),
            "a 1 MiB frame waited on a 1000-byte queue"
        );
    }

    /// A byte bound past what a semaphore counts (a `--write-queue` of
    /// thousands of TiB) is no bound, not a panic on the first file.
    #[tokio::test]
    async fn queue_larger_than_a_semaphore_counts_is_unbounded_in_bytes() {
        let (tx, _rx) = disk_queue(usize::MAX, 256);
        tx.send(Bytes::from(vec![0u8; 1 << 20])).await.unwrap();
    }

    /// A disk thread that ended (an error) never leaves the socket's end
    /// waiting for room that will not come.
    #[tokio::test]
    async fn queue_fails_once_the_disk_thread_ends() {
        let (tx, rx) = disk_queue(1 << 20, 256);
        tx.send(Bytes::from(vec![0u8; 1 << 20])).await.unwrap();
        drop(rx);
        assert!(tx.send(Bytes::from_static(b"more")).await.is_err());
    }
}

//! A source's content at the sender: hashing it (for a check or a resume),
//! and streaming it as `Data` frames, a file with sendfile(2), a pipe
//! through a reader thread, each hashed on a thread of its own meanwhile.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::info;

use super::{Entry, Source};
use crate::transfer::disk::{hash_prefix, hash_range};
use crate::transfer::progress::Progress;
use crate::transfer::proto::SenderFrame;
use crate::transfer::{CHUNK, Conn, TransferError};

/// Opens a re-readable source (a file, or stdin redirected from one).
fn open_source(src: &Source) -> io::Result<File> {
    match src {
        Source::Path(p) => File::open(p)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", p.display()))),
        Source::StdinFile(f) => f.try_clone(),
        Source::StdinPipe | Source::Dir => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "source cannot be re-read",
        )),
    }
}

/// Hashes the first `size` bytes of a source off the runtime.
pub(super) async fn hash_source(src: &Source, size: u64) -> Result<blake3::Hash, TransferError> {
    let f = open_source(src).map_err(|e| TransferError::Io {
        what: "hashing the source".into(),
        source: e,
    })?;
    tokio::task::spawn_blocking(move || hash_prefix(&f, size).map(|h| h.finalize()))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(|e| TransferError::Io {
            what: "hashing the source".into(),
            source: e,
        })
}

/// Decides where to start: at the receiver's partial length if its prefix
/// hash matches ours, else at 0. Returns the start and the hasher over the prefix.
pub(super) async fn resume_point(
    src: &Source,
    size: Option<u64>,
    offset: u64,
    prefix_hash: [u8; 32],
) -> Result<(u64, blake3::Hasher), TransferError> {
    let Some(size) = size else {
        return Ok((0, blake3::Hasher::new()));
    };
    if offset == 0 || offset > size {
        return Ok((0, blake3::Hasher::new()));
    }
    let f = open_source(src).map_err(|e| TransferError::Io {
        what: "reading the source".into(),
        source: e,
    })?;
    let h = tokio::task::spawn_blocking(move || hash_prefix(&f, offset))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(|e| TransferError::Io {
            what: "hashing the source prefix".into(),
            source: e,
        })?;
    if h.finalize().as_bytes() == &prefix_hash {
        Ok((offset, h))
    } else {
        info!("the receiver's partial file differs from the source; sending from the start");
        Ok((0, blake3::Hasher::new()))
    }
}

/// Reads up to `want` bytes at `pos` (or sequentially for a pipe) into a fresh chunk.
fn read_chunk(src: &mut ChunkSource, pos: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(want);
    match src {
        ChunkSource::File(f) => {
            crate::transfer::disk::pread_append(f, pos, want, &mut buf)?;
        }
        ChunkSource::Pipe(r) => {
            buf.resize(want, 0);
            let n = r.read(&mut buf[..])?;
            buf.truncate(n);
        }
    }
    Ok(buf.freeze())
}

/// Where the reader thread hands each chunk: the hasher and the socket task.
struct Tee {
    data: mpsc::Sender<Bytes>,
    hash: mpsc::Sender<Bytes>,
}

/// Reads `src` from `start` (to `size` if known, else to its end) into `tee`
/// in chunks that end on CHUNK boundaries, so a resumed file lines up again.
/// Returns the bytes read; stops early when either receiver is gone.
fn read_source(
    src: &mut ChunkSource,
    start: u64,
    size: Option<u64>,
    name: &str,
    tee: Tee,
) -> io::Result<u64> {
    let mut pos = start;
    loop {
        let want = match size {
            Some(s) if pos >= s => break,
            Some(s) => ((s - pos).min(CHUNK as u64 - pos % CHUNK as u64)) as usize,
            None => CHUNK,
        };
        let chunk = read_chunk(src, pos, want)?;
        if chunk.is_empty() {
            if let Some(s) = size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name} shrank while sending: ended at {pos} of {s} bytes"),
                ));
            }
            break;
        }
        pos += chunk.len() as u64;
        if tee.hash.blocking_send(chunk.clone()).is_err() || tee.data.blocking_send(chunk).is_err()
        {
            break;
        }
    }
    Ok(pos - start)
}

/// What the reader thread reads chunks from.
enum ChunkSource {
    File(File),
    Pipe(io::Stdin),
}

/// Streams the content from `start`, then sends `Done` with the hash of the
/// whole file. Returns the bytes sent. A file goes out with sendfile(2) while
/// another thread hashes it from the page cache; a pipe goes through a
/// reader thread and a hasher thread.
pub(super) async fn stream_content(
    conn: &mut Conn<TcpStream>,
    entry: &Entry,
    start: u64,
    hasher: blake3::Hasher,
    progress: &Progress,
) -> Result<u64, TransferError> {
    let (sent, hash) = match (&entry.source, entry.offer.size) {
        (Source::Path(_) | Source::StdinFile(_), Some(size)) => {
            stream_file(conn, entry, start, size, hasher, progress).await?
        }
        _ => stream_pipe(conn, entry, start, hasher, progress).await?,
    };
    conn.send(&SenderFrame::Done {
        hash: *hash.as_bytes(),
    })
    .await?;
    Ok(sent)
}

/// Sends `[start, size)` of a regular file with sendfile(2) in CHUNK-aligned
/// frames; hashes the same range on a blocking thread meanwhile.
async fn stream_file(
    conn: &mut Conn<TcpStream>,
    entry: &Entry,
    start: u64,
    size: u64,
    hasher: blake3::Hasher,
    progress: &Progress,
) -> Result<(u64, blake3::Hash), TransferError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let read_err = |e| TransferError::Io {
        what: format!("reading {}", entry.offer.path),
        source: e,
    };
    let file = open_source(&entry.source).map_err(read_err)?;
    let hfile = file.try_clone().map_err(read_err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let hstop = stop.clone();
    let hash_task = tokio::task::spawn_blocking(move || {
        hash_range(&hfile, hasher, start..size, Some(&hstop))
            .map(|h| h.finalize())
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    e.kind(),
                    format!("the file shrank while it was being sent: {e}"),
                ),
                _ => e,
            })
    });
    let mut bar = progress.file(&entry.offer.path, Some(size), start);
    let mut pos = start;
    let frame = conn.file_frame() as u64;
    let sent = async {
        while pos < size {
            // Frames end on CHUNK boundaries so a resumed file lines up again.
            let n = (size - pos).min(frame - pos % CHUNK as u64) as usize;
            conn.send_file_frame(&file, pos, n).await?;
            pos += n as u64;
            bar.inc(n as u64);
        }
        Ok::<_, TransferError>(())
    }
    .await;
    bar.finish();
    if sent.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let hash = hash_task.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    sent?;
    Ok((pos - start, hash.map_err(read_err)?))
}

/// Streams a pipe (or any source read once) as `Data` frames with the reader
/// and the hasher on their own threads.
async fn stream_pipe(
    conn: &mut Conn<TcpStream>,
    entry: &Entry,
    start: u64,
    hasher: blake3::Hasher,
    progress: &Progress,
) -> Result<(u64, blake3::Hash), TransferError> {
    let size = entry.offer.size;
    let mut src = match &entry.source {
        Source::StdinPipe => ChunkSource::Pipe(io::stdin()),
        other => ChunkSource::File(open_source(other).map_err(|e| TransferError::Io {
            what: "reading the source".into(),
            source: e,
        })?),
    };
    let name: Arc<str> = entry.offer.path.as_str().into();
    let (dtx, mut drx) = mpsc::channel::<Bytes>(4);
    let (htx, mut hrx) = mpsc::channel::<Bytes>(8);
    let tee = Tee {
        data: dtx,
        hash: htx,
    };
    let rname = name.clone();
    let reader =
        tokio::task::spawn_blocking(move || read_source(&mut src, start, size, &rname, tee));
    let hash_task = tokio::task::spawn_blocking(move || {
        let mut h = hasher;
        while let Some(c) = hrx.blocking_recv() {
            h.update(&c);
        }
        h.finalize()
    });
    let mut bar = progress.file(&name, size, start);
    let mut sent = 0u64;
    let send_result = async {
        while let Some(chunk) = drx.recv().await {
            conn.send_data(&chunk).await?;
            sent += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        Ok::<_, TransferError>(())
    }
    .await;
    drop(drx);
    bar.finish();
    let read = reader.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    let hash = hash_task.await.map_err(|e| TransferError::Io {
        what: "hashing".into(),
        source: io::Error::other(e),
    })?;
    send_result?;
    let read = read.map_err(|e| TransferError::Io {
        what: format!("reading {name}"),
        source: e,
    })?;
    debug_assert_eq!(read, sent);
    Ok((sent, hash))
}

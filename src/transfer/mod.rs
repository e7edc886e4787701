//! Verified, resumable file and directory transfer: `netkit send` and
//! `netkit recv` (also the file drop of `netkit serve`).
//!
//! - [`proto`]: the frames and preamble, sans-IO, with hard limits.
//! - [`names`]: validation of untrusted names and safe folder creation.
//! - [`send`] and [`recv`]: the two ends over TCP.
//! - [`progress`]: bars on a terminal, plain lines otherwise.
//!
//! The content of each file travels in `Data` frames; both ends hash it with
//! BLAKE3 on a separate thread while the socket and the disk are busy, and
//! the receiver stores a file under its final name only after the hashes
//! match and the data is durable. The wire format is in
//! `docs/transfer-protocol.md`.

pub mod names;
pub mod progress;
pub mod proto;
pub mod recv;
pub mod send;

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use proto::{HEADER_LEN, PREAMBLE_LEN, Preamble, ProtoError, ReceiverFrame, SenderFrame};

/// Size of the chunks read from disk and sent as `Data` frames.
pub const CHUNK: usize = 128 * 1024;

/// Why a transfer session ended early.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The peer sent nothing for too long.
    #[error("peer sent nothing for {} while {what} — it stalled or is not a netkit peer; raise --timeout for slow links", humantime::format_duration(*after))]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection while {0}")]
    Closed(&'static str),
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The peer reported a fatal error.
    #[error("peer reported: {0}")]
    Peer(String),
    /// A valid frame, but not one allowed at this point.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// The peer broke a rule of the protocol (size, offsets).
    #[error("protocol violation: {0}")]
    Violation(String),
}

impl TransferError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        TransferError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The outcome of one file or folder, for logs, `--json` and exit codes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileReport {
    /// The name as offered by the sender.
    pub name: String,
    /// The name it was stored under (may be `name (1).ext`), when stored or skipped.
    pub stored_as: Option<String>,
    /// `"file"` or `"dir"`.
    pub kind: &'static str,
    /// Size of the file in bytes (bytes received for a stream of unknown size).
    pub size: u64,
    /// Bytes that crossed the network for this file.
    pub transferred: u64,
    /// Offset the content resumed from (0 for a fresh transfer).
    pub resumed_from: u64,
    /// `stored`, `skipped`, `rejected` or `failed`.
    pub verdict: Verdict,
    /// Why, for `rejected` and `failed`.
    pub reason: Option<String>,
    /// Seconds from offer to confirmation.
    pub seconds: f64,
    /// Transferred bytes per second, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

/// What became of an offered entry.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Stored durably under its final name.
    Stored,
    /// An identical file was already there.
    Skipped,
    /// Refused before any content was sent.
    Rejected,
    /// Content was sent but not stored.
    Failed,
}

impl Verdict {
    /// True when the entry is safely at the receiver.
    pub fn confirmed(self) -> bool {
        matches!(self, Verdict::Stored | Verdict::Skipped)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Stored => "stored",
            Verdict::Skipped => "skipped",
            Verdict::Rejected => "rejected",
            Verdict::Failed => "failed",
        })
    }
}

impl FileReport {
    /// A one-line human summary.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<8} {} ({} bytes",
            self.verdict.to_string(),
            self.name,
            self.size
        );
        if self.resumed_from > 0 {
            s.push_str(&format!(", resumed at {}", self.resumed_from));
        }
        if self.transferred > 0 {
            s.push_str(&format!(", {:.1} MB/s", self.mb_per_s));
        }
        s.push(')');
        if let Some(n) = &self.stored_as
            && n != &self.name
        {
            s.push_str(&format!(" as {n}"));
        }
        if let Some(r) = &self.reason {
            s.push_str(&format!(": {r}"));
        }
        s
    }
}

fn rate(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

/// One framed connection: buffered reads with a timeout on each, frame encoding on writes.
pub(crate) struct Conn<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    timeout: Duration,
    /// Extra time allowed for the next read, while the peer hashes a file.
    extra: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(crate) fn new(stream: S, timeout: Duration) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            timeout,
            extra: Duration::ZERO,
        }
    }

    /// Reads more bytes, at most `max`. Frame reads pass the rest of the
    /// current frame plus one header, so a `Data` payload ends its own
    /// buffer and is handed on without a copy.
    async fn fill(&mut self, what: &'static str, max: usize) -> Result<(), TransferError> {
        let t = self.timeout + self.extra;
        use bytes::BufMut;
        let max = max.max(1);
        self.rbuf.reserve(max);
        let mut limited = (&mut self.rbuf).limit(max);
        let read = self.stream.read_buf(&mut limited);
        match tokio::time::timeout(t, read).await {
            Err(_) => Err(TransferError::Timeout { what, after: t }),
            Ok(Ok(0)) => Err(TransferError::Closed(what)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(TransferError::io(format!("reading from peer ({what})"), e)),
        }
    }

    /// Sends our preamble.
    pub(crate) async fn write_preamble(&mut self) -> Result<(), TransferError> {
        let p = Preamble::OURS.encode();
        self.write_raw(&p).await
    }

    /// Reads the peer's preamble and checks that it is compatible.
    pub(crate) async fn read_preamble(&mut self) -> Result<Preamble, TransferError> {
        while self.rbuf.len() < PREAMBLE_LEN {
            let missing = PREAMBLE_LEN - self.rbuf.len();
            self.fill("waiting for the netkit handshake", missing)
                .await?;
        }
        let raw: [u8; PREAMBLE_LEN] = self.rbuf.split_to(PREAMBLE_LEN)[..].try_into().unwrap();
        let p = Preamble::decode(&raw)?;
        p.check_compatible()?;
        Ok(p)
    }

    async fn read_with<F>(
        &mut self,
        what: &'static str,
        decode: fn(&mut BytesMut) -> Result<Option<F>, ProtoError>,
    ) -> Result<F, TransferError> {
        loop {
            if let Some(f) = decode(&mut self.rbuf)? {
                return Ok(f);
            }
            let need = proto::bytes_needed(&self.rbuf);
            self.fill(what, need + HEADER_LEN).await?;
        }
    }

    /// Reads one frame sent by a sender, allowing the peer `extra` time
    /// beyond the timeout (it may be hashing a large file first).
    pub(crate) async fn read_sender_after_hashing(
        &mut self,
        what: &'static str,
        hashed_bytes: u64,
    ) -> Result<SenderFrame, TransferError> {
        self.extra = hashing_allowance(hashed_bytes);
        let r = self.read_with(what, SenderFrame::decode).await;
        self.extra = Duration::ZERO;
        r
    }

    /// Reads one frame sent by a receiver, allowing it time to hash `hashed_bytes` first.
    pub(crate) async fn read_receiver_after_hashing(
        &mut self,
        what: &'static str,
        hashed_bytes: u64,
    ) -> Result<ReceiverFrame, TransferError> {
        self.extra = hashing_allowance(hashed_bytes);
        let r = self.read_with(what, ReceiverFrame::decode).await;
        self.extra = Duration::ZERO;
        r
    }

    /// Reads one frame sent by a sender.
    pub(crate) async fn read_sender(
        &mut self,
        what: &'static str,
    ) -> Result<SenderFrame, TransferError> {
        self.read_with(what, SenderFrame::decode).await
    }

    /// Reads one frame sent by a receiver.
    pub(crate) async fn read_receiver(
        &mut self,
        what: &'static str,
    ) -> Result<ReceiverFrame, TransferError> {
        self.read_with(what, ReceiverFrame::decode).await
    }

    async fn write_raw(&mut self, b: &[u8]) -> Result<(), TransferError> {
        let t = self.timeout;
        finish_write(tokio::time::timeout(t, self.stream.write_all(b)).await, t)
    }

    /// Sends a frame from the sender side.
    pub(crate) async fn send_sender(&mut self, f: &SenderFrame) -> Result<(), TransferError> {
        self.wbuf.clear();
        f.encode(&mut self.wbuf);
        let b = self.wbuf.split().freeze();
        self.write_raw(&b).await
    }

    /// Sends a frame from the receiver side.
    pub(crate) async fn send_receiver(&mut self, f: &ReceiverFrame) -> Result<(), TransferError> {
        self.wbuf.clear();
        f.encode(&mut self.wbuf);
        let b = self.wbuf.split().freeze();
        self.write_raw(&b).await
    }

    /// Sends a `Data` frame: header and payload in one vectored write, without copying.
    pub(crate) async fn send_data(&mut self, chunk: &Bytes) -> Result<(), TransferError> {
        use bytes::Buf;
        let header = Bytes::copy_from_slice(&proto::data_header(chunk.len()));
        let mut both = header.chain(chunk.clone());
        debug_assert_eq!(both.remaining(), HEADER_LEN + chunk.len());
        let t = self.timeout;
        finish_write(
            tokio::time::timeout(t, self.stream.write_all_buf(&mut both)).await,
            t,
        )
    }

    /// Flushes and shuts down the write half (best effort).
    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
    }
}

/// Time a peer may need to hash `bytes` (at a pessimistic 50 MB/s) before
/// it answers; added to the read timeout so a large resume does not time out.
pub(crate) fn hashing_allowance(bytes: u64) -> Duration {
    Duration::from_secs(bytes / 50_000_000)
}

fn finish_write(
    r: Result<io::Result<()>, tokio::time::error::Elapsed>,
    t: Duration,
) -> Result<(), TransferError> {
    match r {
        Err(_) => Err(TransferError::Timeout {
            what: "writing (the peer stopped reading)",
            after: t,
        }),
        Ok(Err(e)) => Err(TransferError::io("writing to peer", e)),
        Ok(Ok(())) => Ok(()),
    }
}

impl Conn<tokio::net::TcpStream> {
    /// Sends `len` bytes of `file` from `pos` as one `Data` frame, with
    /// sendfile(2): the content goes from the page cache to the socket
    /// without a copy through this process.
    pub(crate) async fn send_file_frame(
        &mut self,
        file: &std::fs::File,
        pos: u64,
        len: usize,
    ) -> Result<(), TransferError> {
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;
        self.write_raw(&proto::data_header(len)).await?;
        let mut off = libc::off_t::try_from(pos).map_err(|_| {
            TransferError::io(
                "sending file content",
                io::Error::new(io::ErrorKind::InvalidInput, "offset too large"),
            )
        })?;
        let mut left = len;
        while left > 0 {
            let t = self.timeout;
            match tokio::time::timeout(t, self.stream.writable()).await {
                Err(_) => {
                    return Err(TransferError::Timeout {
                        what: "writing (the peer stopped reading)",
                        after: t,
                    });
                }
                Ok(Err(e)) => return Err(TransferError::io("writing to peer", e)),
                Ok(Ok(())) => {}
            }
            let sock = self.stream.as_raw_fd();
            let r = self.stream.try_io(Interest::WRITABLE, || {
                // SAFETY: both descriptors are open for the duration of the
                // call; sendfile only reads `off` and writes it back.
                let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut off, left) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(0) => {
                    return Err(TransferError::io(
                        "reading the source",
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the file shrank while it was being sent",
                        ),
                    ));
                }
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(TransferError::io("sending file content", e)),
            }
        }
        Ok(())
    }
}

/// Describes a frame for an error message without dumping its content.
pub(crate) fn describe_sender(f: &SenderFrame) -> String {
    match f {
        SenderFrame::Offer(o) => format!("Offer({:?})", o.path),
        SenderFrame::Start { offset } => format!("Start({offset})"),
        SenderFrame::Same => "Same".into(),
        SenderFrame::Data(d) => format!("Data({} bytes)", d.len()),
        SenderFrame::Done { .. } => "Done".into(),
        SenderFrame::Bye => "Bye".into(),
        SenderFrame::Error { reason } => format!("Error({reason})"),
    }
}

/// Describes a frame for an error message.
pub(crate) fn describe_receiver(f: &ReceiverFrame) -> String {
    match f {
        ReceiverFrame::Accept { offset, .. } => format!("Accept({offset})"),
        ReceiverFrame::Check { .. } => "Check".into(),
        ReceiverFrame::Reject { reason } => format!("Reject({reason})"),
        ReceiverFrame::Stored { name, .. } => format!("Stored({name})"),
        ReceiverFrame::Skipped { name } => format!("Skipped({name})"),
        ReceiverFrame::Failed { reason } => format!("Failed({reason})"),
        ReceiverFrame::Error { reason } => format!("Error({reason})"),
    }
}

/// Keeps freed chunk buffers in the heap for reuse instead of returning
/// them to the kernel (glibc would mmap/munmap every chunk of 128 KiB and
/// more, and every new mapping costs a page fault per 4 KiB). Peak memory is
/// unchanged: it is bounded by the chunks in flight.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any transfer starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Hashes the first `len` bytes of `file` with BLAKE3 (blocking; run it off the runtime).
pub(crate) fn hash_prefix(file: &std::fs::File, len: u64) -> io::Result<blake3::Hasher> {
    use std::os::unix::fs::FileExt;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(CHUNK as u64) as usize;
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ended at {pos} bytes, expected {len}"),
            ));
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h)
}

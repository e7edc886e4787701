//! One framed transfer connection: buffered reads with a timeout on each,
//! one generic read and one generic send for both ends' frames, `Data`
//! frames without a copy, and sendfile(2) for file content. With a code
//! (`sealed`), a SPAKE2 handshake follows the preambles and every byte after
//! it travels in sealed records.

mod sealed;

pub use sealed::CodeAuth;

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TransferError;
use super::proto::{
    self, HEADER_LEN, PREAMBLE_LEN, Preamble, ProtoError, ReceiverFrame, SenderFrame,
};

/// What a connection is doing until both preambles are in.
pub(crate) const HANDSHAKE: &str = "waiting for the netkit handshake";

/// A frame one end sends: [`SenderFrame`] or [`ReceiverFrame`].
pub(crate) trait Frame: Sized {
    /// Decodes one frame from the front of `buf`, if it is complete.
    fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ProtoError>;
    /// Appends the encoded frame to `out`.
    fn encode(&self, out: &mut BytesMut);
    /// Names the frame for an error message without dumping its content.
    fn describe(&self) -> String;
}

/// One framed connection: buffered reads with a timeout on each, frame encoding on writes.
pub(crate) struct Conn<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    timeout: Duration,
    /// Extra time allowed for the next read, while the peer hashes a file.
    extra: Duration,
    /// The code this end requires, if any (set before the preambles).
    code: Option<CodeAuth>,
    /// Sealing state once the code handshake succeeded.
    sealed: Option<Box<sealed::SealedIo>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A connection over `stream` with `timeout` on every read and write.
    pub(crate) fn new(stream: S, timeout: Duration) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            timeout,
            extra: Duration::ZERO,
            code: None,
            sealed: None,
        }
    }

    /// Requires the code handshake (`auth`) after the preambles: nothing but
    /// the handshake is read or sent before the peer proved it knows the code.
    pub(crate) fn require_code(&mut self, auth: Option<CodeAuth>) {
        self.code = auth;
    }

    /// Reads more bytes, at most `max`. Frame reads pass the rest of the
    /// current frame plus one header, so a `Data` payload ends its own
    /// buffer and is handed on without a copy.
    async fn fill(&mut self, what: &'static str, max: usize) -> Result<(), TransferError> {
        if self.sealed.is_some() {
            return self.fill_sealed(what).await;
        }
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
        let p = match self.code {
            Some(_) => sealed::CODE_PREAMBLE.encode(),
            None => Preamble::OURS.encode(),
        };
        self.write_raw(&p).await
    }

    /// Reads the peer's preamble and checks that it is compatible; with a
    /// code, runs the handshake and seals the connection.
    pub(crate) async fn read_preamble(&mut self) -> Result<Preamble, TransferError> {
        while self.rbuf.len() < PREAMBLE_LEN {
            let missing = PREAMBLE_LEN - self.rbuf.len();
            self.fill(HANDSHAKE, missing).await?;
        }
        let raw: [u8; PREAMBLE_LEN] = self.rbuf.split_to(PREAMBLE_LEN)[..].try_into().unwrap();
        let p = Preamble::decode(&raw)?;
        self.check_auth(&p)?;
        if let Some(auth) = self.code.clone() {
            self.code_handshake(auth).await?;
        }
        Ok(p)
    }

    /// Reads one frame of type `F` (a [`SenderFrame`] or a [`ReceiverFrame`]).
    /// After [`Conn::allow_hashing`], this read waits longer.
    pub(crate) async fn read<F: Frame>(&mut self, what: &'static str) -> Result<F, TransferError> {
        let r = async {
            loop {
                if let Some(f) = F::decode(&mut self.rbuf)? {
                    return Ok(f);
                }
                let need = proto::bytes_needed(&self.rbuf);
                self.fill(what, need + HEADER_LEN).await?;
            }
        }
        .await;
        self.extra = Duration::ZERO;
        r
    }

    /// The largest `Data` frame to make of a regular file on this
    /// connection: [`FILE_FRAME`](crate::transfer::FILE_FRAME) in the clear,
    /// one record ([`CHUNK`](crate::transfer::CHUNK)) when sealed.
    pub(crate) fn file_frame(&self) -> usize {
        if self.sealed.is_some() {
            crate::transfer::CHUNK
        } else {
            crate::transfer::FILE_FRAME
        }
    }

    /// Gives the next [`Conn::read`] extra time: the peer hashes
    /// `hashed_bytes` (a partial or existing file) before it answers.
    pub(crate) fn allow_hashing(&mut self, hashed_bytes: u64) {
        self.extra = hashing_allowance(hashed_bytes);
    }

    async fn write_raw(&mut self, b: &[u8]) -> Result<(), TransferError> {
        if self.sealed.is_some() {
            return self.write_sealed(&[b], false).await;
        }
        let t = self.timeout;
        finish_write(tokio::time::timeout(t, self.stream.write_all(b)).await, t)
    }

    /// Sends one frame (a [`SenderFrame`] or a [`ReceiverFrame`]).
    pub(crate) async fn send<F: Frame>(&mut self, f: &F) -> Result<(), TransferError> {
        self.wbuf.clear();
        f.encode(&mut self.wbuf);
        let b = self.wbuf.split().freeze();
        self.write_raw(&b).await
    }

    /// Sends a `Data` frame: header and payload in one vectored write, without copying.
    pub(crate) async fn send_data(&mut self, chunk: &Bytes) -> Result<(), TransferError> {
        use bytes::Buf;
        if self.sealed.is_some() {
            return self
                .write_sealed(&[&proto::data_header(chunk.len()), chunk], false)
                .await;
        }
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
        if self.sealed.is_some() {
            // The last record tells the peer the stream ended here, not cut.
            let _ = self.write_sealed(&[], true).await;
        }
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
    }
}

/// Time a peer may need to hash `bytes` (at a pessimistic 50 MB/s) before
/// it answers; added to the read timeout so a large resume does not time out.
fn hashing_allowance(bytes: u64) -> Duration {
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
        if self.sealed.is_some() {
            return self.send_file_sealed(file, pos, len).await;
        }
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

impl Frame for SenderFrame {
    fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ProtoError> {
        SenderFrame::decode(buf)
    }

    fn encode(&self, out: &mut BytesMut) {
        SenderFrame::encode(self, out)
    }

    fn describe(&self) -> String {
        match self {
            SenderFrame::Offer(o) => format!("Offer({:?})", o.path),
            SenderFrame::Start { offset } => format!("Start({offset})"),
            SenderFrame::Same => "Same".into(),
            SenderFrame::Data(d) => format!("Data({} bytes)", d.len()),
            SenderFrame::Done { .. } => "Done".into(),
            SenderFrame::Bye => "Bye".into(),
            SenderFrame::Room { room, .. } => format!("Room({room:?})"),
            SenderFrame::Error { reason } => format!("Error({reason})"),
        }
    }
}

impl Frame for ReceiverFrame {
    fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ProtoError> {
        ReceiverFrame::decode(buf)
    }

    fn encode(&self, out: &mut BytesMut) {
        ReceiverFrame::encode(self, out)
    }

    fn describe(&self) -> String {
        match self {
            ReceiverFrame::Accept { offset, .. } => format!("Accept({offset})"),
            ReceiverFrame::Check { .. } => "Check".into(),
            ReceiverFrame::Reject { reason } => format!("Reject({reason})"),
            ReceiverFrame::Stored { name, .. } => format!("Stored({name})"),
            ReceiverFrame::Skipped { name } => format!("Skipped({name})"),
            ReceiverFrame::Failed { reason } => format!("Failed({reason})"),
            ReceiverFrame::Error { reason } => format!("Error({reason})"),
        }
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

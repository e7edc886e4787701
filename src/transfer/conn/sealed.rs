//! The code mode of a [`Conn`]: the SPAKE2 handshake right after the
//! preambles, then every byte both ways in sealed records (`seal.rs`).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Conn, finish_write};
use crate::transfer::TransferError;
use crate::transfer::pake::{
    self, AUTH_SPAKE2, CONFIRM_LEN, FRAME_CONFIRM, FRAME_PAKE, Handshake, PAKE_MSG_LEN, Role,
};
use crate::transfer::proto::{self, HEADER_LEN, Preamble};
use crate::transfer::seal::{Opener, Sealer};

/// This end's part in a code handshake: its role and the shared password.
#[derive(Clone)]
pub struct CodeAuth {
    role: Role,
    password: Arc<[u8]>,
}

impl CodeAuth {
    /// `role`'s side of a handshake with `password` (a code, or a password file's content).
    pub fn new(role: Role, password: impl AsRef<[u8]>) -> CodeAuth {
        CodeAuth {
            role,
            password: password.as_ref().into(),
        }
    }

    /// The password of a password file: its content without the final line break.
    pub fn read_password_file(role: Role, path: &std::path::Path) -> anyhow::Result<CodeAuth> {
        use anyhow::Context;
        let raw = std::fs::read(path)
            .with_context(|| format!("reading the password file {}", path.display()))?;
        let pw = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let pw = pw.strip_suffix(b"\r").unwrap_or(pw);
        if pw.is_empty() {
            anyhow::bail!("the password file {} is empty", path.display());
        }
        Ok(CodeAuth::new(role, pw))
    }
}

impl std::fmt::Debug for CodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CodeAuth({:?}, …)", self.role)
    }
}

/// The preamble of a connection that uses a code.
pub(crate) const CODE_PREAMBLE: Preamble = Preamble {
    version: pake::PAKE_VERSION,
    auth: AUTH_SPAKE2,
};

/// Both directions of a sealed connection and the raw bytes read so far.
pub(crate) struct SealedIo {
    sealer: Sealer,
    opener: Opener,
    raw: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Checks the peer's preamble against this end's mode (code or none)
    /// and gives an error that says which side needs what.
    pub(super) fn check_auth(&self, peer: &Preamble) -> Result<(), TransferError> {
        match (&self.code, peer.auth) {
            (Some(_), AUTH_SPAKE2) if peer.version == pake::PAKE_VERSION => Ok(()),
            (Some(_), _) => Err(TransferError::Violation(format!(
                "the peer does not use a code (protocol version {}, auth method {}) — give it the same code (--code), or upgrade it if it is older",
                peer.version, peer.auth
            ))),
            (None, AUTH_SPAKE2) if peer.version == pake::PAKE_VERSION => Err(TransferError::Violation(
                "the peer uses a code but this side has none — pass the same code (--code CODE, or --password-file)".into(),
            )),
            (None, _) => Ok(peer.check_compatible()?),
        }
    }

    /// Runs the SPAKE2 handshake and key confirmation, then seals the connection.
    pub(super) async fn code_handshake(&mut self, auth: CodeAuth) -> Result<(), TransferError> {
        let hs = Handshake::start(auth.role, &auth.password, rand_core::OsRng);
        self.write_raw(&handshake_frame(FRAME_PAKE, hs.message()))
            .await?;
        let peer = self.read_handshake_frame(FRAME_PAKE, PAKE_MSG_LEN).await?;
        let unconfirmed = hs.finish(&peer)?;
        self.write_raw(&handshake_frame(FRAME_CONFIRM, &unconfirmed.confirmation()))
            .await?;
        let mac = self
            .read_handshake_frame(FRAME_CONFIRM, CONFIRM_LEN)
            .await
            .map_err(|e| match e {
                // The peer closes at once when our confirmation is wrong.
                TransferError::Closed(_) => pake::PakeError::WrongCode.into(),
                e => e,
            })?;
        let keys = unconfirmed.verify(&mac)?;
        self.sealed = Some(Box::new(SealedIo {
            sealer: Sealer::new(&keys.send),
            opener: Opener::new(&keys.recv),
            raw: std::mem::take(&mut self.rbuf),
            out: BytesMut::with_capacity(crate::transfer::CHUNK + 64),
        }));
        Ok(())
    }

    /// Reads one handshake frame of type `ty` with a payload of exactly `len` bytes.
    async fn read_handshake_frame(&mut self, ty: u8, len: usize) -> Result<Vec<u8>, TransferError> {
        let what = "waiting for the code handshake";
        while self.rbuf.len() < HEADER_LEN + len {
            let missing = HEADER_LEN + len - self.rbuf.len();
            self.fill(what, missing).await?;
        }
        let got_len = u32::from_be_bytes(self.rbuf[1..5].try_into().unwrap()) as usize;
        if self.rbuf[0] != ty || got_len != len {
            return Err(TransferError::Violation(format!(
                "expected code handshake frame {ty:#04x} of {len} bytes, got type {:#04x} of {got_len} bytes",
                self.rbuf[0]
            )));
        }
        let frame = self.rbuf.split_to(HEADER_LEN + len);
        Ok(frame[HEADER_LEN..].to_vec())
    }

    /// Reads and opens records until at least one plaintext byte is in `rbuf`.
    pub(super) async fn fill_sealed(&mut self, what: &'static str) -> Result<(), TransferError> {
        let t = self.timeout + self.extra;
        let io = self.sealed.as_mut().expect("sealed connection");
        loop {
            if let Some(rec) = io.opener.open(&mut io.raw)? {
                if rec.plain.is_empty() && !rec.last {
                    continue;
                }
                self.rbuf.unsplit(rec.plain);
                if self.rbuf.is_empty() {
                    // The peer's last record, empty: the end of its stream.
                    return Err(TransferError::Closed(what));
                }
                return Ok(());
            }
            let need = Opener::bytes_needed(&io.raw).max(1);
            io.raw.reserve(need);
            let mut limited = (&mut io.raw).limit(need.max(64 * 1024));
            let read = self.stream.read_buf(&mut limited);
            match tokio::time::timeout(t, read).await {
                Err(_) => return Err(TransferError::Timeout { what, after: t }),
                Ok(Ok(0)) => {
                    io.opener.finish(&io.raw)?;
                    return Err(TransferError::Closed(what));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(TransferError::io(format!("reading from peer ({what})"), e));
                }
            }
        }
    }

    /// Seals `parts` as one record (`last`: the end of our stream) and writes it.
    pub(super) async fn write_sealed(
        &mut self,
        parts: &[&[u8]],
        last: bool,
    ) -> Result<(), TransferError> {
        let io = self.sealed.as_mut().expect("sealed connection");
        io.out.clear();
        io.sealer.seal_parts(parts, last, &mut io.out)?;
        let t = self.timeout;
        finish_write(
            tokio::time::timeout(t, self.stream.write_all(&io.out)).await,
            t,
        )
    }
    /// [`Conn::send_file_frame`] on a sealed connection: the content has to
    /// pass through this process to be sealed, so `len` bytes of `file` at
    /// `pos` are read straight into the record being built (no buffer of
    /// their own, no second copy), sealed where they lie, and written.
    pub(super) async fn send_file_sealed(
        &mut self,
        file: &std::fs::File,
        pos: u64,
        len: usize,
    ) -> Result<(), TransferError> {
        let io = self.sealed.as_mut().expect("sealed connection");
        io.out.clear();
        let start = Sealer::begin(&mut io.out, HEADER_LEN + len);
        io.out.put_slice(&proto::data_header(len));
        if let Err(e) = read_exact_at_into(file, pos, len, &mut io.out) {
            return Err(TransferError::io("reading the source", e));
        }
        io.sealer.seal_in_place(&mut io.out, start, false)?;
        let t = self.timeout;
        finish_write(
            tokio::time::timeout(t, self.stream.write_all(&io.out)).await,
            t,
        )
    }
}

/// Appends exactly `len` bytes of `file` at `pos` to `buf`, read straight
/// into its spare capacity (no zeroing of the room first).
fn read_exact_at_into(
    file: &std::fs::File,
    pos: u64,
    len: usize,
    buf: &mut BytesMut,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match crate::transfer::disk::pread_append(file, pos + done as u64, len - done, buf) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being sent",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One handshake frame: the usual 5-byte header and the payload.
fn handshake_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.put_u8(ty);
    f.put_u32(payload.len() as u32);
    f.put_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_range_is_appended_without_zeroing_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut buf = BytesMut::from(&b"head"[..]);
        read_exact_at_into(&file, 1000, 200_000, &mut buf).unwrap();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &content[1000..201_000]);
        // Asking past the end: the shrink error, and nothing claimed beyond what was read.
        let mut buf = BytesMut::new();
        let e = read_exact_at_into(&file, 250_000, 100_000, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("shrank"));
        assert_eq!(&buf[..], &content[250_000..]);
    }
}

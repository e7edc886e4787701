//! The socket a WebSocket session reads and writes, taken back from hyper
//! after the upgrade and registered with the runtime the session runs on
//! (the connection was served on one of the HTTP door's event loops,
//! `crate::http::loops`): the hub wakes the session's writer from its own
//! thread, and readiness for a socket kept on a loop would wake that loop's
//! thread for nothing but to pass it on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;

use crate::tls::ServerStream;

/// The upgraded connection: the door's own stream (plain TCP moved to the
/// current runtime; TLS as it was) after the bytes hyper had read past the
/// upgrade request, or hyper's `Upgraded` when the stream is of another type.
pub struct WsIo {
    /// Read before the stream: what hyper had buffered.
    prefix: Bytes,
    io: Either<ServerStream, TokioIo<Upgraded>>,
}

impl WsIo {
    /// Takes the connection back from hyper. Call it on the runtime the
    /// session runs on: a plain TCP stream is registered there. Fails when
    /// the socket cannot be registered (then it is closed).
    pub fn take(upgraded: Upgraded) -> io::Result<WsIo> {
        Ok(match upgraded.downcast::<TokioIo<ServerStream>>() {
            Ok(parts) => {
                let io = match parts.io.into_inner() {
                    // into_std deregisters it from the loop; from_std registers it here.
                    Either::Right(tcp) => {
                        Either::Right(tokio::net::TcpStream::from_std(tcp.into_std()?)?)
                    }
                    tls => tls,
                };
                WsIo {
                    // Almost always empty, but a slice of hyper's read
                    // buffer: kept as is, it would hold those 8 KiB for the
                    // whole session.
                    prefix: Bytes::copy_from_slice(&parts.read_buf),
                    io: Either::Left(io),
                }
            }
            Err(upgraded) => WsIo {
                prefix: Bytes::new(),
                io: Either::Right(TokioIo::new(upgraded)),
            },
        })
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

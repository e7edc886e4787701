//! UDP: a datagram server and a client that retransmits.

pub mod client;
pub mod server;

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// One received datagram: where it came from, and whether it was cut.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes placed in the buffer.
    pub len: usize,
    /// The datagram's real size when it was larger than the buffer.
    pub truncated_from: Option<usize>,
    /// The sender.
    pub peer: SocketAddr,
}

/// Receives one datagram into `buf`, reporting truncation instead of hiding it.
///
/// On Linux, `MSG_TRUNC` makes the kernel return a datagram's real length even
/// when the buffer was smaller, so a cut datagram is detected and measured.
pub async fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    loop {
        socket.readable().await?;
        let res = socket.try_io(Interest::READABLE, || {
            let sock = socket2::SockRef::from(socket);
            // SAFETY: an initialised `[u8]` is a valid `[MaybeUninit<u8>]`, and
            // the kernel only writes initialised bytes into it.
            let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
            sock.recv_from_with_flags(uninit, libc::MSG_TRUNC)
        });
        match res {
            Ok((n, addr)) => {
                let peer = addr
                    .as_socket()
                    .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
                let cap = buf.len();
                return Ok(Received {
                    len: n.min(cap),
                    truncated_from: (n > cap).then_some(n),
                    peer,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

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

/// Asks the kernel to keep the ICMP errors that datagrams sent from `socket`
/// draw (`IP_RECVERR`, `IPV6_RECVERR`), so that [`take_unreachable`] can tell
/// which destinations have no socket bound. Without it Linux drops them for
/// an unconnected socket.
///
/// While an error is pending, the socket's next receive *or send* fails with
/// it (the datagram is not sent): callers drain with [`take_unreachable`] and
/// retry the send.
pub fn enable_error_queue(socket: &UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = if socket.local_addr()?.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid fd, and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until ICMP errors are queued on `socket` (see
/// [`enable_error_queue`]), then drains them: the destinations that answered
/// "port unreachable". Receives and sends on the socket may go on meanwhile.
pub async fn next_unreachable(socket: &UdpSocket) -> io::Result<Vec<SocketAddr>> {
    loop {
        socket.ready(Interest::ERROR).await?;
        let mut got = Vec::new();
        // Draining inside `try_io` clears the error readiness for the next wait.
        let _ = socket.try_io(Interest::ERROR, || {
            got = take_unreachable(socket);
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        if !got.is_empty() {
            return Ok(got);
        }
    }
}

/// Drains `socket`'s error queue (see [`enable_error_queue`]) and returns
/// the destinations that answered with ICMP "port unreachable", in order,
/// repeats included. Other errors (host unreachable, too big) are dropped.
pub fn take_unreachable(socket: &UdpSocket) -> Vec<SocketAddr> {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let mut out = Vec::new();
    // Bounded: the queue is bounded by the receive buffer anyway.
    for _ in 0..4096 {
        let mut name = socket2::SockAddrStorage::zeroed();
        let mut data = [0u8; 64];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_namelen = name.size_of();
        msg.msg_name = (&mut name as *mut socket2::SockAddrStorage).cast();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` points at a live buffer of the stated size.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break; // EAGAIN: the queue is empty
        }
        let mut refused = false;
        // SAFETY: the kernel filled `control` with `msg_controllen` bytes of
        // cmsgs; the CMSG_* walk stays inside them, and the payload of an
        // IP(V6)_RECVERR cmsg is a sock_extended_err (read unaligned).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
                if (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                    || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR)
                {
                    let ee = std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const libc::sock_extended_err
                    );
                    refused |= ee.ee_errno == libc::ECONNREFUSED as u32
                        && (ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                            || ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if !refused {
            continue;
        }
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes.
        let addr = unsafe { socket2::SockAddr::new(name, msg.msg_namelen) };
        if let Some(addr) = addr.as_socket() {
            out.push(addr);
        }
    }
    out
}

#[cfg(test)]
mod error_queue_tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_send_to_an_unbound_port_is_reported_with_its_destination() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable_error_queue(&socket).unwrap();
        // A port that was just free: bind it, note it, let it go.
        let dead = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let live = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(b"anyone?", dead).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), next_unreachable(&socket))
            .await
            .expect("the ICMP error arrives");
        assert_eq!(got.unwrap(), vec![dead]);
        assert!(take_unreachable(&socket).is_empty(), "drained");
        // Again: the readiness was cleared and fires anew.
        socket.send_to(b"still?", dead).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), next_unreachable(&socket))
            .await
            .expect("the second ICMP error arrives");
        assert_eq!(got.unwrap(), vec![dead]);
        let mut buf = [0u8; 64];
        // A reachable destination draws nothing, and the socket works on.
        socket
            .send_to(b"hello", live.local_addr().unwrap())
            .await
            .unwrap();
        let (n, from) = live.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"hello"[..], socket.local_addr().unwrap())
        );
        assert!(take_unreachable(&socket).is_empty());
    }

    #[tokio::test]
    async fn without_the_error_queue_nothing_is_reported() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        socket.send_to(b"anyone?", dead).await.unwrap();
        socket.send_to(b"again", dead).await.unwrap();
        assert!(take_unreachable(&socket).is_empty());
    }
}

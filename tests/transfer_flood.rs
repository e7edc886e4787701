//! Silent connections against `netkit recv` and the drop of `netkit serve`:
//! a real `netkit send` still completes at once, and the silent ones are
//! closed after `--handshake-timeout` (or at once over the per-address cap)
//! and counted.

mod proc_util;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use netkit::transfer::proto::ReceiverFrame;
use proc_util::{Netkit, raise_nofile};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_netkit");

/// A connection from `from` to `addr` that then says nothing.
async fn silent(addr: SocketAddr, from: Ipv4Addr) -> (TcpStream, Instant) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    (s.connect(addr).await.unwrap(), Instant::now())
}

/// Sends a small file to `addr` with the real binary; how long it took.
fn timed_send(addr: SocketAddr) -> Duration {
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("small.txt");
    std::fs::write(&f, "small").unwrap();
    let started = Instant::now();
    let o = Command::new(BIN)
        .args(["send", "--to", &addr.to_string(), f.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    took
}

/// How the receiver closed one silent connection.
#[derive(Debug, PartialEq)]
enum Closed {
    /// After the handshake timeout, at least `hs` after it opened.
    HandshakeTimeout,
    /// At once: its address had too many pending connections.
    PendingCap,
}

/// Reads each connection to its end; how each was closed, in the order they
/// closed. Panics if one
/// stays open for 20 s, or is closed for the handshake before `hs` passed.
async fn closings(conns: Vec<(TcpStream, Instant)>, hs: Duration) -> Vec<Closed> {
    let mut set = tokio::task::JoinSet::new();
    for (mut s, opened) in conns {
        set.spawn(async move {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
                .await
                .expect("the receiver closes a silent connection")
                .unwrap();
            let mut rest = BytesMut::from(&got[12..]);
            let Some(ReceiverFrame::Error { reason }) = ReceiverFrame::decode(&mut rest).unwrap()
            else {
                panic!("expected an Error frame, got {got:?}");
            };
            if reason.contains("too many connections") {
                Closed::PendingCap
            } else {
                assert!(
                    reason.contains("waiting for the netkit handshake"),
                    "{reason}"
                );
                // The server's clock starts at its accept, a moment before
                // this side notes `opened`: a little slack, not an early close.
                assert!(
                    opened.elapsed() >= hs.mul_f64(0.9),
                    "closed after {:?}",
                    opened.elapsed()
                );
                Closed::HandshakeTimeout
            }
        });
    }
    set.join_all().await
}

/// `netkit recv` on port 0 with `flags`, its address.
fn recv(dir: &std::path::Path, flags: &[&str]) -> (Netkit, SocketAddr) {
    proc_util::recv(dir, flags)
}

/// Stops `p` and returns its final line, which counts the refusals.
fn stopped_line(mut p: Netkit) -> String {
    p.signal(libc::SIGTERM);
    let line = p.wait_for("recv: stopped", Duration::from_secs(20));
    p.wait(Duration::from_secs(20));
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_from_one_address_do_not_delay_a_sender() {
    raise_nofile(4096);
    let out = tempfile::tempdir().unwrap();
    // Long enough that all 1,000 connect before the first 16 time out (on a
    // busy machine 2 s was not, and a second batch of 16 got in).
    let (p, addr) = recv(out.path(), &["--handshake-timeout", "10s"]);
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(silent(addr, Ipv4Addr::new(127, 0, 0, 2)).await);
    }
    let took = tokio::task::spawn_blocking(move || timed_send(addr))
        .await
        .unwrap();
    assert!(took < Duration::from_secs(2), "send took {took:?}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("small.txt")).unwrap(),
        "small"
    );
    let how = closings(conns, Duration::from_secs(10)).await;
    let timed_out = how
        .iter()
        .filter(|c| **c == Closed::HandshakeTimeout)
        .count();
    assert_eq!(timed_out, 16, "the default --max-pending-per-ip");
    assert_eq!(how.len() - timed_out, 984);
    let line = stopped_line(p);
    assert!(
        line.contains("pending_per_ip=984") && line.contains("handshake_timeout=16"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_64_addresses_do_not_take_the_64_sender_slots() {
    let out = tempfile::tempdir().unwrap();
    let (p, addr) = recv(out.path(), &["--handshake-timeout", "2s"]);
    let mut conns = Vec::new();
    for i in 0..64u8 {
        conns.push(silent(addr, Ipv4Addr::new(127, 0, 0, 2 + i)).await);
    }
    let took = tokio::task::spawn_blocking(move || timed_send(addr))
        .await
        .unwrap();
    assert!(took < Duration::from_secs(2), "send took {took:?}");
    let how = closings(conns, Duration::from_secs(2)).await;
    assert!(
        how.iter().all(|c| *c == Closed::HandshakeTimeout),
        "{how:?}"
    );
    let line = stopped_line(p);
    assert!(line.contains("handshake_timeout=64"), "{line}");
}

/// The body of `GET /metrics` on `http`.
fn metrics(http: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_takes_the_same_flags_and_counts_refusals_in_metrics() {
    let data = tempfile::tempdir().unwrap();
    let p = Netkit::spawn(&[
        "serve",
        "--relay",
        "off",
        "--drop",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--tcp",
        "off",
        "--udp",
        "off",
        "--chat",
        "off",
        "--drop-handshake-timeout",
        "500ms",
        "--drop-max-pending-per-ip",
        "1",
        "--drop-portable-names",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let (drop, http) = (p.ready.drop.unwrap(), p.ready.http.unwrap());
    let from = Ipv4Addr::new(127, 0, 0, 3);
    let conns = vec![silent(drop, from).await, silent(drop, from).await];
    let how = closings(conns, Duration::from_millis(500)).await;
    assert!(
        how.len() == 2
            && how.contains(&Closed::HandshakeTimeout)
            && how.contains(&Closed::PendingCap),
        "{how:?}"
    );
    let m = metrics(http);
    for reason in ["handshake_timeout", "pending_per_ip"] {
        let want = format!("netkit_transfer_refused_total{{door=\"drop\",reason=\"{reason}\"}} 1");
        assert!(m.contains(&want), "{want} in\n{m}");
    }
    drop_process(p);
}

fn drop_process(mut p: Netkit) {
    p.terminate();
}

//! The UDP server and the retransmitting client over real sockets on port 0.

mod proc_util;

use std::net::UdpSocket as StdUdp;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use netkit::service::Service;
use netkit::udp::server::{Stats, run};
use proc_util::{Netkit, run_with_stdin};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(10);

fn start(
    rt: &tokio::runtime::Runtime,
    service: Service,
    max: usize,
) -> (std::net::SocketAddr, Arc<Stats>, CancellationToken) {
    let sock = rt.block_on(UdpSocket::bind("127.0.0.1:0")).unwrap();
    let addr = sock.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    rt.spawn(run(sock, service, max, stats.clone(), shutdown.clone()));
    (addr, stats, shutdown)
}

fn client() -> StdUdp {
    let c = StdUdp::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c
}

#[test]
fn services_answer_each_datagram_to_its_sender() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (echo, _, _) = start(&rt, Service::Echo, 65536);
    let (rand, _, _) = start(&rt, Service::Rand, 65536);
    let (day, _, _) = start(&rt, Service::Daytime, 65536);
    let c = client();
    let mut buf = [0u8; 2048];
    c.send_to(b"\x00binary\xff", echo).unwrap();
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"\x00binary\xff"[..], echo));
    c.send_to(b"x", rand).unwrap();
    let (n, _) = c.recv_from(&mut buf).unwrap();
    let v: u32 = std::str::from_utf8(&buf[..n])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(v < 100);
    c.send_to(b"", day).unwrap();
    let (n, _) = c.recv_from(&mut buf).unwrap();
    assert!(std::str::from_utf8(&buf[..n]).unwrap().ends_with("Z\r\n"));
}

#[test]
fn oversized_datagram_is_reported_not_cut_and_the_server_goes_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, stats, _) = start(&rt, Service::Echo, 16);
    let c = client();
    c.send_to(&[1u8; 100], addr).unwrap();
    c.send_to(b"small", addr).unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = c.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"small",
        "the oversized datagram got no (cut) answer"
    );
    // Counted before the next datagram was read, so before "small" was answered.
    assert_eq!(stats.truncated.load(Ordering::Relaxed), 1);
    assert_eq!(stats.received.load(Ordering::Relaxed), 2);
}

#[test]
fn binary_udp_send_counts_replies_and_round_trips() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, _, _) = start(&rt, Service::Echo, 65536);
    let (st, out, err) = run_with_stdin(
        &["udp", "send", &addr.to_string(), "hello", "--count", "3"],
        b"",
        T,
    );
    assert!(st.success(), "{err}");
    assert_eq!(out.matches("\"hello\" rtt=").count(), 3, "{out}");
    assert!(
        out.contains("3 sent, 3 received, 0 lost (0.0% loss), 0 retransmits; rtt min/avg/max"),
        "{out}"
    );
}

#[test]
fn binary_udp_send_reads_stdin_lines_and_prints_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, _, _) = start(&rt, Service::Echo, 65536);
    let (st, out, err) = run_with_stdin(
        &["udp", "send", &addr.to_string(), "--json"],
        b"one\ntwo\n",
        T,
    );
    assert!(st.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["reply"], "one");
    assert_eq!(lines[1]["reply"], "two");
    assert_eq!(lines[2]["received"], 2);
}

#[test]
fn binary_udp_send_retransmits_when_a_datagram_is_lost() {
    // A server that drops the first copy of every message and answers the second.
    let server = client();
    let addr = server.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            server.recv_from(&mut buf).unwrap();
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
        }
    });
    let (st, out, err) = run_with_stdin(
        &[
            "udp",
            "send",
            &addr.to_string(),
            "ping",
            "--count",
            "2",
            "--timeout",
            "100ms",
        ],
        b"",
        T,
    );
    t.join().unwrap();
    assert!(st.success(), "{err}");
    assert_eq!(out.matches("after 2 sends").count(), 2, "{out}");
    assert!(
        out.contains("2 sent, 2 received, 0 lost (0.0% loss), 2 retransmits"),
        "{out}"
    );
}

#[test]
fn binary_udp_send_reports_loss_and_fails() {
    let silent = client();
    let addr = silent.local_addr().unwrap();
    let (st, out, err) = run_with_stdin(
        &[
            "udp",
            "send",
            &addr.to_string(),
            "anyone?",
            "--timeout",
            "50ms",
            "--retries",
            "2",
        ],
        b"",
        T,
    );
    assert_eq!(st.code(), Some(1));
    assert!(out.contains("seq=1 lost: no reply after 3 sends"), "{out}");
    assert!(
        out.contains("1 sent, 0 received, 1 lost (100.0% loss), 2 retransmits"),
        "{out}"
    );
    assert!(err.contains("1 of 1 messages got no reply"), "{err}");
    drop(silent);
}

#[test]
fn binary_udp_send_reports_port_unreachable() {
    let port = client().local_addr().unwrap().port(); // closed again at once
    let (st, out, _) = run_with_stdin(
        &[
            "udp",
            "send",
            &format!("127.0.0.1:{port}"),
            "x",
            "--timeout",
            "50ms",
            "--retries",
            "1",
        ],
        b"",
        T,
    );
    assert_eq!(st.code(), Some(1));
    assert!(out.contains("port unreachable"), "{out}");
}

#[test]
fn binary_udp_send_reports_a_truncated_reply() {
    let server = client();
    let addr = server.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(&[b'a'; 3000], from).unwrap();
    });
    let (st, out, err) = run_with_stdin(
        &["udp", "send", &addr.to_string(), "big?", "--buffer", "100"],
        b"",
        T,
    );
    t.join().unwrap();
    assert!(st.success(), "{err}");
    assert!(
        out.contains("TRUNCATED: 3000 bytes, buffer holds 100"),
        "{out}"
    );
    assert!(out.contains("1 truncated"), "{out}");
}

#[test]
fn binary_udp_serve_answers_and_exits_0_on_sigterm() {
    let mut p = Netkit::spawn(&[
        "udp",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--service",
        "rand",
    ]);
    let addr = p.ready.udp.expect("udp door");
    let c = client();
    c.send_to(b"?", addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = c.recv_from(&mut buf).unwrap();
    let v: u32 = std::str::from_utf8(&buf[..n])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(v < 100);
    assert!(p.terminate().success());
    p.wait_for("udp: server stopped", T);
}

//! The real binary: help, resolve, conns and serve (started through its ready line).

mod proc_util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use netkit::net::conns::{Conn, TcpState, filter, table};
use proc_util::{Netkit, bin, run_with_stdin};

const T: Duration = Duration::from_secs(10);

#[test]
fn help_reads_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["tcp", "serve", "--help"],
        vec!["tcp", "connect", "--help"],
        vec!["udp", "serve", "--help"],
        vec!["udp", "send", "--help"],
        vec!["resolve", "--help"],
        vec!["conns", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: netkit"), "{args:?}: {text}");
    }
}

#[test]
fn help_documents_the_ready_line() {
    let out = bin().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("--ready-json") && text.contains("NETKIT_READY_JSON"),
        "{text}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = bin()
        .args(["tcp", "serve", "--max-conns", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn resolve_prints_the_address_and_its_family() {
    let (st, out, err) = run_with_stdin(&["resolve", "tcp", "127.0.0.1:80"], b"", T);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("IPv4") && out.contains("127.0.0.1") && out.contains("80"),
        "{out}"
    );
}

#[test]
fn resolve_json_keeps_an_ipv6_zone() {
    let (st, out, _) = run_with_stdin(&["resolve", "udp6", "[fe80::1%lo]:53", "--json"], b"", T);
    assert!(st.success());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["family"], "ipv6");
    assert_eq!(v[0]["zone"], "lo");
    assert_eq!(v[0]["address"], "[fe80::1%lo]:53");
}

#[test]
fn resolve_json_resolves_localhost() {
    let (st, out, _) = run_with_stdin(&["resolve", "ip4", "localhost", "--json"], b"", T);
    assert!(st.success());
    assert!(out.contains("\"127.0.0.1\""), "{out}");
}

#[test]
fn resolve_errors_name_what_was_wrong() {
    for (args, expect) in [
        (vec!["resolve", "tcp5", "x:1"], "unknown network 'tcp5'"),
        (
            vec!["resolve", "tcp4", "[::1]:80"],
            "tcp4 needs an IPv4 address, but [::1]:80 is IPv6",
        ),
        (
            vec!["resolve", "tcp", "localhost:99999"],
            "bad port '99999'",
        ),
        (vec!["resolve", "tcp", "localhost"], "has no port"),
        (
            vec!["resolve", "udp", "no-such-host.invalid:53"],
            "cannot resolve host 'no-such-host.invalid'",
        ),
    ] {
        let (st, _, err) = run_with_stdin(&args, b"", T);
        assert_ne!(st.code(), Some(0), "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

/// Polls the kernel's table until `pred` holds: TCP state changes happen in
/// the kernel on its own schedule, and there is nothing else to await.
fn wait_for_table(what: &str, pred: impl Fn(&[Conn]) -> bool) -> Vec<Conn> {
    let deadline = Instant::now() + T;
    loop {
        let rows = table().unwrap();
        if pred(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        std::thread::yield_now();
    }
}

fn state_of(
    rows: &[Conn],
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Option<TcpState> {
    rows.iter()
        .find(|c| c.local == local && c.remote == remote)
        .map(|c| c.state)
}

/// A listener on port 0, a client connected to it, and the accepted end.
struct Pair {
    listener: TcpListener,
    server: std::net::SocketAddr,
    client: TcpStream,
    accepted: TcpStream,
}

fn connected_pair() -> Pair {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let client = TcpStream::connect(server).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    Pair {
        listener,
        server,
        client,
        accepted,
    }
}

#[test]
fn conns_lists_a_listener_and_its_owner() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = listener.local_addr().unwrap();
    let rows = filter(
        table().unwrap(),
        Some(server_addr.port()),
        Some(TcpState::Listen),
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].pid,
        Some(std::process::id() as i32),
        "owner is this process"
    );
}

#[test]
fn conns_shows_both_ends_established() {
    let p = connected_pair();
    let (server_addr, client_addr) = (p.server, p.client.local_addr().unwrap());
    let rows = table().unwrap();
    assert_eq!(
        state_of(&rows, client_addr, server_addr),
        Some(TcpState::Established)
    );
    assert_eq!(
        state_of(&rows, server_addr, client_addr),
        Some(TcpState::Established)
    );

    // The real binary sees the same, as JSON, filtered by port.
    let (st, out, err) = run_with_stdin(
        &["conns", "--port", &server_addr.port().to_string(), "--json"],
        b"",
        T,
    );
    assert!(st.success(), "{err}");
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let states: Vec<_> = v
        .iter()
        .map(|r| r["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "ESTABLISHED").count(),
        2,
        "{out}"
    );
    assert_eq!(states.iter().filter(|s| *s == "LISTEN").count(), 1, "{out}");
    drop(p.listener);
}

#[test]
fn conns_shows_the_closing_states() {
    let p = connected_pair();
    let (server_addr, client_addr) = (p.server, p.client.local_addr().unwrap());
    // The client closes: it goes to FIN_WAIT2 (or TIME_WAIT), the server to CLOSE_WAIT.
    drop(p.client);
    let rows = wait_for_table("client FIN_WAIT2 and server CLOSE_WAIT", |rows| {
        matches!(
            state_of(rows, client_addr, server_addr),
            Some(TcpState::FinWait2 | TcpState::TimeWait)
        ) && state_of(rows, server_addr, client_addr) == Some(TcpState::CloseWait)
    });
    let text_rows = filter(rows, Some(server_addr.port()), Some(TcpState::CloseWait));
    assert_eq!(text_rows.len(), 1);

    // The server closes too: the client side ends in TIME_WAIT.
    drop(p.accepted);
    wait_for_table("client TIME_WAIT", |rows| {
        state_of(rows, client_addr, server_addr) == Some(TcpState::TimeWait)
    });
    let (st, out, _) = run_with_stdin(
        &[
            "conns",
            "--port",
            &server_addr.port().to_string(),
            "--state",
            "time_wait",
        ],
        b"",
        T,
    );
    assert!(st.success());
    assert!(
        out.contains("TIME_WAIT") && out.contains(&client_addr.to_string()),
        "{out}"
    );
    drop(p.listener);
}

#[test]
fn conns_watch_marks_new_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut p = Netkit::from_command({
        let mut c = bin();
        c.args([
            "conns",
            "--watch",
            "--interval",
            "100ms",
            "--count",
            "30",
            "--port",
            &port.to_string(),
            "--json",
        ])
        .stdin(std::process::Stdio::null());
        c
    });
    let line = p.stdout_line(T).expect("a first table");
    let first: Vec<serde_json::Value> = serde_json::from_str(&line).unwrap();
    assert_eq!(first.len(), 1, "only the listener at first: {line}");
    let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut saw_new = false;
    for _ in 0..29 {
        let Some(line) = p.stdout_line(T) else {
            break;
        };
        let rows: Vec<serde_json::Value> = serde_json::from_str(&line).unwrap();
        if rows
            .iter()
            .any(|r| r["change"] == "new" && r["state"] == "ESTABLISHED")
        {
            saw_new = true;
            break;
        }
    }
    assert!(saw_new, "a new connection is marked");
    drop(p);
}

/// `netkit serve` with every door on port 0, its data dir under `dir`.
fn serve_all(dir: &tempfile::TempDir) -> Netkit {
    Netkit::spawn(&[
        "serve",
        "--relay",
        "127.0.0.1:0",
        "--tcp",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--drop",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--chat",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ])
}

#[test]
fn serve_ready_line_names_every_door() {
    let dir = tempfile::tempdir().unwrap();
    let p = serve_all(&dir);
    let r = &p.ready;
    for (door, addr) in [
        ("http", r.http),
        ("chat", r.chat),
        ("drop", r.drop),
        ("tcp", r.tcp),
        ("udp", r.udp),
        ("relay", r.relay),
    ] {
        let addr = addr.unwrap_or_else(|| panic!("{door} missing from {r:?}"));
        assert!(
            addr.ip().is_loopback() && addr.port() != 0,
            "{door}: {addr}"
        );
    }
    assert_eq!(r.cluster, None, "clustering is off");
}

#[test]
fn serve_runs_the_tcp_rand_service() {
    let dir = tempfile::tempdir().unwrap();
    let p = serve_all(&dir);
    let mut c = TcpStream::connect(p.ready.tcp.unwrap()).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 8];
    let n = c.read(&mut buf).unwrap();
    let v: u32 = std::str::from_utf8(&buf[..n])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(v < 100);
}

#[test]
fn serve_runs_the_udp_echo_service() {
    let dir = tempfile::tempdir().unwrap();
    let p = serve_all(&dir);
    let mut buf = [0u8; 8];
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(T)).unwrap();
    u.send_to(b"echo me", p.ready.udp.unwrap()).unwrap();
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"echo me");
}

#[test]
fn serve_creates_its_data_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve_all(&dir);
    assert!(dir.path().join("data").is_dir(), "data dir created");
    let status = p.terminate();
    assert!(status.success(), "{status:?}; saw:\n{}", p.seen.join("\n"));
    p.wait_for("netkit serve: stopped", T);
}

#[test]
fn serve_reports_a_taken_port_with_the_fix() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (st, _, err) = run_with_stdin(
        &[
            "serve",
            "--tcp",
            &addr,
            "--udp",
            "off",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        b"",
        T,
    );
    assert_eq!(st.code(), Some(1));
    assert!(
        err.contains(&format!(
            "cannot bind {addr}: address in use — pass --tcp 127.0.0.1:0"
        )),
        "{err}"
    );
}

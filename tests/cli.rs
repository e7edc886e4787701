//! The real binary: help, resolve, conns and serve.

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
    let out = bin()
        .args(["tcp", "serve", "--max-conns", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn resolve_prints_addresses_and_json() {
    let (st, out, err) = run_with_stdin(&["resolve", "tcp", "127.0.0.1:80"], b"", T);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("IPv4") && out.contains("127.0.0.1") && out.contains("80"),
        "{out}"
    );

    let (st, out, _) = run_with_stdin(&["resolve", "udp6", "[fe80::1%lo]:53", "--json"], b"", T);
    assert!(st.success());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["family"], "ipv6");
    assert_eq!(v[0]["zone"], "lo");
    assert_eq!(v[0]["address"], "[fe80::1%lo]:53");

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

#[test]
fn conns_shows_listen_established_and_closing_states() {
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

    let client = TcpStream::connect(server_addr).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let client_addr = client.local_addr().unwrap();
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

    // The client closes: it goes to FIN_WAIT2 (or TIME_WAIT), the server to CLOSE_WAIT.
    drop(client);
    let rows = wait_for_table("client FIN_WAIT2 and server CLOSE_WAIT", |rows| {
        matches!(
            state_of(rows, client_addr, server_addr),
            Some(TcpState::FinWait2 | TcpState::TimeWait)
        ) && state_of(rows, server_addr, client_addr) == Some(TcpState::CloseWait)
    });
    let text_rows = filter(rows, Some(server_addr.port()), Some(TcpState::CloseWait));
    assert_eq!(text_rows.len(), 1);

    // The server closes too: the client side ends in TIME_WAIT.
    drop(accepted);
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
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        c
    });
    let mut out = std::io::BufReader::new(p.child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let first: Vec<serde_json::Value> = serde_json::from_str(&line).unwrap();
    assert_eq!(first.len(), 1, "only the listener at first: {line}");
    let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut saw_new = false;
    for _ in 0..29 {
        line.clear();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            break;
        }
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

#[test]
fn serve_runs_tcp_and_udp_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = Netkit::spawn(&[
        "serve",
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
        data.to_str().unwrap(),
    ]);
    let tcp = p.addr("tcp:");
    let udp = p.addr("udp:");
    let mut c = TcpStream::connect(tcp).unwrap();
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
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(T)).unwrap();
    u.send_to(b"echo me", udp).unwrap();
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"echo me");
    assert!(data.is_dir(), "data dir created");
    assert!(p.terminate().success());
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

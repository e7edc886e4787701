//! Transfers through the relay (`netkit relay`, `netkit serve --relay`),
//! driven through the real binaries on port 0: files, trees and stdin, a
//! resume after the relay cut a pair, a wrong code, and abuse of the relay
//! (garbage, half hellos, 1,000 waiting peers, a peer that stops reading)
//! while a well-behaved pair goes through.

mod proc_util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use netkit::transfer::code::Code;
use netkit::transfer::relay::wire::{Hello, Reply, Side};
use proc_util::{Netkit, files_under, raise_nofile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WRONG: &str = "wrong code (or someone tried to guess it); nothing was sent";
const T: Duration = Duration::from_secs(60);

/// `netkit relay --listen 127.0.0.1:0 FLAGS…` and its address.
fn relay(flags: &[&str]) -> (Netkit, String) {
    let mut args = vec!["relay", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let p = Netkit::spawn(&args);
    let addr = p.ready.relay.expect("relay's ready line").to_string();
    (p, addr)
}

/// A `netkit send --json --relay RELAY ARGS…` in progress, and the code it printed.
struct Sending {
    p: Netkit,
    code: String,
}

/// Starts `netkit send --json --relay RELAY ARGS…` with `stdin`; returns once it printed its code.
fn send_via(relay: &str, args: &[&str], stdin: Stdio) -> Sending {
    let mut cmd = proc_util::bin();
    cmd.args(["send", "--json", "--relay", relay])
        .args(args)
        .stdin(stdin);
    let mut p = Netkit::from_command(cmd);
    let Some(line) = p.stdout_line(T) else {
        p.wait(T);
        panic!("send printed no code: {}", p.seen.join("\n"));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["relay"], relay);
    let code = v["code"].as_str().unwrap().to_string();
    Code::parse(&code).expect("a valid code");
    Sending { p, code }
}

impl Sending {
    /// Waits for the exit; the status and the report lines.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
        let st = self.p.wait(T);
        let out = self.p.stdout_string();
        let reports = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (st, reports)
    }

    /// Waits for a failed exit and returns the log.
    fn fails(mut self) -> String {
        let st = self.p.wait(T);
        assert!(!st.success(), "send should fail");
        self.p.seen.join("\n")
    }
}

/// `netkit recv CODE --relay RELAY --dir DIR --json`, run to its end.
fn recv_via(relay: &str, code: &str, dir: &std::path::Path) -> std::process::Output {
    proc_util::bin()
        .args(["recv", code, "--relay", relay, "--json", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// One small file through the relay with the real binaries; panics unless it arrives.
fn good_pair(relay: &str) {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("good.txt");
    std::fs::write(&f, "well behaved").unwrap();
    let s = send_via(relay, &[f.to_str().unwrap()], Stdio::null());
    let o = recv_via(relay, &s.code, out.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (st, _) = s.finish();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(out.path().join("good.txt")).unwrap(),
        "well behaved"
    );
}

fn data(n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn a_file_a_tree_and_stdin_go_through_the_relay_and_an_identical_file_is_skipped() {
    let (_relay, addr) = relay(&[]);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = src.path().join("docs");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    // Over two chunks: several sealed Data records.
    let big = data(300_001);
    std::fs::write(tree.join("sub/big.bin"), &big).unwrap();
    std::fs::write(tree.join("a.txt"), "hello").unwrap();
    std::fs::set_permissions(
        tree.join("a.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();

    // A tree, the receiver arriving second.
    let s = send_via(&addr, &[tree.to_str().unwrap()], Stdio::null());
    let o = recv_via(&addr, &s.code, out.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (st, reports) = s.finish();
    assert!(st.success());
    assert_eq!(reports.len(), 4, "two files and two folders: {reports:?}");
    assert!(
        reports.iter().all(|r| r["verdict"] == "stored"),
        "{reports:?}"
    );
    assert_eq!(
        std::fs::read(out.path().join("docs/sub/big.bin")).unwrap(),
        big
    );
    let mode = std::fs::metadata(out.path().join("docs/a.txt")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o640
    );
    let got: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 4, "recv --json reports each entry");

    // The same file again, with a chosen code and the receiver waiting first: skipped.
    // Above MAX_GENERATED_CHANNEL: the random code of the first pair cannot
    // have used this channel up (with 42 it did, once in 99 runs).
    let code = "4242-aardvark-adroitness";
    let dir = out.path().join("docs/sub").to_path_buf();
    let relay2 = addr.clone();
    let receiver = std::thread::spawn(move || recv_via(&relay2, code, &dir));
    let s = send_via(
        &addr,
        &["--code", code, tree.join("sub/big.bin").to_str().unwrap()],
        Stdio::null(),
    );
    assert_eq!(s.code, code);
    let (st, reports) = s.finish();
    assert!(st.success());
    assert_eq!(reports[0]["verdict"], "skipped", "{reports:?}");
    assert_eq!(reports[0]["transferred"], 0);
    assert!(receiver.join().unwrap().status.success());

    // Stdin from a pipe.
    let mut s = send_via(&addr, &["--name", "piped.txt", "-"], Stdio::piped());
    {
        use std::io::Write;
        let mut stdin = s.p.child.stdin.take().unwrap();
        stdin.write_all(b"from a pipe").unwrap();
    }
    let o = recv_via(&addr, &s.code, out.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.p.wait(T).success());
    assert_eq!(
        std::fs::read_to_string(out.path().join("piped.txt")).unwrap(),
        "from a pipe"
    );
}

/// `netkit serve` with only the relay and HTTP (for /metrics) on port 0.
fn serve_relay(data: &std::path::Path) -> (Netkit, String, SocketAddr) {
    let p = proc_util::serve_only(data, &["--relay", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    let relay = p.ready.relay.expect("serve's relay").to_string();
    let http = p.ready.http.unwrap();
    (p, relay, http)
}

fn metrics(http: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

/// The value of the metric line starting with `name`, or 0.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[test]
fn a_transfer_cut_by_the_relay_resumes_through_serve_relay_and_metrics_count_it() {
    // This relay cuts every pair after 300 kB, both ways together.
    let (mut cutter, cut_addr) = relay(&["--relay-max-bytes", "300000"]);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("big.bin");
    let big = data(900_000);
    std::fs::write(&f, &big).unwrap();

    let s = send_via(&cut_addr, &[f.to_str().unwrap()], Stdio::null());
    let o = recv_via(&cut_addr, &s.code, out.path());
    assert!(!o.status.success(), "the cut fails the receiver");
    s.fails();
    cutter.wait_log(&["cut a pair", "max_bytes"], T);
    assert!(
        !out.path().join("big.bin").exists(),
        "nothing under the final name"
    );
    let part = out.path().join("big.bin.netkit-part");
    let part_len = std::fs::metadata(&part).expect("a partial file").len();
    assert!(part_len > 0 && part_len < 300_000, "{part_len}");

    // A new code through `netkit serve --relay` resumes the partial file.
    let data_dir = tempfile::tempdir().unwrap();
    let (mut serve, addr, http) = serve_relay(data_dir.path());
    let s = send_via(&addr, &[f.to_str().unwrap()], Stdio::null());
    let code = s.code.clone();
    let o = recv_via(&addr, &code, out.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (st, reports) = s.finish();
    assert!(st.success());
    assert_eq!(reports[0]["resumed_from"], part_len, "{reports:?}");
    assert_eq!(reports[0]["transferred"], big.len() as u64 - part_len);
    assert_eq!(std::fs::read(out.path().join("big.bin")).unwrap(), big);
    assert!(!part.exists());

    // A second receiver on the used channel is refused, and /metrics counts all of it.
    let again = recv_via(&addr, &code, out.path());
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("this channel was used"), "{err}");
    serve.wait_log(&["pair done"], T);
    let m = metrics(http);
    assert_eq!(metric(&m, "netkit_relay_pairs_total"), 1, "{m}");
    let bytes = metric(&m, "netkit_relay_bytes_total");
    assert!(bytes > big.len() as u64 - part_len, "{bytes}");
    assert_eq!(
        metric(&m, "netkit_relay_refused_total{reason=\"channel_used\"}"),
        1,
        "{m}"
    );
    assert!(serve.terminate().success());
}

#[test]
fn a_wrong_code_fails_both_sides_once_writes_nothing_and_uses_up_the_channel() {
    let (mut relay, addr) = relay(&[]);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("secret.txt");
    std::fs::write(&f, "do not deliver").unwrap();

    let s = send_via(
        &addr,
        &["--code", "7-aardvark-adroitness", f.to_str().unwrap()],
        Stdio::null(),
    );
    // Same channel, other words: the relay pairs them, the handshake fails.
    let o = recv_via(&addr, "7-aardvark-aftermath", out.path());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(WRONG), "receiver: {err}");
    let log = s.fails();
    assert!(log.contains(WRONG), "sender: {log}");
    assert!(files_under(out.path()).is_empty(), "nothing written");
    relay.wait_for("pair done", T);

    // The channel is closed for a second guess, with either side's code.
    for code in ["7-aardvark-adroitness", "7-zulu-yucatan"] {
        let again = recv_via(&addr, code, out.path());
        assert!(!again.status.success());
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(err.contains("this channel was used"), "{err}");
    }
    let o = proc_util::bin()
        .args(["send", "--relay", &addr, "--code", "7-aardvark-adroitness"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("this channel was used"));
    relay.wait_log(&["refusal", "channel_used"], T);
    assert!(files_under(out.path()).is_empty());
    good_pair(&addr);
}

/// A connection to `relay` from the loopback address `from`.
async fn connect_from(relay: SocketAddr, from: Ipv4Addr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    s.connect(relay).await.unwrap()
}

/// The hello of `side` for channel number `n`.
fn hello(side: Side, n: u32) -> [u8; 42] {
    let code = Code::parse(&format!("{n}-aardvark-adroitness")).unwrap();
    Hello {
        side,
        channel: code.channel_id(),
    }
    .encode()
}

/// The relay's next reply on `s`, or `None` once it closed.
async fn reply(s: &mut TcpStream) -> Option<Reply> {
    let mut buf = BytesMut::new();
    loop {
        if let Some(r) = Reply::decode(&mut buf).unwrap() {
            return Some(r);
        }
        let n = tokio::time::timeout(T, s.read_buf(&mut buf))
            .await
            .expect("the relay answers or closes")
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

/// Reads `s` to its end (the relay closed it), bounded by `T`.
async fn closed(s: &mut TcpStream) {
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut sink))
        .await
        .expect("the relay closes the connection");
}

/// The reason of a refusal, or a panic.
fn refused(r: Option<Reply>) -> String {
    match r {
        Some(Reply::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Runs the blocking [`good_pair`] on a thread of its own.
async fn good_pair_async(relay: &str) {
    let relay = relay.to_string();
    tokio::task::spawn_blocking(move || good_pair(&relay))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_half_hellos_early_data_and_a_crowded_address_are_refused_while_pairs_go_through() {
    let (mut relay, addr) = relay(&["--relay-hello-timeout", "1s"]);
    let sa: SocketAddr = addr.parse().unwrap();
    let lo2 = Ipv4Addr::new(127, 0, 0, 2);

    // Garbage: refused at once with a reason, then closed.
    let mut g = connect_from(sa, lo2).await;
    g.write_all(&[b'G'; 64]).await.unwrap();
    assert!(refused(reply(&mut g).await).contains("not a netkit relay hello"));
    closed(&mut g).await;

    // Half a hello, then silence: refused after the hello timeout.
    let mut half = connect_from(sa, lo2).await;
    half.write_all(&hello(Side::Sender, 11)[..20])
        .await
        .unwrap();
    let started = Instant::now();
    assert!(refused(reply(&mut half).await).contains("no relay hello within 1s"));
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Bytes before the pair: refused.
    let mut early = connect_from(sa, lo2).await;
    early.write_all(&hello(Side::Sender, 12)).await.unwrap();
    assert!(matches!(
        reply(&mut early).await,
        Some(Reply::Waiting { .. })
    ));
    early.write_all(b"too soon").await.unwrap();
    assert!(refused(reply(&mut early).await).contains("before the relay paired"));

    // A second sender on a channel with a sender waiting: refused, as about the channel.
    let mut first = connect_from(sa, lo2).await;
    first.write_all(&hello(Side::Sender, 13)).await.unwrap();
    assert!(matches!(
        reply(&mut first).await,
        Some(Reply::Waiting { .. })
    ));
    let mut second = connect_from(sa, lo2).await;
    second.write_all(&hello(Side::Sender, 13)).await.unwrap();
    match reply(&mut second).await {
        Some(Reply::Refused { channel: true, .. }) => {}
        other => panic!("{other:?}"),
    }

    // 20 silent connections from one address: 16 (the default cap) are
    // held until their hello timeout, the rest refused at once.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect_from(sa, Ipv4Addr::new(127, 0, 0, 4)).await);
    }
    // A well-behaved pair (from 127.0.0.1) meanwhile.
    good_pair_async(&addr).await;
    let mut at_once = 0;
    for s in &mut silent {
        let r = refused(reply(s).await);
        if r.contains("too many connections") {
            at_once += 1;
        } else {
            assert!(r.contains("no relay hello"), "{r}");
        }
    }
    assert_eq!(at_once, 4, "16 slots for 20 connections");
    for reason in [
        "bad_hello",
        "hello_timeout",
        "early_data",
        "channel_taken",
        "per_ip",
    ] {
        relay.wait_log(&["refusal", reason], T);
    }
    drop(first);
    good_pair_async(&addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_frees_its_partner_after_the_idle_timeout() {
    let (mut relay, addr) = relay(&["--relay-idle-timeout", "1s"]);
    let sa: SocketAddr = addr.parse().unwrap();
    let mut sender = connect_from(sa, Ipv4Addr::new(127, 0, 0, 3)).await;
    sender.write_all(&hello(Side::Sender, 21)).await.unwrap();
    assert!(matches!(
        reply(&mut sender).await,
        Some(Reply::Waiting { .. })
    ));
    let mut receiver = connect_from(sa, Ipv4Addr::new(127, 0, 0, 3)).await;
    receiver
        .write_all(&hello(Side::Receiver, 21))
        .await
        .unwrap();
    assert_eq!(reply(&mut receiver).await, Some(Reply::Paired));
    assert_eq!(reply(&mut sender).await, Some(Reply::Paired));
    // The sender writes until the receiver's (never read) buffers are full
    // and its writes block; the relay must then let it go.
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0u64;
        while let Ok(Ok(())) = tokio::time::timeout(T, sender.write_all(&chunk)).await {
            sent += chunk.len() as u64;
        }
        sent
    });
    let sent = writer.await.unwrap();
    assert!(sent > 0);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "released after {:?}",
        started.elapsed()
    );
    relay.wait_log(&["cut a pair", "idle_timeout"], T);
    good_pair_async(&addr).await;
    drop(receiver);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_peers_are_bounded_and_time_out_while_pairs_go_through() {
    const N: u32 = 1000;
    // Each waiting peer is one descriptor here and one in the relay.
    assert!(raise_nofile(4096) >= 2 * N as u64 + 100, "fd limit too low");
    let (mut relay, addr) = relay(&[
        "--relay-max-conns-per-ip",
        "0",
        "--relay-max-waiting",
        "1001",
        "--relay-max-wait",
        "5s",
    ]);
    let sa: SocketAddr = addr.parse().unwrap();
    let base_rss = rss_kib(relay.child.id());
    let mut peers = Vec::new();
    for n in 0..N {
        let mut s = connect_from(sa, Ipv4Addr::new(127, 0, 1, (n % 250) as u8 + 1)).await;
        s.write_all(&hello(Side::Receiver, 1000 + n)).await.unwrap();
        peers.push(s);
    }
    for s in &mut peers {
        assert!(matches!(reply(s).await, Some(Reply::Waiting { .. })));
    }
    let opened = Instant::now();
    let rss = rss_kib(relay.child.id());
    assert!(
        rss < base_rss + 64 * 1024,
        "{N} waiting peers took {} KiB",
        rss - base_rss
    );
    // A well-behaved pair uses the last waiting place, while all wait;
    // after it, one more waiter fills the table and the next is refused.
    good_pair_async(&addr).await;
    // `over` is told it waits before `extra` says hello: two hellos in
    // flight at once may be handled in either order.
    let mut over = connect_from(sa, Ipv4Addr::new(127, 0, 2, 1)).await;
    over.write_all(&hello(Side::Sender, 5000)).await.unwrap();
    assert!(matches!(
        reply(&mut over).await,
        Some(Reply::Waiting { .. })
    ));
    let mut extra = connect_from(sa, Ipv4Addr::new(127, 0, 2, 1)).await;
    extra.write_all(&hello(Side::Sender, 5001)).await.unwrap();
    assert!(refused(reply(&mut extra).await).contains("limit of 1001 peers waiting"));
    drop(over);
    // Each of the 1,000 is told it waited too long, after --relay-max-wait.
    for s in &mut peers {
        assert!(refused(reply(s).await).contains("did not come within 5s"));
        closed(s).await;
    }
    assert!(opened.elapsed() >= Duration::from_millis(4500));
    relay.wait_log(&["1000 refusal(s)", "wait_timeout"], T);
    good_pair_async(&addr).await;
}

//! The TCP server and client over real sockets on port 0, through the library
//! and through the real binary.

mod proc_util;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use netkit::service::Service;
use netkit::tcp::server::{Config, Stats, run};
use proc_util::{Netkit, run_with_stdin};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(10);

struct Server {
    addr: std::net::SocketAddr,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(config: Config) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, config, stats.clone(), shutdown.clone()));
    Server {
        addr,
        stats,
        shutdown,
        task,
    }
}

fn rand_config() -> Config {
    Config {
        service: Service::Rand,
        ..Config::default()
    }
}

async fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    tokio::time::timeout(T, r.read_line(&mut s))
        .await
        .expect("reply in time")
        .unwrap();
    s
}

async fn read_to_end(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut v = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut v))
        .await
        .expect("close in time")
        .unwrap();
    v
}

async fn round_trip(addr: std::net::SocketAddr) {
    let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
    c.get_mut().write_all(b"hi\n").await.unwrap();
    let n: u32 = read_line(&mut c).await.trim().parse().unwrap();
    assert!(n < 100);
}

#[tokio::test]
async fn rand_answers_each_line_and_stop_closes() {
    let s = start(rand_config()).await;
    let mut c = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    for i in 0..50 {
        c.get_mut()
            .write_all(format!("request {i}\r\n").as_bytes())
            .await
            .unwrap();
        let line = read_line(&mut c).await;
        let n: u32 = line
            .trim_end_matches('\n')
            .parse()
            .expect("a bare number and a newline");
        assert!(n < 100);
    }
    // Pipelined lines are all answered, in one write or several.
    c.get_mut().write_all(b"a\nb\nc\n").await.unwrap();
    for _ in 0..3 {
        read_line(&mut c).await;
    }
    c.get_mut().write_all(b"STOP\n").await.unwrap();
    assert!(
        read_to_end(&mut c).await.is_empty(),
        "STOP closes without a reply"
    );
    s.shutdown.cancel();
    s.task.await.unwrap();
    assert_eq!(s.stats.requests.load(Ordering::Relaxed), 53);
}

#[tokio::test]
async fn echo_daytime_discard() {
    let echo = start(Config {
        service: Service::Echo,
        ..Config::default()
    })
    .await;
    let mut c = BufReader::new(TcpStream::connect(echo.addr).await.unwrap());
    c.get_mut()
        .write_all(b"no newline \xff binary")
        .await
        .unwrap();
    c.get_mut().shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut c).await, b"no newline \xff binary");

    let day = start(Config {
        service: Service::Daytime,
        ..Config::default()
    })
    .await;
    let mut c = BufReader::new(TcpStream::connect(day.addr).await.unwrap());
    let text = String::from_utf8(read_to_end(&mut c).await).unwrap();
    assert!(
        text.starts_with("20") && text.ends_with("Z\r\n"),
        "{text:?}"
    );

    let discard = start(Config {
        service: Service::Discard,
        ..Config::default()
    })
    .await;
    let mut c = BufReader::new(TcpStream::connect(discard.addr).await.unwrap());
    c.get_mut().write_all(&[7u8; 100_000]).await.unwrap();
    c.get_mut().shutdown().await.unwrap();
    assert!(read_to_end(&mut c).await.is_empty());
}

#[tokio::test]
async fn long_line_gets_an_error_and_others_go_on() {
    let s = start(Config {
        max_line: 64,
        ..rand_config()
    })
    .await;
    let mut bad = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    // Longer than the limit, without a newline: refused before it ends.
    bad.get_mut().write_all(&[b'x'; 200]).await.unwrap();
    let reply = String::from_utf8(read_to_end(&mut bad).await).unwrap();
    assert!(reply.contains("ERR line longer than 64 bytes"), "{reply}");
    round_trip(s.addr).await;
}

#[tokio::test]
async fn invalid_utf8_is_answered() {
    let s = start(rand_config()).await;
    let mut c = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    c.get_mut()
        .write_all(b"\xff\xfe\xc0\x00garbage\n")
        .await
        .unwrap();
    let n: u32 = read_line(&mut c).await.trim().parse().unwrap();
    assert!(n < 100);
}

#[tokio::test]
async fn silent_client_is_closed_after_idle_timeout() {
    let s = start(Config {
        idle_timeout: Duration::from_millis(200),
        ..rand_config()
    })
    .await;
    let mut silent = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    let reply = String::from_utf8(read_to_end(&mut silent).await).unwrap();
    assert!(reply.starts_with("ERR idle for 200ms"), "{reply}");
    round_trip(s.addr).await;
}

#[tokio::test]
async fn reset_mid_request_leaves_the_server_up() {
    let s = start(rand_config()).await;
    for _ in 0..20 {
        let c = TcpStream::connect(s.addr).await.unwrap();
        let mut c = c;
        c.write_all(b"half a requ").await.unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c); // RST
    }
    round_trip(s.addr).await;
}

#[tokio::test]
async fn connection_cap_turns_away_with_a_message() {
    let s = start(Config {
        max_conns: 2,
        ..rand_config()
    })
    .await;
    let mut a = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    let mut b = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    // Both are being served once they answer.
    for c in [&mut a, &mut b] {
        c.get_mut().write_all(b"x\n").await.unwrap();
        read_line(c).await;
    }
    let mut third = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    let reply = String::from_utf8(read_to_end(&mut third).await).unwrap();
    assert!(
        reply.starts_with("ERR server busy: 2 connections"),
        "{reply}"
    );
    assert_eq!(s.stats.refused.load(Ordering::Relaxed), 1);
    // A slot frees when a client leaves.
    a.get_mut().write_all(b"STOP\n").await.unwrap();
    read_to_end(&mut a).await;
    let mut retried = None;
    for _ in 0..100 {
        let mut c = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
        c.get_mut().write_all(b"x\n").await.unwrap();
        let line = read_line(&mut c).await;
        if !line.starts_with("ERR") {
            retried = Some(line);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(retried.is_some(), "a freed slot is reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    let s = start(rand_config()).await;
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(BufReader::new(TcpStream::connect(s.addr).await.unwrap()));
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..5 {
                    c.get_mut().write_all(b"42\n").await.unwrap();
                    let n: u32 = read_line(&mut c).await.trim().parse().unwrap();
                    assert!(n < 100);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.stats.served.load(Ordering::Relaxed), 1000);
    round_trip(s.addr).await;
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight() {
    let s = start(Config {
        grace: Duration::from_secs(10),
        ..rand_config()
    })
    .await;
    let mut busy = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    let mut idle = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    // Both connections are being served.
    for c in [&mut busy, &mut idle] {
        c.get_mut().write_all(b"x\n").await.unwrap();
        read_line(c).await;
    }
    // Half a request is in flight when shutdown starts.
    busy.get_mut().write_all(b"second requ").await.unwrap();
    s.shutdown.cancel();
    // The idle connection is closed at once.
    assert!(read_to_end(&mut idle).await.is_empty());
    // No new clients: wait until connecting is refused.
    let refused = tokio::time::timeout(T, async {
        loop {
            match TcpStream::connect(s.addr).await {
                Err(e) => break e.kind(),
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
    assert!(!s.task.is_finished());
    // The request in flight is completed and answered, then the connection closes.
    busy.get_mut().write_all(b"est\n").await.unwrap();
    let n: u32 = read_line(&mut busy).await.trim().parse().unwrap();
    assert!(n < 100);
    assert!(read_to_end(&mut busy).await.is_empty());
    tokio::time::timeout(T, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_grace_period_closes_stragglers() {
    let s = start(Config {
        grace: Duration::from_millis(100),
        ..rand_config()
    })
    .await;
    let mut c = BufReader::new(TcpStream::connect(s.addr).await.unwrap());
    c.get_mut().write_all(b"x\n").await.unwrap();
    read_line(&mut c).await;
    c.get_mut().write_all(b"never finished").await.unwrap();
    s.shutdown.cancel();
    tokio::time::timeout(T, s.task)
        .await
        .expect("server stops after the grace period")
        .unwrap();
    assert!(read_to_end(&mut c).await.is_empty());
}

// --- the real binary ---

#[test]
fn binary_tcp_serve_answers_and_exits_0_on_sigterm() {
    let mut p = Netkit::spawn(&[
        "tcp",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--service",
        "rand",
    ]);
    let addr = p.ready.tcp.expect("tcp door");
    let (st, out, err) = run_with_stdin(
        &["tcp", "connect", &addr.to_string()],
        b"1\n2\n3\nSTOP\n",
        T,
    );
    assert!(st.success(), "{err}");
    let nums: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(nums.len(), 3, "{out}");
    assert!(nums.iter().all(|n| *n < 100));
    p.wait_for("connection closed: client sent STOP", T);
    assert!(p.terminate().success(), "{}", p.seen.join("\n"));
    p.wait_for("tcp: server stopped", T);
}

#[test]
fn binary_tcp_connect_half_closes_and_reads_to_the_end() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(start(Config {
        service: Service::Echo,
        ..Config::default()
    }));
    let (st, out, err) = run_with_stdin(
        &["tcp", "connect", &s.addr.to_string()],
        b"hello\nworld, no newline",
        T,
    );
    assert!(st.success(), "{err}");
    assert_eq!(out, "hello\nworld, no newline");
}

#[test]
fn binary_tcp_connect_refused_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (st, _, err) = run_with_stdin(&["tcp", "connect", &format!("127.0.0.1:{port}")], b"", T);
    assert_eq!(st.code(), Some(1));
    assert!(
        err.contains("connection refused — nothing is listening there"),
        "{err}"
    );
}

#[test]
fn binary_tcp_connect_reset_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &c, &mut buf);
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
    });
    let (st, _, err) = run_with_stdin(&["tcp", "connect", &addr.to_string()], b"x", T);
    t.join().unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("connection reset by peer"), "{err}");
}

#[test]
fn binary_tcp_connect_times_out() {
    // A listener that never accepts, with its queue filled: further SYNs are dropped.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    let (st, _, err) = run_with_stdin(
        &[
            "tcp",
            "connect",
            "--connect-timeout",
            "300ms",
            &addr.to_string(),
        ],
        b"",
        T,
    );
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("timed out after 300ms"), "{err}");
}

#[test]
fn binary_tcp_serve_shards_share_one_connection_cap() {
    use std::io::{BufRead, BufReader, Write};
    let mut p = Netkit::spawn(&[
        "tcp",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--max-conns",
        "3",
    ]);
    let addr = p.ready.tcp.expect("tcp door");
    assert!(p.wait_for("tcp: listening on", T).contains("threads=2"));
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        (&c).write_all(b"x\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.trim().parse::<u32>().unwrap() < 100, "{line}");
        held.push(c);
    }
    // Whichever shard the kernel hands the fourth client to, the cap is shared.
    for _ in 0..4 {
        let c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        assert!(line.starts_with("ERR server busy: 3 connections"), "{line}");
    }
    assert!(p.terminate().success());
    p.wait_for("tcp: server stopped", T);
}

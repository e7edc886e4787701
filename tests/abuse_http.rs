//! Abuse of the HTTP door, against the real binary: 100 KB of headers, a
//! request line sent a byte a second, a body over the limit, and path
//! traversal in every route that takes a name. Each case checks the answer,
//! that a well-behaved client is served during and after, and that nothing
//! in the data folder changes.

mod abuse_util;

use std::time::{Duration, Instant};

use abuse_util::{RawWs, Serve, http_raw};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The header timeout the server runs with here.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The requests below name the server `x` (`Host: x`), a public name it is given with --http-host.
fn server() -> Serve {
    Serve::start(&[
        "--http",
        "127.0.0.1:0",
        "--http-host",
        "x",
        "--http-header-timeout",
        "2s",
    ])
}

/// A well-behaved request that must keep working.
async fn healthy(s: &Serve) {
    let r = http_raw(
        s.http(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK") && r.ends_with("ok\n"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_kilobytes_of_headers_get_431() {
    let s = server();
    let files = s.files();
    let stored = s.stored("lobby");
    let mut one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    one.extend(vec![b'a'; 100 * 1024]);
    one.extend(b"\r\n\r\n");
    let mut many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..1_000 {
        many.extend(format!("X-H{i}: {}\r\n", "v".repeat(95)).as_bytes());
    }
    many.extend(b"\r\n");
    for req in [one, many] {
        let (r, ()) = tokio::join!(http_raw(s.http(), &req), healthy(&s));
        assert!(
            r.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{r}"
        );
    }
    healthy(&s).await;
    assert_eq!(s.files(), files);
    assert_eq!(s.stored("lobby"), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_line_at_a_byte_a_second_is_cut_by_the_header_timeout() {
    let s = server();
    let start = Instant::now();
    let mut slow = TcpStream::connect(s.http()).await.unwrap();
    let line = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut sent = 0;
    for &b in line {
        if slow.write_all(&[b]).await.is_err() {
            break;
        }
        sent += 1;
        // Others are served while the slow one trickles.
        healthy(&s).await;
        // The attack itself: one byte a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if start.elapsed() > HEADER_TIMEOUT * 3 {
            break;
        }
    }
    let answer = abuse_util::read_to_close(&mut slow).await;
    let took = start.elapsed();
    assert!(sent < line.len(), "the whole request went through");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "no answer to a request that never arrived: {answer}"
    );
    assert!(
        took >= HEADER_TIMEOUT && took < HEADER_TIMEOUT * 4,
        "cut after {took:?}"
    );
    healthy(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413() {
    let s = Serve::start(&[
        "--http",
        "127.0.0.1:0",
        "--http-host",
        "x",
        "--http-body-limit",
        "16KiB",
    ]);
    let files = s.files();
    let stored = s.stored("lobby");
    let body = vec![b'x'; 200 * 1024];
    for path in ["/api/rooms", "/api/rooms/lobby/messages", "/healthz"] {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend(&body);
        let (r, ()) = tokio::join!(http_raw(s.http(), &req), healthy(&s));
        assert!(
            r.starts_with("HTTP/1.1 413 Payload Too Large"),
            "{path}: {r}"
        );
    }
    healthy(&s).await;
    assert_eq!(s.files(), files);
    assert_eq!(s.stored("lobby"), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_names_is_refused() {
    let s = server();
    let files = s.files();
    let stored = s.stored("lobby");
    let get = |path: String| {
        let addr = s.http();
        async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            http_raw(addr, req.as_bytes()).await
        }
    };
    // The one route that takes a name in its path: a room.
    for room in [
        "..%2f..%2fetc%2fpasswd",
        "..%2F..%2Fchat.sqlite3",
        "%2e%2e",
        "..%5c..%5cx",
        "a%00b",
        "lobby%2f..%2f..",
        "%c0%ae%c0%ae",
    ] {
        let r = get(format!("/api/rooms/{room}/messages")).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{room}: {r}");
        // Percent-decoding to invalid UTF-8 fails before the name check.
        assert!(
            r.contains("\"bad_room\"") || r.contains("Invalid URL"),
            "{room}: {r}"
        );
    }
    // Raw `..` segments and tricks around the fixed asset routes.
    for path in [
        "/api/rooms/../../etc/passwd/messages",
        "/../../../etc/passwd",
        "/..%2f..%2fCargo.toml",
        "/app.js/../../Cargo.toml",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/style.css%00.js",
    ] {
        let r = get(path.to_string()).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
        assert!(
            !r.contains("root:") && !r.contains("[package]"),
            "{path}: {r}"
        );
    }
    // The WebSocket's nick: refused with a reason, a guest name given instead.
    let mut ws = RawWs::connect(s.http(), "..%2f..%2fx").await;
    let e = ws.recv_type("error").await;
    assert_eq!(e["code"], "bad_nick", "{e}");
    healthy(&s).await;
    assert_eq!(s.files(), files);
    assert_eq!(s.stored("lobby"), stored);
}

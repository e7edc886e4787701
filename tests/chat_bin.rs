//! The real binary: `netkit serve` killed with SIGKILL loses nothing that was
//! broadcast, a restart keeps history, and `netkit chat` talks to the hub.

mod proc_util;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proc_util::Netkit;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

/// A running `netkit serve` and its HTTP and line-chat addresses.
struct Serve {
    p: Netkit,
    http: String,
    chat: String,
}

/// Starts `netkit serve` on free ports; the addresses come from its ready line.
fn serve(data_dir: &std::path::Path) -> Serve {
    let p = Netkit::serve_chat(data_dir, &["--chat-rate", "0"]);
    let http = p.ready.http.expect("http door").to_string();
    let chat = p.ready.chat.expect("chat door").to_string();
    Serve { p, http, chat }
}

/// Writes into room `crash` as fast as it can and SIGKILLs the server once
/// 150 messages are back; returns every (id, text) it received.
async fn broadcast_until_kill_9(srv: &mut Serve) -> Vec<(u64, String)> {
    let url = format!("ws://{}/ws?nick=writer", srv.http);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        json!({"type":"join","room":"crash"}).to_string().into(),
    ))
    .await
    .unwrap();
    // Send continuously; kill the server mid-stream once 150 echoes are back.
    let sender = tokio::spawn(async move {
        for i in 0..100_000 {
            let m = json!({"type":"say","room":"crash","text":format!("msg-{i}")});
            if tx.send(Message::Text(m.to_string().into())).await.is_err() {
                break;
            }
            if i % 20 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut received: Vec<(u64, String)> = Vec::new();
    let mut killed = false;
    loop {
        let frame = tokio::time::timeout(T, rx.next()).await.expect("no frame");
        let Some(Ok(Message::Text(t))) = frame else {
            break;
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["type"] == "message" {
            received.push((
                v["id"].as_u64().unwrap(),
                v["text"].as_str().unwrap().to_string(),
            ));
            if received.len() == 150 && !killed {
                srv.p.child.kill().unwrap(); // SIGKILL
                killed = true;
            }
        }
    }
    srv.p.child.wait().unwrap();
    sender.abort();
    assert!(killed && received.len() >= 150);
    received
}

/// Every message of room `crash`, paged through the HTTP API.
async fn stored_messages(http: &str) -> Vec<(u64, String)> {
    let mut stored: Vec<(u64, String)> = Vec::new();
    let mut after = 0;
    loop {
        let body = http_get(
            http,
            &format!("/api/rooms/crash/messages?after={after}&limit=500"),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let page = v["messages"].as_array().unwrap();
        if page.is_empty() {
            return stored;
        }
        for m in page {
            stored.push((
                m["id"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            ));
        }
        after = stored.last().unwrap().0;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_that_was_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let received = broadcast_until_kill_9(&mut serve(dir.path())).await;
    let ids: Vec<u64> = received.iter().map(|m| m.0).collect();
    assert_eq!(ids, (1..=received.len() as u64).collect::<Vec<_>>());

    // Restart on the same data dir: every message anyone received is there.
    let srv = serve(dir.path());
    let stored = stored_messages(&srv.http).await;
    assert!(stored.len() >= received.len());
    assert_eq!(&stored[..received.len()], &received[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_restart_the_room_goes_on_from_the_next_id() {
    let dir = tempfile::tempdir().unwrap();
    broadcast_until_kill_9(&mut serve(dir.path())).await;
    let srv = serve(dir.path());
    let after = stored_messages(&srv.http).await.last().unwrap().0;
    let url = format!("ws://{}/ws?nick=again", srv.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(
        json!({"type":"join","room":"crash","after":after})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        json!({"type":"say","room":"crash","text":"after restart"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(T, ws.next()).await.unwrap() else {
            panic!("connection ended")
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["type"] == "message" {
            assert_eq!(v["id"].as_u64().unwrap(), after + 1);
            assert_eq!(v["text"], "after restart");
            break;
        }
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Reads the child's stdout until a line contains `pat`.
fn wait_for_line(rx: &mpsc::Receiver<String>, pat: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line containing {pat:?}"));
        if line.contains(pat) {
            return line;
        }
    }
}

fn chat_client(url: &str, nick: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["chat", url, "--nick", nick, "--room", "term"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// `netkit chat` over WebSocket (`wsuser`) and over TCP (`tcpuser`), both in
/// room `term` of one server, each seeing the other arrive.
struct TwoClients {
    _srv: Serve,
    _dir: tempfile::TempDir,
    ws: (Child, mpsc::Receiver<String>),
    tcp: (Child, mpsc::Receiver<String>),
}

/// A failing test must not leave its clients running.
impl Drop for TwoClients {
    fn drop(&mut self) {
        for c in [&mut self.ws.0, &mut self.tcp.0] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn two_clients() -> TwoClients {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path());
    let ws = chat_client(&format!("ws://{}/ws", srv.http), "wsuser");
    wait_for_line(&ws.1, "-- joined #term");
    let tcp = chat_client(&format!("tcp://{}", srv.chat), "tcpuser");
    wait_for_line(&tcp.1, "-- joined #term");
    wait_for_line(&ws.1, "-- tcpuser joined #term");
    TwoClients {
        _srv: srv,
        _dir: dir,
        ws,
        tcp,
    }
}

/// Writes one line to a client's stdin.
fn type_line(c: &mut Child, line: &str) {
    writeln!(c.stdin.as_mut().unwrap(), "{line}").unwrap();
}

#[test]
fn netkit_chat_says_from_websocket_to_tcp() {
    let mut t = two_clients();
    type_line(&mut t.ws.0, "hello from websocket");
    wait_for_line(&t.tcp.1, "<wsuser> hello from websocket");
}

#[test]
fn netkit_chat_action_from_tcp_reaches_websocket() {
    let mut t = two_clients();
    type_line(&mut t.tcp.0, "/me waves back");
    wait_for_line(&t.ws.1, "* tcpuser waves back");
}

#[test]
fn netkit_chat_private_message_is_shown_as_plain_text() {
    let mut t = two_clients();
    type_line(&mut t.ws.0, "/msg tcpuser <b>not bold</b>");
    wait_for_line(&t.tcp.1, "*wsuser -> tcpuser* <b>not bold</b>");
}

#[test]
fn netkit_chat_ends_at_the_end_of_its_input() {
    let mut t = two_clients();
    // End of input ends the clients.
    drop(t.ws.0.stdin.take());
    drop(t.tcp.0.stdin.take());
    for c in [&mut t.ws.0, &mut t.tcp.0] {
        assert!(proc_util::exited_within(c, T), "netkit chat did not exit");
        assert!(c.wait().unwrap().success());
    }
}

#[test]
fn netkit_chat_rejects_a_bad_url_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["chat", "http://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws://HOST:PORT/ws"));
}

//! The real binary: `netkit serve` killed with SIGKILL loses nothing that was
//! broadcast, a restart keeps history, and `netkit chat` talks to the hub.

mod proc_util;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

struct Serve {
    child: Child,
    http: String,
    chat: String,
}

/// A failing test must not leave its server running.
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `netkit serve` on free ports and reads the bound addresses from its log.
fn serve(data_dir: &std::path::Path) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--chat",
            "127.0.0.1:0",
            "--tcp",
            "off",
            "--udp",
            "off",
            "--drop",
            "off",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--chat-rate", "0"])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut http, mut chat) = (None, None);
    let deadline = Instant::now() + T;
    while http.is_none() || chat.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("netkit serve did not log its addresses");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            http = Some(rest.split_whitespace().next().unwrap().to_string());
        }
        if let Some(rest) = line.split("chat: listening on ").nth(1) {
            chat = Some(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Serve {
        child,
        http: http.unwrap(),
        chat: chat.unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_that_was_broadcast_and_restart_keeps_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = serve(dir.path());
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
                srv.child.kill().unwrap(); // SIGKILL
                killed = true;
            }
        }
    }
    srv.child.wait().unwrap();
    sender.abort();
    assert!(killed && received.len() >= 150);
    let ids: Vec<u64> = received.iter().map(|m| m.0).collect();
    assert_eq!(ids, (1..=received.len() as u64).collect::<Vec<_>>());

    // Restart on the same data dir: every message anyone received is there.
    let mut srv = serve(dir.path());
    let mut stored: Vec<(u64, String)> = Vec::new();
    let mut after = 0;
    loop {
        let body = http_get(
            &srv.http,
            &format!("/api/rooms/crash/messages?after={after}&limit=500"),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let page = v["messages"].as_array().unwrap();
        if page.is_empty() {
            break;
        }
        for m in page {
            stored.push((
                m["id"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            ));
        }
        after = stored.last().unwrap().0;
    }
    assert!(stored.len() >= received.len());
    assert_eq!(&stored[..received.len()], &received[..]);
    // And the room goes on from the next id.
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
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
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

#[test]
fn netkit_chat_over_websocket_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = serve(dir.path());
    let (mut ws_client, ws_out) = chat_client(&format!("ws://{}/ws", srv.http), "wsuser");
    wait_for_line(&ws_out, "-- joined #term");
    let (mut tcp_client, tcp_out) = chat_client(&format!("tcp://{}", srv.chat), "tcpuser");
    wait_for_line(&tcp_out, "-- joined #term");
    wait_for_line(&ws_out, "-- tcpuser joined #term");

    let mut ws_in = ws_client.stdin.take().unwrap();
    writeln!(ws_in, "hello from websocket").unwrap();
    wait_for_line(&tcp_out, "<wsuser> hello from websocket");
    let mut tcp_in = tcp_client.stdin.take().unwrap();
    writeln!(tcp_in, "/me waves back").unwrap();
    wait_for_line(&ws_out, "* tcpuser waves back");
    writeln!(ws_in, "/msg tcpuser <b>not bold</b>").unwrap();
    wait_for_line(&tcp_out, "*wsuser -> tcpuser* <b>not bold</b>");

    // End of input ends the clients.
    drop(ws_in);
    drop(tcp_in);
    for c in [&mut ws_client, &mut tcp_client] {
        assert!(proc_util::exited_within(c, T), "netkit chat did not exit");
        assert!(c.wait().unwrap().success());
    }
    // A bad URL is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["chat", "http://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws://HOST:PORT/ws"));
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
}

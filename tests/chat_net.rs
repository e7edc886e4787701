//! Real sockets on 127.0.0.1 port 0: WebSocket and TCP line clients in one
//! room, bad frames, size limits, silent and slow clients, the HTTP API.

use std::time::Duration;

mod chat_util;
mod ws_util;

use chat_util::{LineClient, Server, T};
use futures_util::{SinkExt, StreamExt};
use netkit::chat::ConnConfig;
use netkit::chat::hub::HubConfig;
use netkit::http::HttpConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use ws_util::{recv, recv_type, send};

fn open_hub() -> HubConfig {
    HubConfig {
        rate: 0.0,
        ..HubConfig::default()
    }
}

#[tokio::test]
async fn websocket_and_tcp_clients_share_a_room_in_order() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let mut web = srv.ws("web").await;
    send(&mut web, json!({"type":"join","room":"lobby"})).await;
    let joined = recv_type(&mut web, "joined").await;
    assert_eq!(joined["members"], json!(["web"]));

    let mut nc = LineClient::connect(srv.chat).await;
    nc.send("/nick term").await;
    nc.until("is now known as term").await;
    nc.send("/join #lobby").await;
    nc.until("-- joined #lobby").await;
    let p = recv_type(&mut web, "presence").await;
    assert_eq!(
        (p["nick"].as_str(), p["event"].as_str()),
        (Some("term"), Some("join"))
    );

    for i in 0..20 {
        send(
            &mut web,
            json!({"type":"say","room":"lobby","text":format!("w{i}")}),
        )
        .await;
        nc.send(&format!("t{i}")).await;
    }
    // The two clients' connections are independent: "/me waves" is sent only
    // once the terminal has seen all 40 messages (the last WebSocket one
    // included), so it is the last.
    let mut nc_seen = Vec::new();
    while nc_seen.len() < 40 {
        let l = nc.line().await;
        if l.contains("#lobby <") {
            nc_seen.push(l);
        }
    }
    nc.send("/me waves").await;
    // Both see the same 41 messages, ids 1..=41 in order, each once.
    let mut web_seen = Vec::new();
    while web_seen.len() < 41 {
        let m = recv_type(&mut web, "message").await;
        web_seen.push((
            m["id"].as_u64().unwrap(),
            m["from"].as_str().unwrap().to_string(),
            m["text"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        web_seen.iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=41).collect::<Vec<_>>()
    );
    assert_eq!(web_seen.iter().filter(|m| m.1 == "web").count(), 20);
    assert_eq!(web_seen.last().unwrap().2, "waves");
    while nc_seen.len() < 41 {
        let l = nc.line().await;
        if l.contains("#lobby <") || l.contains("#lobby * ") {
            nc_seen.push(l);
        }
    }
    for (line, (_, from, text)) in nc_seen.iter().zip(&web_seen) {
        assert!(
            line.ends_with(&format!("<{from}> {text}"))
                || line.ends_with(&format!("* {from} {text}")),
            "{line}"
        );
    }
    // Direct message from the terminal to the browser user.
    nc.send("/msg web psst").await;
    let d = recv_type(&mut web, "direct").await;
    assert_eq!(
        (d["from"].as_str(), d["text"].as_str()),
        (Some("term"), Some("psst"))
    );
    nc.until("*term -> web* psst").await;
    // /who and /quit.
    nc.send("/who").await;
    assert_eq!(
        nc.until("-- members of").await,
        "-- members of #lobby: term, web"
    );
    nc.send("/quit").await;
    let p = recv_type(&mut web, "presence").await;
    assert_eq!(
        (p["nick"].as_str(), p["event"].as_str()),
        (Some("term"), Some("leave"))
    );
    srv.stop().await;
}

#[tokio::test]
async fn bad_frames_get_errors_and_nothing_is_stored() {
    let conn = ConnConfig {
        max_msg: 1024,
        ..ConnConfig::default()
    };
    let srv = Server::start(open_hub(), conn).await;
    let mut ws = srv.ws("ann").await;
    send(&mut ws, json!({"type":"join","room":"r"})).await;
    recv_type(&mut ws, "joined").await;
    send(&mut ws, json!({"type":"say","room":"r","text":"before"})).await;
    recv_type(&mut ws, "message").await;

    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "bad_json"),
        (
            Message::Binary(vec![0, 159, 146, 150].into()),
            "binary_unsupported",
        ),
        (
            Message::Text(json!({"type":"dance"}).to_string().into()),
            "unknown_type",
        ),
        (
            Message::Text(json!({"type":"say","room":"r"}).to_string().into()),
            "bad_message",
        ),
        (
            Message::Text(
                json!({"type":"say","room":"r","text":"x".repeat(2000)})
                    .to_string()
                    .into(),
            ),
            "too_large",
        ),
        (
            Message::Text(json!({"type":"join","room":"no spaces"}).to_string().into()),
            "bad_room",
        ),
        (
            Message::Text(json!({"type":"nick","nick":"<script>"}).to_string().into()),
            "bad_nick",
        ),
        (
            Message::Text(
                json!({"type":"say","room":"r","text":""})
                    .to_string()
                    .into(),
            ),
            "bad_text",
        ),
        (
            Message::Text(
                json!({"type":"say","room":"elsewhere","text":"x"})
                    .to_string()
                    .into(),
            ),
            "not_member",
        ),
    ];
    for (frame, code) in cases {
        ws.send(frame).await.unwrap();
        let e = recv_type(&mut ws, "error").await;
        assert_eq!(e["code"], code, "{e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    // Still connected and working; only the two good messages are stored.
    send(&mut ws, json!({"type":"say","room":"r","text":"after"})).await;
    let m = recv_type(&mut ws, "message").await;
    assert_eq!(m["id"], 2);
    let (status, body) = srv.get("/api/rooms/r/messages").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["before", "after"]);

    // Beyond the hard frame cap: closed with 1009 and a reason; the server stays up.
    let huge = "x".repeat(netkit::chat::ws::hard_frame_cap(1024) + 10);
    let _ = ws.send(Message::Text(huge.into())).await;
    let close = loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(c)))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1009);
    assert!(close.reason.contains("too big"));
    let mut again = srv.ws("ann2").await;
    send(&mut again, json!({"type":"join","room":"r"})).await;
    let j = recv_type(&mut again, "joined").await;
    assert_eq!(j["history"], 2);

    // The TCP side: an over-long line is refused, the connection goes on.
    let mut nc = LineClient::connect(srv.chat).await;
    nc.send(&"y".repeat(5000)).await;
    assert!(nc.line().await.starts_with("ERR too_large"));
    nc.send("/bogus").await;
    assert!(nc.line().await.starts_with("ERR bad_command"));
    nc.send("/join r").await;
    nc.until("-- joined #r").await;
    srv.stop().await;
}

#[tokio::test]
async fn silent_websocket_client_is_dropped_after_the_ping_timeout() {
    let conn = ConnConfig {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(200),
        ..ConnConfig::default()
    };
    let srv = Server::start(open_hub(), conn).await;
    // A raw TCP client that upgrades and then never answers anything.
    let mut s = TcpStream::connect(srv.http).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        srv.http
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // Read until the server closes the TCP connection; the close frame (4001) is in there.
    tokio::time::timeout(T, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf))
        .await
        .expect("server never closed the silent client")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 101"));
    // Close frame: 0x88, len, code 4001 = 0x0FA1.
    let pos = buf
        .windows(1)
        .position(|w| w[0] == 0x88)
        .expect("no close frame");
    assert_eq!(&buf[pos + 2..pos + 4], &[0x0f, 0xa1]);
    assert!(text.contains("ping timeout"));
    srv.stop().await;
}

#[tokio::test]
async fn messages_written_together_arrive_as_separate_frames_in_order() {
    // A long batch interval: the 40 messages reach the reader in one or two
    // batches, each fed as its own frame and flushed in one write.
    let hub = HubConfig {
        batch_interval: Duration::from_millis(300),
        ..open_hub()
    };
    let srv = Server::start(hub, ConnConfig::default()).await;
    let mut reader = srv.ws("reader").await;
    let mut writer = srv.ws("writer").await;
    send(&mut reader, json!({"type":"join","room":"r"})).await;
    recv_type(&mut reader, "joined").await;
    send(&mut writer, json!({"type":"join","room":"r"})).await;
    recv_type(&mut writer, "joined").await;
    for n in 0..40 {
        send(
            &mut writer,
            json!({"type":"say","room":"r","text":format!("m{n}")}),
        )
        .await;
    }
    for n in 0..40 {
        // `recv` parses each frame as one JSON value: two messages in a frame fail.
        let m = recv_type(&mut reader, "message").await;
        assert_eq!(m["text"], format!("m{n}"));
    }
    srv.stop().await;
}

#[tokio::test]
async fn slow_websocket_reader_is_disconnected_with_a_reason() {
    let hub = HubConfig {
        queue_messages: 16,
        queue_bytes: 64 * 1024,
        rate: 0.0,
        ..HubConfig::default()
    };
    let conn = ConnConfig {
        max_msg: 16 * 1024,
        write_timeout: Duration::from_secs(30),
        ..ConnConfig::default()
    };
    let srv = Server::start(
        HubConfig {
            max_text: 16 * 1024,
            ..hub
        },
        conn,
    )
    .await;
    let mut fast = srv.ws("fast").await;
    // The slow reader has a small receive buffer so that it falls behind sooner.
    let mut slow = srv.ws_small_window("slow").await;
    for ws in [&mut fast, &mut slow] {
        send(ws, json!({"type":"join","room":"r"})).await;
        recv_type(ws, "joined").await;
    }
    // slow stops reading; fast sends until slow's socket buffers and queue overflow.
    let text = "z".repeat(8000);
    let mut n = 0u64;
    let mut slow_gone = false;
    while !slow_gone {
        assert!(n < 20_000, "slow client never dropped");
        for _ in 0..4 {
            send(&mut fast, json!({"type":"say","room":"r","text":text})).await;
        }
        for _ in 0..4 {
            loop {
                let v = recv(&mut fast).await;
                if v["type"] == "message" {
                    n += 1;
                    assert_eq!(v["id"], n, "the fast client missed nothing");
                    break;
                }
                if v["type"] == "presence" && v["event"] == "leave" {
                    assert_eq!(v["nick"], "slow");
                    slow_gone = true;
                }
            }
        }
    }
    // slow finally reads: a gapless prefix of messages, then the reason, then close 4000.
    let mut last = 0;
    let close = loop {
        match tokio::time::timeout(T, slow.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "message" {
                    assert_eq!(v["id"], last + 1);
                    last += 1;
                } else if v["type"] == "error" {
                    assert_eq!(v["code"], "lagging");
                }
            }
            Some(Ok(Message::Close(Some(c)))) => break c,
            Some(Ok(_)) => {}
            other => panic!("expected close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4000);
    assert!(close.reason.contains("lagging"));
    let (_, metrics) = srv.get("/metrics").await;
    assert!(
        metrics.contains("netkit_chat_clients_dropped_total{reason=\"lagging\"}"),
        "{metrics}"
    );
    let (_, stats) = srv.get("/api/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["dropped_lagging"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn http_api_pages_assets_and_origin() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let mut ws = srv.ws("ann").await;
    send(&mut ws, json!({"type":"join","room":"dev"})).await;
    recv_type(&mut ws, "joined").await;
    send(&mut ws, json!({"type":"topic","room":"dev","topic":"rust"})).await;
    recv_type(&mut ws, "topic").await;
    for i in 1..=12 {
        send(
            &mut ws,
            json!({"type":"say","room":"dev","text":format!("m{i}")}),
        )
        .await;
        recv_type(&mut ws, "message").await;
    }
    let json_of = |b: String| serde_json::from_str::<Value>(&b).unwrap();
    let (s, b) = srv.get("/api/rooms").await;
    assert_eq!(s, 200);
    assert_eq!(
        json_of(b)["rooms"],
        json!([{"name":"dev","members":1,"topic":"rust","last_id":12}])
    );
    let ids = |v: Value| {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(json_of(srv.get("/api/rooms/dev/messages?limit=3").await.1)),
        vec![10, 11, 12]
    );
    assert_eq!(
        ids(json_of(
            srv.get("/api/rooms/dev/messages?after=4&limit=3").await.1
        )),
        vec![5, 6, 7]
    );
    assert_eq!(
        ids(json_of(srv.get("/api/rooms/dev/messages?before=4").await.1)),
        vec![1, 2, 3]
    );
    assert_eq!(srv.get("/api/rooms/bad%20room/messages").await.0, 400);
    assert_eq!(srv.get("/api/rooms/dev/messages?limit=abc").await.0, 400);
    let (s, b) = srv.get("/api/stats").await;
    assert_eq!(s, 200);
    assert_eq!(json_of(b)["messages"], 12);
    assert_eq!(srv.get("/healthz").await, (200, "ok\n".to_string()));
    let (s, page) = srv.get("/").await;
    assert_eq!(s, 200);
    assert!(page.contains("<script src=\"/app.js\">"));
    assert_eq!(srv.get("/app.js").await.0, 200);
    assert_eq!(srv.get("/style.css").await.0, 200);
    assert_eq!(srv.get("/nope").await.0, 404);
    let (s, m) = srv.get("/metrics").await;
    assert_eq!(s, 200);
    assert!(m.contains("netkit_chat_messages_total"));

    // Origin: a foreign page is refused, the server's own page is allowed.
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let own = format!("http://{}", srv.http);
    let status_of = |origin: String| {
        let addr = srv.http;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut req = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n");
            for (k, v) in &upgrade {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut rd = BufReader::new(s);
            let mut status = String::new();
            tokio::time::timeout(T, rd.read_line(&mut status))
                .await
                .unwrap()
                .unwrap();
            status
        }
    };
    assert!(
        status_of("http://evil.example".into())
            .await
            .starts_with("HTTP/1.1 403")
    );
    assert!(status_of(own).await.starts_with("HTTP/1.1 101"));
    srv.stop().await;
}

/// The newest page is served from a cache while nothing was committed: a new
/// message and another limit are never answered with a stale page, and a
/// change committed outside the server's own stores is seen within RECHECK.
#[tokio::test]
async fn the_newest_page_follows_every_commit_from_any_connection() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let texts = |b: String| -> Vec<String> {
        serde_json::from_str::<Value>(&b).unwrap()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect()
    };
    let mut ws = srv.ws("ann").await;
    send(&mut ws, json!({"type":"join","room":"dev"})).await;
    recv_type(&mut ws, "joined").await;
    send(&mut ws, json!({"type":"say","room":"dev","text":"m1"})).await;
    recv_type(&mut ws, "message").await;
    for _ in 0..3 {
        assert_eq!(texts(srv.get("/api/rooms/dev/messages").await.1), ["m1"]);
    }
    send(&mut ws, json!({"type":"say","room":"dev","text":"m2"})).await;
    recv_type(&mut ws, "message").await;
    assert_eq!(
        texts(srv.get("/api/rooms/dev/messages").await.1),
        ["m1", "m2"]
    );
    assert_eq!(
        texts(srv.get("/api/rooms/dev/messages?limit=1").await.1),
        ["m2"]
    );
    // Another connection to the same file (as another process would) changes
    // a stored row: seen once SQLite is asked again, at most RECHECK later.
    let other = rusqlite::Connection::open(srv.data_dir().join("chat.sqlite3")).unwrap();
    other
        .execute(
            "UPDATE messages SET text = 'edited' WHERE room = 'dev' AND id = 1",
            [],
        )
        .unwrap();
    tokio::time::sleep(netkit::chat::hub::RECHECK * 2).await;
    assert_eq!(
        texts(srv.get("/api/rooms/dev/messages").await.1),
        ["edited", "m2"]
    );
    assert_eq!(
        texts(srv.get("/api/rooms/dev/messages?before=2").await.1),
        ["edited"]
    );
    assert!(texts(srv.get("/api/rooms/other/messages").await.1).is_empty());
}

#[tokio::test]
async fn shutdown_closes_clients_with_a_reason() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let mut ws = srv.ws("ann").await;
    let mut nc = LineClient::connect(srv.chat).await;
    srv.shutdown.cancel();
    let close = loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(c)))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1001);
    assert!(
        nc.until("ERR shutting_down")
            .await
            .contains("server shutting down")
    );
    for t in srv.tasks {
        tokio::time::timeout(T, t)
            .await
            .expect("server did not drain")
            .unwrap();
    }
}

#[tokio::test]
async fn connection_cap_and_rate_limit_over_sockets() {
    let hub = HubConfig {
        max_clients: 1,
        rate: 1.0,
        burst: 2.0,
        ..HubConfig::default()
    };
    let srv = Server::start(hub, ConnConfig::default()).await;
    let mut ws = srv.ws("ann").await;
    // Over the cap: HTTP 503 for WebSocket, an error line for TCP.
    let url = format!("ws://{}/ws", srv.http);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    let s = TcpStream::connect(srv.chat).await.unwrap();
    let mut rd = BufReader::new(s).lines();
    let l = tokio::time::timeout(T, rd.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(l.starts_with("ERR server_full"), "{l}");
    // Rate: a burst of 2, then refused with an explicit error.
    send(&mut ws, json!({"type":"join","room":"r"})).await;
    send(&mut ws, json!({"type":"say","room":"r","text":"one"})).await;
    send(&mut ws, json!({"type":"say","room":"r","text":"two"})).await;
    // The error and the stored message may come in either order.
    let (mut error, mut message) = (None, None);
    while error.is_none() || message.is_none() {
        let v = recv(&mut ws).await;
        match v["type"].as_str() {
            Some("error") => error = Some(v),
            Some("message") => message = Some(v),
            _ => {}
        }
    }
    assert_eq!(error.unwrap()["code"], "rate_limited");
    assert_eq!(message.unwrap()["text"], "one");
    srv.stop().await;
}

#[tokio::test]
async fn pings_are_answered_closes_are_acknowledged_and_bad_upgrades_explained() {
    // A write interval: the pong and the close reply come through the same
    // paced writer as the room's messages.
    let conn = ConnConfig {
        write_interval: Duration::from_millis(20),
        ..ConnConfig::default()
    };
    let srv = Server::start(open_hub(), conn).await;
    let mut ws = srv.ws("pia").await;
    send(&mut ws, json!({"type":"join","room":"p"})).await;
    recv_type(&mut ws, "joined").await;
    // 30 messages said at once, with a ping among them: all arrive, in order,
    // one frame each, and the ping is answered with its payload.
    for i in 0..15 {
        send(
            &mut ws,
            json!({"type":"say","room":"p","text":format!("m{i}")}),
        )
        .await;
    }
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    for i in 15..30 {
        send(
            &mut ws,
            json!({"type":"say","room":"p","text":format!("m{i}")}),
        )
        .await;
    }
    let mut texts = Vec::new();
    let mut pong = None;
    while texts.len() < 30 {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "message" {
                    texts.push(v["text"].as_str().unwrap().to_string());
                }
            }
            Message::Pong(p) => pong = Some(p),
            Message::Ping(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    let want: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    // The pong may trail the messages; wait for it if it has not come yet.
    while pong.is_none() {
        match tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Pong(p) => pong = Some(p),
            _ => continue,
        }
    }
    assert_eq!(&pong.unwrap()[..], b"are you there");
    // A close from the client is answered with a close, then the end.
    ws.close(None).await.unwrap();
    loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("the close was not answered cleanly: {e}"),
        }
    }

    // A WebSocket request without a key is refused with a reason, and the
    // server keeps serving.
    let mut s = TcpStream::connect(srv.http).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        srv.http
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("Sec-WebSocket-Key"), "{text}");
    let mut again = srv.ws("pia2").await;
    send(&mut again, json!({"type":"join","room":"p"})).await;
    recv_type(&mut again, "joined").await;
    srv.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    // Queues large enough that the write timeout, not the lag limit, acts.
    let hub = HubConfig {
        queue_messages: 100_000,
        queue_bytes: 256 * 1024 * 1024,
        rate: 0.0,
        max_text: 16 * 1024,
        ..HubConfig::default()
    };
    let conn = ConnConfig {
        max_msg: 16 * 1024,
        write_timeout: Duration::from_millis(300),
        ..ConnConfig::default()
    };
    let srv = Server::start(hub, conn).await;
    let mut fast = srv.ws("fast").await;
    let mut stuck = srv.ws_small_window("stuck").await;
    for ws in [&mut fast, &mut stuck] {
        send(ws, json!({"type":"join","room":"w"})).await;
        recv_type(ws, "joined").await;
    }
    // `stuck` never reads again: its socket fills, a write blocks, and after
    // 300 ms the server gives up on it; `fast` sees it leave.
    // 800 messages of 8 KB: more than the two socket buffers hold (Linux
    // grows a send buffer to 4 MiB at most), then wait for the leave.
    let text = "w".repeat(8000);
    let mut left = None;
    for _ in 0..800 {
        send(&mut fast, json!({"type":"say","room":"w","text":text})).await;
        let v = recv(&mut fast).await;
        if v["type"] == "presence" && v["event"] == "leave" {
            left = Some(v);
            break;
        }
    }
    let left = match left {
        Some(v) => v,
        None => recv_type(&mut fast, "presence").await,
    };
    assert_eq!(left["nick"], "stuck");
    // Dropped by the write timeout, not as lagging (its queue had room).
    let (_, stats) = srv.get("/api/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["dropped_lagging"], 0);
    // The server goes on serving the others.
    send(
        &mut fast,
        json!({"type":"say","room":"w","text":"still here"}),
    )
    .await;
    loop {
        let v = recv_type(&mut fast, "message").await;
        if v["text"] == "still here" {
            break;
        }
    }
    drop(stuck);
    srv.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_is_disconnected_after_the_header_timeout() {
    let http = HttpConfig {
        header_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let srv = Server::start_with(open_hub(), ConnConfig::default(), http).await;
    // Half a request line, then silence (slowloris): the server hangs up.
    let mut slow = TcpStream::connect(srv.http).await.unwrap();
    slow.write_all(b"GET /api/rooms HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(
        T,
        tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut rest),
    )
    .await
    .expect("the server kept a half-sent request open")
    .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Meanwhile, and after, whole requests are served.
    let (status, body) = srv.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // A WebSocket opened through the same front door works as before.
    let mut ws = srv.ws("after").await;
    send(&mut ws, json!({"type":"join","room":"h"})).await;
    recv_type(&mut ws, "joined").await;
    srv.stop().await;
}

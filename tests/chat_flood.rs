//! A client that floods but reads is slowed and told it is rate limited (a
//! bounded number of times), never disconnected as lagging, and a bystander
//! in the same room is unaffected. Real sockets on 127.0.0.1 port 0.

mod chat_util;
mod ws_util;

use futures_util::{SinkExt, StreamExt};
use netkit::chat::ConnConfig;
use netkit::chat::hub::HubConfig;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use chat_util::{LineClient, Server, T};
use ws_util::{recv_type, send};

/// The default limits (20 messages a second, bursts of 40, 1024 queued).
fn default_hub() -> HubConfig {
    HubConfig::default()
}

/// Most `rate_limited` errors a flood may be answered with: one at once,
/// then at most one a second (the flood is read in a few seconds at most).
const MAX_RATE_ERRORS: usize = 12;

/// The count in a combined refusal (`N more message(s) refused: …`).
fn refused_count(text: &str) -> u64 {
    text.split_once(" more message(s) refused")
        .and_then(|(n, _)| n.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_line_client_flooding_5000_lines_is_rate_limited_not_lagging() {
    let srv = Server::start(default_hub(), ConnConfig::default()).await;
    let mut by = LineClient::connect(srv.chat).await;
    by.send("/nick by").await;
    by.send("/join r").await;
    by.until("-- joined #r").await;
    let mut flood = LineClient::connect(srv.chat).await;
    flood.send("/nick flood").await;
    flood.send("/join r").await;
    flood.until("-- joined #r").await;
    by.until("-- flood joined #r").await;

    // 5,000 lines in one write, then /help (not rate limited) marks the end.
    let mut burst = "hi\n".repeat(5000);
    burst.push_str("/help\n");
    flood.wr.write_all(burst.as_bytes()).await.unwrap();
    // The bystander talks meanwhile, and is heard.
    by.send("still here").await;
    by.until("<by> still here").await;

    let (mut said, mut errors, mut reported) = (0u64, 0usize, 0u64);
    loop {
        let l = flood.line().await;
        assert!(!l.contains("lagging"), "{l}");
        if l.ends_with("<flood> hi") {
            said += 1;
        } else if let Some(text) = l.strip_prefix("ERR rate_limited: ") {
            errors += 1;
            reported += refused_count(text).max(1);
        } else if l == "-- commands:" {
            break;
        }
    }
    assert!(errors >= 1, "no rate_limited error");
    assert!(errors <= MAX_RATE_ERRORS, "{errors} rate_limited errors");
    assert!((30..=200).contains(&said), "{said} accepted");
    assert!(said + reported <= 5000, "{said} + {reported}");
    // Still connected and served: the rest of the help arrives.
    flood.until("/quit").await;

    // The bystander got no more than the accepted messages, and was never cut off.
    by.send("/who").await;
    let members = by.until("-- members of #r").await;
    assert!(members.ends_with("by, flood"), "{members}");
    srv.stop().await;
}

#[tokio::test]
async fn a_websocket_client_flooding_10000_messages_is_rate_limited_not_closed() {
    let srv = Server::start(default_hub(), ConnConfig::default()).await;
    let mut by = srv.ws("by").await;
    send(&mut by, json!({"type":"join","room":"r"})).await;
    recv_type(&mut by, "joined").await;
    let mut flood = srv.ws("flood").await;
    send(&mut flood, json!({"type":"join","room":"r"})).await;
    recv_type(&mut flood, "joined").await;

    // 10,000 messages in one write, then a frame of an unknown type (answered
    // at once, not rate limited) marks the end.
    let say = json!({"type":"say","room":"r","text":"hi"}).to_string();
    for _ in 0..10_000 {
        flood.feed(Message::Text(say.clone().into())).await.unwrap();
    }
    flood
        .feed(Message::Text(json!({"type":"end"}).to_string().into()))
        .await
        .unwrap();
    // Flushed by a task while this one reads, as a client that reads would.
    let (mut tx, mut rx) = flood.split();
    let writer = tokio::spawn(async move {
        tx.flush().await.unwrap();
        tx
    });
    send(
        &mut by,
        json!({"type":"say","room":"r","text":"still here"}),
    )
    .await;

    let (mut said, mut errors) = (0u64, 0usize);
    loop {
        let m = tokio::time::timeout(T, rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("message"), _) if v["from"] == "flood" => said += 1,
            (Some("error"), Some("rate_limited")) => errors += 1,
            (Some("error"), Some("unknown_type")) => break,
            (Some("error"), code) => panic!("unexpected error {code:?}"),
            _ => {}
        }
    }
    assert!((1..=MAX_RATE_ERRORS).contains(&errors), "{errors}");
    assert!((30..=400).contains(&said), "{said} accepted");
    let _sink = writer.await.unwrap();

    // The bystander heard itself and is still served.
    loop {
        let m = recv_type(&mut by, "message").await;
        if m["text"] == "still here" {
            break;
        }
    }
    send(&mut by, json!({"type":"who","room":"r"})).await;
    assert_eq!(
        recv_type(&mut by, "members").await["members"],
        json!(["by", "flood"])
    );
    srv.stop().await;
}

/// Requests that are not rate limited at all (`/help`, 13 lines each) are
/// slowed by backpressure instead: 1,000 of them in one write overflow no queue.
#[tokio::test]
async fn a_thousand_help_requests_in_one_write_are_all_answered() {
    let srv = Server::start(default_hub(), ConnConfig::default()).await;
    let mut c = LineClient::connect(srv.chat).await;
    let mut burst = "/help\n".repeat(1000);
    burst.push_str("/nick done\n");
    c.wr.write_all(burst.as_bytes()).await.unwrap();
    let mut helps = 0;
    loop {
        let l = c.line().await;
        assert!(!l.starts_with("ERR"), "{l}");
        if l == "-- commands:" {
            helps += 1;
        } else if l.ends_with("is now known as done") {
            break;
        }
    }
    assert_eq!(helps, 1000);
    srv.stop().await;
}

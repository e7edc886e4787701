//! Resume across nodes with real `netkit serve` processes: a WebSocket
//! client reads messages from users of nodes a and b on node a, goes away,
//! misses messages posted on both, and comes back on node b with its origin
//! vector (`join` with `since`): it gets exactly the missed ones, each once,
//! then live ones. Malformed `since` gets errors and the node stays up.
//! Every wait reads a socket or polls HTTP with a deadline.

mod proc_util;
mod ws_util;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use proc_util::ClusterNode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use ws_util::{Ws, recv, recv_type, send, send_raw};

const DEADLINE: Duration = Duration::from_secs(30);

async fn ws(node: &ClusterNode, nick: &str) -> Ws {
    let url = format!("ws://{}/ws?nick={nick}", node.http);
    let (mut ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    ws
}

/// Reads `message` events until one has text `text`; returns them all.
async fn messages_until(ws: &mut Ws, text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = recv_type(ws, "message").await;
        let done = v["text"] == text;
        out.push(v);
        if done {
            return out;
        }
    }
}

async fn join(ws: &mut Ws, room: &str) {
    send(ws, json!({"type": "join", "room": room})).await;
    recv_type(ws, "joined").await;
}

async fn say(ws: &mut Ws, text: &str) {
    send(ws, json!({"type": "say", "room": "lobby", "text": text})).await;
}

fn texts(v: &[Value]) -> Vec<&str> {
    v.iter().map(|m| m["text"].as_str().unwrap()).collect()
}

/// The client's resume state: per origin, the highest `origin_id` seen.
fn vector(seen: &[Value]) -> BTreeMap<String, u64> {
    let mut v = BTreeMap::new();
    for m in seen {
        let origin = m["origin"].as_str().expect("message without origin");
        let id = m["origin_id"].as_u64().expect("message without origin_id");
        let e = v.entry(origin.to_string()).or_insert(0);
        *e = id.max(*e);
    }
    v
}

#[tokio::test]
async fn a_client_resumes_on_another_node_by_origin_vector() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = ClusterNode::pair(&dirs, false);

    let mut ann = ws(&a, "ann").await; // posts on a
    let mut bob = ws(&b, "bob").await; // posts on b
    let mut cli = ws(&a, "cli").await; // the client that moves
    join(&mut ann, "lobby").await;
    join(&mut bob, "lobby").await;
    join(&mut cli, "lobby").await;

    // cli, on a, reads messages from users on a and on b.
    say(&mut ann, "a1").await;
    say(&mut bob, "b1").await;
    say(&mut ann, "a2").await;
    say(&mut bob, "b2").await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(recv_type(&mut cli, "message").await);
    }
    let mut got: Vec<&str> = texts(&seen);
    got.sort();
    assert_eq!(got, ["a1", "a2", "b1", "b2"]);
    let v = vector(&seen);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.keys().any(|o| o.starts_with("a/")) && v.keys().any(|o| o.starts_with("b/")));
    cli.close(None).await.unwrap();
    drop(cli);

    // Missed: more from both nodes. Wait until b has all of them (bob sees a4).
    say(&mut ann, "a3").await;
    say(&mut bob, "b3").await;
    say(&mut ann, "a4").await;
    say(&mut bob, "b4").await;
    let on_b = messages_until(&mut bob, "a4").await;
    assert!(texts(&on_b).contains(&"a3"));
    // bob's own b3, b4 were echoed before or among them; b has stored all 4
    // once bob has seen a4 and b4.
    if !texts(&on_b).contains(&"b4") {
        messages_until(&mut bob, "b4").await;
    }

    // cli comes back on b with its vector (and an `after` that b ignores).
    let mut cli = ws(&b, "cli").await;
    send(
        &mut cli,
        json!({"type": "join", "room": "lobby", "since": v, "after": 1}),
    )
    .await;
    let joined = recv_type(&mut cli, "joined").await;
    let n = joined["history"].as_u64().unwrap() as usize;
    assert!(joined.get("truncated").is_none(), "{joined}");
    let mut hist = Vec::new();
    for _ in 0..n {
        let m = recv(&mut cli).await;
        assert_eq!(m["type"], "message", "{m}");
        hist.push(m);
    }
    let mut missed = texts(&hist);
    missed.sort();
    assert_eq!(missed, ["a3", "a4", "b3", "b4"], "history on b: {hist:?}");
    // In b's order, which keeps each sender's order.
    let h = texts(&hist);
    let pos = |t: &str| h.iter().position(|x| *x == t).unwrap();
    assert!(pos("a3") < pos("a4") && pos("b3") < pos("b4"));
    // History ids are b's own, increasing.
    let ids: Vec<u64> = hist.iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Then live ones, each once: a5 (relayed from a), then b5.
    say(&mut ann, "a5").await;
    messages_until(&mut bob, "a5").await;
    say(&mut bob, "b5").await;
    let live = messages_until(&mut cli, "b5").await;
    assert_eq!(texts(&live), ["a5", "b5"]);
    let mut all = seen.clone();
    all.extend(hist);
    all.extend(live);
    let v2 = vector(&all);
    assert_eq!(v2.len(), 2);

    // Malformed `since`: errors, the connection and the node stay up.
    let mut bad = ws(&b, "mallory").await;
    for frame in [
        json!({"type": "join", "room": "x", "since": [1]}).to_string(),
        json!({"type": "join", "room": "x", "since": {"a/1": -3}}).to_string(),
        json!({"type": "join", "room": "x", "since": {"a/1": 2.5}}).to_string(),
        json!({"type": "join", "room": "x", "since": {"a/1": "7"}}).to_string(),
        r#"{"type":"join","room":"x","since":{"a/1":99999999999999999999999}}"#.to_string(),
    ] {
        send_raw(&mut bad, frame.clone()).await;
        let e = recv_type(&mut bad, "error").await;
        assert_eq!(e["code"], "bad_message", "{frame}: {e}");
    }
    // 10 000 entries: a frame over the hard cap, closed with 1009 as any.
    let many: BTreeMap<String, u64> = (0..10_000).map(|i| (format!("n{i}/x"), 1)).collect();
    send(
        &mut bad,
        json!({"type": "join", "room": "x", "since": many}),
    )
    .await;
    loop {
        match tokio::time::timeout(DEADLINE, bad.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1009);
                break;
            }
            Some(Ok(Message::Text(t))) => panic!("expected a close, got {t}"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
    let mut bad = ws(&b, "mallory2").await;
    // 300 short entries fit in a frame but are over the limit of origins.
    let many: BTreeMap<String, u64> = (0..300).map(|i| (format!("{i}"), 1)).collect();
    send(
        &mut bad,
        json!({"type": "join", "room": "x", "since": many}),
    )
    .await;
    let e = recv_type(&mut bad, "error").await;
    assert_eq!(e["code"], "bad_message", "{e}");
    assert!(e["message"].as_str().unwrap().contains("since"), "{e}");
    // Unknown origins are ignored: the whole room's messages with an origin.
    send(
        &mut bad,
        json!({"type": "join", "room": "lobby", "since": {"zz/00": 5}}),
    )
    .await;
    let joined = recv_type(&mut bad, "joined").await;
    assert_eq!(joined["history"], 10, "{joined}");
    // Still serving.
    say(&mut bob, "still-up").await;
    messages_until(&mut bad, "still-up").await;
    assert!(b.alive_peers() == 1);
}

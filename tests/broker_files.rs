//! Files in rooms in broker mode (two real `netkit serve --broker` hubs on
//! a real nats-server on loopback): a file posted on hub a is delivered on
//! hub b as a file message and downloads there (b fetches it from a, by the
//! HTTP address a's presence beats carry). Skipped where nats-server is missing.

mod broker_util;
mod chat_util;
mod files_util;
mod proc_util;
mod ws_util;

use std::time::{Duration, Instant};

use broker_util::{nats_on_fresh_store, serve_binary};
use files_util::{Member, download};
use serde_json::json;
use ws_util::{recv_type, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_posted_on_one_hub_is_delivered_and_downloadable_on_another() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (_a_dir, a) = serve_binary(&nats.url(), &[]).await;
    let (b_dir, b) = serve_binary(&nats.url(), &[]).await;
    let (a_http, b_http) = (a.ready.http.unwrap(), b.ready.http.unwrap());
    // Hub b knows a's HTTP door from a's presence beats (about a second apart).
    let deadline = Instant::now() + files_util::T;
    while !proc_util::http_get_json(b_http, "/api/cluster")["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["http"] == a_http.to_string())
    {
        assert!(Instant::now() < deadline, "hub b never heard of hub a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut bob, _) = tokio_tungstenite::connect_async(format!("ws://{b_http}/ws?nick=bob"))
        .await
        .unwrap();
    recv_type(&mut bob, "welcome").await;
    send(&mut bob, json!({"type": "join", "room": "lobby"})).await;
    recv_type(&mut bob, "joined").await;

    let ann = Member::join(a_http, "ann", "lobby").await;
    let data: Vec<u8> = (0..300_001u32).map(|i| (i % 253) as u8).collect();
    let r = ann.upload(a_http, "notes.txt", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let posted = r.json();
    let file = &posted["file"];

    // Delivered on b as a file message, under the stream's id.
    let m = recv_type(&mut bob, "message").await;
    assert_eq!(m["from"], "ann");
    assert_eq!(&m["file"], file);
    assert_eq!(m["id"], posted["message_id"]);
    let history = proc_util::http_get_json(b_http, "/api/rooms/lobby/messages");
    let last = history["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(&last["file"], file, "{history}");

    // Downloadable on b: fetched from a, verified, served like a local file.
    let got = download(b_http, file["url"].as_str().unwrap()).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.body, data);
    assert_eq!(
        got.header("etag"),
        format!("\"{}\"", blake3::hash(&data).to_hex())
    );
    assert_eq!(got.header("x-content-type-options"), "nosniff");
    let kept = proc_util::files_under(&b_dir.path().join("rooms"));
    assert_eq!(kept.len(), 1, "{kept:?}");
    drop((a, b));
    nats.stop().await;
}

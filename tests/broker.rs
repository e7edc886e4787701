//! Broker mode: hubs carrying room messages through a real nats-server
//! (JetStream on a loopback port, its own store dir), each test with its own
//! server. Skipped, with a message, only where nats-server is not installed.

mod broker_util;
mod chat_util;
mod proc_util;
mod ws_util;

use std::collections::HashSet;

use broker_util::{Nats, Node, nats_on_fresh_store, next_message, serve_binary, stop_all};
use chat_util::{T, http_get};
use netkit::chat::hub::{Hub, HubError, Inbox, Received};
use netkit::chat::protocol::{ChatMessage, ClientMsg, MessageKind, PresenceEvent, ServerMsg};
use netkit::cluster::broker::{self, Broker};
use tokio_util::sync::CancellationToken;

/// The newest stream entry `node` has applied.
fn end_of(node: &Node) -> u64 {
    *node.hub.logged().borrow()
}

/// The `joined` reply in `inbox` and the history after it.
async fn joined(inbox: &mut Inbox) -> (bool, Vec<ChatMessage>) {
    loop {
        let Received::Event(ev) = tokio::time::timeout(T, inbox.recv()).await.unwrap() else {
            panic!("client gone");
        };
        if let ServerMsg::Joined {
            truncated, history, ..
        } = ev.msg
        {
            let mut v = Vec::new();
            for _ in 0..history {
                v.push(next_message(inbox).await);
            }
            return (truncated, v);
        }
    }
}

/// The next event in `inbox` that `want` picks (others are passed over).
async fn next_event<F: Fn(&ServerMsg) -> bool>(
    inbox: &mut Inbox,
    what: &str,
    want: F,
) -> ServerMsg {
    let wait = async {
        loop {
            match inbox.recv().await {
                Received::Event(ev) if want(&ev.msg) => return ev.msg.clone(),
                Received::Event(_) => {}
                other => panic!("client gone while waiting for {what}: {other:?}"),
            }
        }
    };
    tokio::time::timeout(T, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what}"))
}

/// No room message waits in `inbox` now.
fn no_message(inbox: &mut Inbox) {
    while let Some(ev) = inbox.try_recv() {
        assert!(
            !matches!(ev.msg, ServerMsg::Message(_)),
            "unexpected {:?}",
            ev.msg
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hubs_show_every_message_once_in_one_order() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let nodes = [
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
    ];
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push(n.client(&format!("user{i}"), None).await);
    }
    const EACH: usize = 30;
    let sends = clients.iter().enumerate().map(|(i, (s, _))| async move {
        for k in 0..EACH {
            s.say("lobby", format!("m{i}-{k}"), MessageKind::Say)
                .await
                .unwrap();
        }
    });
    futures_util::future::join_all(sends).await;
    let mut seen: Vec<Vec<(u64, String)>> = Vec::new();
    for (_, inbox) in clients.iter_mut() {
        let mut got = Vec::new();
        for _ in 0..3 * EACH {
            let m = next_message(inbox).await;
            got.push((m.id, m.text));
        }
        no_message(inbox);
        let texts: HashSet<&String> = got.iter().map(|(_, t)| t).collect();
        assert_eq!(texts.len(), 3 * EACH, "every message exactly once");
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids rise");
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "same ids and order on hubs 0 and 1");
    assert_eq!(seen[0], seen[2], "same ids and order on hubs 0 and 2");
    stop_all(nodes, nats).await;
}

/// A steady trickle of messages for 7 s reaches the other hub in order and
/// without a pause of seconds. The pause this guards against (a pull
/// request nats-server 2.9.10 dropped silently when an entry arrived as it
/// expired, then 5 s until async-nats pulled again; docs/cluster.md) is a
/// race of a millisecond: this test did not meet it with the pull consumer
/// either, it was seen in `bench/cluster_broker`. Here it checks that the
/// push consumer delivers a steady stream with no stall of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_trickle_crosses_hubs_without_a_pause() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let nodes = [
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
    ];
    let (sender, _own) = nodes[0].client("sender", None).await;
    let (_reader, mut inbox) = nodes[1].client("reader", None).await;
    // 40 messages/s for 7 s: past the first pull's expiry (4 s) and the
    // 5 s that followed it.
    const COUNT: usize = 280;
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(COUNT)));
    let sending = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(std::time::Duration::from_millis(25));
            for k in 0..COUNT {
                pace.tick().await;
                sent.lock().unwrap().push(tokio::time::Instant::now());
                sender
                    .say("lobby", format!("t{k}"), MessageKind::Say)
                    .await
                    .unwrap();
            }
        })
    };
    let mut worst = (std::time::Duration::ZERO, 0);
    for k in 0..COUNT {
        let m = next_message(&mut inbox).await;
        assert_eq!(m.text, format!("t{k}"), "in order, none missing");
        let took = sent.lock().unwrap()[k].elapsed();
        if took > worst.0 {
            worst = (took, k);
        }
    }
    sending.await.unwrap();
    assert!(
        worst.0 < std::time::Duration::from_secs(2),
        "message {} took {:?} to cross hubs",
        worst.1,
        worst.0
    );
    stop_all(nodes, nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_publish_is_stored_once_and_garbage_is_skipped() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let node = Node::start(&nats.url()).await;
    let (_s, mut inbox) = node.client("ann", None).await;
    let b = Broker::connect(&nats.url(), 0, 1).await.unwrap();
    let post = netkit::chat::LoggedPost {
        room: "lobby".into(),
        from: "ann".into(),
        text: "once".into(),
        kind: MessageKind::Say,
        ts: 1,
        moderation: None,
        file: None,
    };
    let (subject, payload) = (broker::wire::subject("lobby"), broker::wire::encode(&post));
    let first = b
        .publish(subject.clone(), payload.clone(), "id-1")
        .await
        .unwrap();
    let again = b.publish(subject.clone(), payload, "id-1").await.unwrap();
    assert_eq!(first, again, "the retry gets the first one's sequence");
    assert_eq!(b.last_seq().await.unwrap(), first, "stored once");
    // Not netkit's format, or a subject that does not match: skipped.
    b.publish(subject.clone(), "hello".into(), "junk-1")
        .await
        .unwrap();
    let other = broker::wire::encode(&netkit::chat::LoggedPost {
        room: "elsewhere".into(),
        ..post.clone()
    });
    b.publish(subject.clone(), other, "junk-2").await.unwrap();
    let after = broker::wire::encode(&netkit::chat::LoggedPost {
        text: "after".into(),
        ..post
    });
    let last = b.publish(subject, after, "id-2").await.unwrap();
    let m = next_message(&mut inbox).await;
    assert_eq!((m.id, m.text.as_str()), (first, "once"));
    let m = next_message(&mut inbox).await;
    assert_eq!((m.id, m.text.as_str()), (last, "after"));
    node.applied(last).await;
    no_message(&mut inbox);
    node.stop().await;
    nats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_hub_with_exactly_what_it_missed() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b, c) = (
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
    );
    let (ann, mut ann_in) = a.client("ann", None).await;
    let (bob, _bob_in) = c.client("bob", None).await;
    bob.say("lobby", "seen".into(), MessageKind::Say)
        .await
        .unwrap();
    let last_seen = next_message(&mut ann_in).await.id;
    drop((ann, ann_in));
    bob.join("side", None).await.unwrap();
    for k in 0..5 {
        bob.say("lobby", format!("missed {k}"), MessageKind::Say)
            .await
            .unwrap();
        if k == 1 {
            // A hole in the lobby's ids: the stream's next sequence goes to another room.
            bob.say("side", "elsewhere".into(), MessageKind::Say)
                .await
                .unwrap();
        }
    }
    let hole = end_of(&c) - 3;
    let end = end_of(&c);
    b.applied(end).await;
    let (_ann, mut ann_in) = b.client("ann", Some(last_seen)).await;
    let (truncated, history) = joined(&mut ann_in).await;
    assert!(!truncated);
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        ["missed 0", "missed 1", "missed 2", "missed 3", "missed 4"]
    );
    assert_eq!(history.last().unwrap().id, end);
    assert_eq!(history[2].id, hole + 1, "ids skip the other room's entry");
    // A position the room does not hold (as a trimmed one) is reported as such.
    let (_cy, mut cy_in) = b.client("cy", Some(hole)).await;
    assert!(
        joined(&mut cy_in).await.0,
        "an unknown position is truncated"
    );
    stop_all([a, b, c], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_server_fails_sends_fast_and_delivery_resumes_without_gaps() {
    let Some((store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let port = nats.port;
    let (a, b) = (
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
    );
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn({
        let (hub, s) = (a.hub.clone(), a.shutdown.clone());
        async move { netkit::http::run(http, hub, Default::default(), None, s).await }
    });
    assert_eq!(
        http_get(http_addr, "/healthz", &[]).await,
        (200, "ok\n".into())
    );
    let (ann, mut ann_in) = a.client("ann", None).await;
    let (_bob, mut bob_in) = b.client("bob", None).await;
    for k in 0..3 {
        ann.say("lobby", format!("before {k}"), MessageKind::Say)
            .await
            .unwrap();
    }
    nats.stop().await;
    let mut up = a.broker.connected();
    tokio::time::timeout(T, up.wait_for(|c| !c))
        .await
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    let refused = ann.say("lobby", "lost?".into(), MessageKind::Say).await;
    assert!(matches!(refused, Err(HubError::Broker(_))), "{refused:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "fails fast"
    );
    let (status, body) = http_get(http_addr, "/healthz", &[]).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("degraded: "), "{body}");

    let nats = Nats::start(store.path(), Some(port)).await;
    tokio::time::timeout(T, up.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();
    for k in 0..3 {
        ann.say("lobby", format!("after {k}"), MessageKind::Say)
            .await
            .unwrap();
    }
    assert_eq!(
        http_get(http_addr, "/healthz", &[]).await,
        (200, "ok\n".into())
    );
    let want = [
        "before 0", "before 1", "before 2", "after 0", "after 1", "after 2",
    ];
    for inbox in [&mut ann_in, &mut bob_in] {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(next_message(inbox).await);
        }
        let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, want, "no gap, no duplicate, nothing refused shown");
        let ids: Vec<u64> = got.iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6], "the stream sequence is the id");
        no_message(inbox);
    }
    a.stop().await;
    b.stop().await;
    nats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_nicks_topics_kicks_and_directs_cross_hubs() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (
        Node::start(&nats.url()).await,
        Node::start(&nats.url()).await,
    );
    let a_node = Some(a.broker.node().to_string());
    let (_bob, mut bob_in) = b.client("bob", None).await;
    // The first member of the room on hub A is its operator there.
    let (mut op, _op_in) = a.client("op", None).await;
    let (ann, mut ann_in) = a.client("ann", None).await;
    let msg = next_event(&mut bob_in, "ann's join", |m| {
        matches!(m, ServerMsg::Presence { nick, event: PresenceEvent::Join, .. } if nick == "ann")
    })
    .await;
    let ServerMsg::Presence { room, node, .. } = msg else {
        unreachable!()
    };
    assert_eq!((room.as_str(), node), ("lobby", a_node.clone()));

    ann.set_nick("anna").unwrap();
    let msg = next_event(&mut bob_in, "the rename", |m| {
        matches!(m, ServerMsg::Nick { .. })
    })
    .await;
    assert_eq!(
        msg,
        ServerMsg::Nick {
            old: "ann".into(),
            new: "anna".into(),
            node: a_node.clone()
        }
    );

    ann.topic("lobby", "crossing hubs".into()).await.unwrap();
    let msg = next_event(&mut bob_in, "the topic", |m| {
        matches!(m, ServerMsg::Topic { .. })
    })
    .await;
    assert_eq!(
        msg,
        ServerMsg::Topic {
            room: "lobby".into(),
            topic: "crossing hubs".into(),
            by: "anna".into()
        }
    );
    let lobby = b
        .hub
        .rooms()
        .into_iter()
        .find(|r| r.name == "lobby")
        .unwrap();
    assert_eq!(lobby.topic, "crossing hubs", "stored on hub B too");

    ann.direct("bob", "psst".into()).unwrap();
    let msg = next_event(&mut bob_in, "the direct message", |m| {
        matches!(m, ServerMsg::Direct { .. })
    })
    .await;
    let ServerMsg::Direct { from, to, text, .. } = msg else {
        unreachable!()
    };
    assert_eq!(
        (from.as_str(), to.as_str(), text.as_str()),
        ("anna", "bob", "psst")
    );

    op.handle(ClientMsg::Kick {
        room: "lobby".into(),
        nick: "anna".into(),
        reason: Some("enough".into()),
    })
    .await
    .unwrap();
    // The leave (presence) and the notice (the stream) come in either order.
    let (mut notice, mut left) = (None, false);
    while notice.is_none() || !left {
        let msg = next_event(&mut bob_in, "the kick's notice and leave", |m| {
            matches!(m, ServerMsg::Message(_) | ServerMsg::Presence { .. })
        })
        .await;
        match msg {
            ServerMsg::Message(m) => notice = Some(m),
            ServerMsg::Presence {
                nick,
                event: PresenceEvent::Leave,
                ..
            } if nick == "anna" => left = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    let notice = notice.unwrap();
    assert_eq!(notice.kind, MessageKind::Notice);
    assert!(notice.text.contains("anna"), "{}", notice.text);
    next_event(&mut ann_in, "anna's parted", |m| {
        matches!(m, ServerMsg::Parted { .. })
    })
    .await;
    stop_all([a, b], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_trimmed_from_the_stream_is_truncated_on_a_hub_that_never_held_it() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    // The first hub creates the stream, keeping 3 messages per room.
    let a = Node::start_keeping(&nats.url(), 3).await;
    let (ann, mut ann_in) = a.client("ann", None).await;
    let mut ids = Vec::new();
    for k in 0..6 {
        ann.say("lobby", format!("m{k}"), MessageKind::Say)
            .await
            .unwrap();
        ids.push(next_message(&mut ann_in).await.id);
    }
    // A hub started now reads only what the stream still holds: m3 to m5.
    let c = Node::start_keeping(&nats.url(), 3).await;
    c.applied(ids[5]).await;
    let (_old, mut old_in) = c.client("old", Some(ids[1])).await;
    let (truncated, history) = joined(&mut old_in).await;
    assert!(
        truncated,
        "a position the stream no longer holds is truncated"
    );
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["m3", "m4", "m5"], "then the newest page");
    assert_eq!(history[0].id, ids[3]);
    // A position it holds resumes exactly.
    let (_new, mut new_in) = c.client("new", Some(ids[3])).await;
    let (truncated, history) = joined(&mut new_in).await;
    assert!(!truncated);
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["m4", "m5"]);
    // The hub that saw every message still resumes from its own store.
    let (_kept, mut kept_in) = a.client("kept", Some(ids[1])).await;
    let (truncated, history) = joined(&mut kept_in).await;
    assert!(!truncated);
    assert_eq!(history.len(), 4, "m2 to m5 from hub A's store");
    stop_all([a, c], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_store_is_never_a_silent_mismatch() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let port = nats.port;
    let a = Node::start(&nats.url()).await;
    let (ann, mut ann_in) = a.client("ann", None).await;
    let mut last = 0;
    for k in 0..3 {
        ann.say("lobby", format!("old {k}"), MessageKind::Say)
            .await
            .unwrap();
        last = next_message(&mut ann_in).await.id;
    }
    nats.stop().await;
    let fresh = tempfile::tempdir().unwrap();
    let nats = Nats::start(fresh.path(), Some(port)).await;
    // A hub started on the fresh server makes the stream again, from 1.
    let c = Node::start(&nats.url()).await;
    let (bob, _bob_in) = c.client("bob", None).await;
    bob.say("lobby", "new 0".into(), MessageKind::Say)
        .await
        .unwrap();
    let mut replaced = a.broker.replaced();
    let why = tokio::time::timeout(T, replaced.wait_for(Option::is_some))
        .await
        .expect("hub A finds the stream is another one")
        .unwrap()
        .clone()
        .unwrap();
    assert!(why.contains("fresh --data-dir"), "{why}");
    let refused = ann.say("lobby", "lost?".into(), MessageKind::Say).await;
    assert!(
        matches!(&refused, Err(HubError::Broker(e)) if e.contains("not the one this hub follows")),
        "{refused:?}"
    );
    assert_eq!(end_of(&a), last, "hub A applied nothing of the new stream");
    no_message(&mut ann_in);
    // On the fresh hub, the old position is not held: truncated.
    let (_ann2, mut ann2_in) = c.client("ann", Some(last)).await;
    let (truncated, history) = joined(&mut ann2_in).await;
    assert!(truncated, "a position of the old stream is reported gone");
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["new 0"]);
    stop_all([a, c], nats).await;
}

/// Serves `hub`'s HTTP door (with `/ws`) on a free loopback port until `shutdown`.
async fn serve_http(hub: &Hub, shutdown: &CancellationToken) -> std::net::SocketAddr {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    tokio::spawn({
        let (hub, s) = (hub.clone(), shutdown.clone());
        async move { netkit::http::run(http, hub, Default::default(), None, s).await }
    });
    addr
}

/// A WebSocket client `nick` on the hub at `http`, in room lobby (joined
/// after `after`): the `joined` frame and the history frames after it.
async fn ws_join(
    http: std::net::SocketAddr,
    nick: &str,
    after: Option<u64>,
) -> (ws_util::Ws, serde_json::Value, Vec<serde_json::Value>) {
    let url = format!("ws://{http}/ws?nick={nick}");
    let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ws_util::recv_type(&mut ws, "welcome").await["nick"], nick);
    let mut join = serde_json::json!({"type": "join", "room": "lobby"});
    if let Some(a) = after {
        join["after"] = a.into();
    }
    ws_util::send(&mut ws, join).await;
    let joined = ws_util::recv_type(&mut ws, "joined").await;
    let mut history = Vec::new();
    for _ in 0..joined["history"].as_u64().unwrap() {
        history.push(ws_util::recv_type(&mut ws, "message").await);
    }
    (ws, joined, history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_s_clients_resume_elsewhere_and_its_users_leave_in_bound() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let b = Node::start(&nats.url()).await;
    let b_http = serve_http(&b.hub, &b.shutdown).await;
    let (bob, mut bob_in) = b.client("bob", None).await;
    // Hub K: the real binary, in broker mode on the same server.
    let (_k_dir, mut k) = serve_binary(&nats.url(), &["--chat-rate", "0"]).await;
    let k_http = k.ready.http.expect("http is on");
    let (mut ann, _, _) = ws_join(k_http, "ann", None).await;
    next_event(&mut bob_in, "ann's join from hub K", |m| {
        matches!(m, ServerMsg::Presence { nick, event: PresenceEvent::Join, node: Some(_), .. } if nick == "ann")
    })
    .await;
    ws_util::send(
        &mut ann,
        serde_json::json!({"type": "say", "room": "lobby", "text": "seen"}),
    )
    .await;
    let seen = ws_util::recv_type(&mut ann, "message").await;
    assert_eq!(seen["text"], "seen");
    let last_id = seen["id"].as_u64().unwrap();

    k.kill9();
    let killed = std::time::Instant::now();
    for i in 0..3 {
        bob.say("lobby", format!("missed {i}"), MessageKind::Say)
            .await
            .unwrap();
    }
    let left = next_event(&mut bob_in, "ann's leave", |m| {
        matches!(m, ServerMsg::Presence { nick, event: PresenceEvent::Leave, .. } if nick == "ann")
    })
    .await;
    let took = killed.elapsed();
    let ServerMsg::Presence { reason, .. } = left else {
        unreachable!()
    };
    assert_eq!(reason.as_deref(), Some("node down"));
    // The bound runs from the last heartbeat, which precedes the kill; the
    // margin is for delivery on a busy machine.
    let bound = broker::events::LEAVE_BOUND + std::time::Duration::from_secs(1);
    assert!(took <= bound, "users left after {took:?}, bound {bound:?}");
    drop(ann);

    let (_ann, joined, history) = ws_join(b_http, "ann", Some(last_id)).await;
    assert_ne!(joined["truncated"], true, "{joined}");
    let texts: Vec<&str> = history
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["missed 0", "missed 1", "missed 2"],
        "exactly what it missed"
    );
    assert!(history.iter().all(|m| m["id"].as_u64().unwrap() > last_id));
    b.stop().await;
    nats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_logs_and_skips_what_is_not_netkit_s_format() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (_k_dir, mut k) = serve_binary(&nats.url(), &[]).await;
    let b = Broker::connect(&nats.url(), 0, 1).await.unwrap();
    let junk = b
        .publish(broker::wire::subject("lobby"), "hello".into(), "junk-1")
        .await
        .unwrap();
    let started = k.wait_for("broker: room messages go through", T);
    let node = started
        .split("node=")
        .nth(1)
        .and_then(|n| n.split_whitespace().next())
        .expect("the hub logs its name")
        .to_string();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let to_k = format!("{}{node}", broker::wire::DIRECT_PREFIX);
    for (subject, payload) in [
        ("netkit.presence.hub-0", "{\"version\": 1}"),
        (
            "netkit.presence.hub-9",
            "{\"version\": 1, \"users\": [{\"id\": 1, \"nick\": \"bad nick!\", \"rooms\": []}]}",
        ),
        (to_k.as_str(), "not json"),
        (broker::wire::topic_subject("lobby").as_str(), "[]"),
    ] {
        client
            .publish(subject.to_string(), payload.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let k = tokio::task::spawn_blocking(move || {
        let wait = std::time::Duration::from_secs(20);
        k.wait_log(
            &[&format!(
                "broker: stream entry {junk} on netkit.room.lobby skipped"
            )],
            wait,
        );
        k.wait_for("broker: presence beat skipped", wait);
        k.wait_for("a nickname is not valid", wait);
        k.wait_for("broker: topic change skipped", wait);
        k.wait_for("broker: direct message skipped", wait);
        k
    })
    .await
    .unwrap();
    // Still up: a client of the hub sends and gets its message after the junk.
    let (mut ann, _, _) = ws_join(k.ready.http.unwrap(), "ann", None).await;
    ws_util::send(
        &mut ann,
        serde_json::json!({"type": "say", "room": "lobby", "text": "still up"}),
    )
    .await;
    let m = ws_util::recv_type(&mut ann, "message").await;
    assert_eq!(
        (m["text"].as_str(), m["id"].as_u64()),
        (Some("still up"), Some(junk + 1))
    );
    drop(k);
    nats.stop().await;
}

#[tokio::test]
async fn startup_fails_clearly_without_a_server() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let Err(e) = Broker::connect(&format!("nats://127.0.0.1:{port}"), 0, 1).await else {
        panic!("connected to nothing");
    };
    assert!(
        e.to_string().contains("cannot reach the NATS server"),
        "{e}"
    );
}

/// `netkit members --json URL`, the real binary: the report it prints.
async fn members_json(http: std::net::SocketAddr) -> serde_json::Value {
    let url = format!("http://{http}");
    let out = tokio::task::spawn_blocking(move || {
        proc_util::bin()
            .args(["members", "--json", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_shows_the_hubs_the_engine_shows() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (_a_dir, mut a) = serve_binary(&nats.url(), &[]).await;
    let (_b_dir, mut b) = serve_binary(&nats.url(), &[]).await;
    let name_of = |k: &mut proc_util::Netkit| {
        let line = k.wait_for("broker: room messages go through", T);
        line.split("node=")
            .nth(1)
            .and_then(|n| n.split_whitespace().next())
            .expect("the hub logs its name")
            .to_string()
    };
    let (a_name, b_name) = (name_of(&mut a), name_of(&mut b));
    let (a_http, b_http) = (a.ready.http.unwrap(), b.ready.http.unwrap());
    let (_ann, _, _) = ws_join(b_http, "ann", None).await;
    // Hub A learns B and its user from B's presence beats (at most a second
    // apart, or sooner after a join).
    let deadline = std::time::Instant::now() + T;
    let report = loop {
        let r = members_json(a_http).await;
        let members = r["members"].as_array().unwrap();
        if members.len() == 2 && members[1]["users"] == serde_json::json!(["ann"]) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hub B never shown: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(report["clustering"], true, "{report}");
    assert_eq!(report["broker"], true, "{report}");
    assert_eq!(report["node"], a_name.as_str(), "{report}");
    let (me, other) = (&report["members"][0], &report["members"][1]);
    assert_eq!(
        (me["self"].as_bool(), me["name"].as_str()),
        (Some(true), Some(a_name.as_str()))
    );
    assert_eq!(me["http"], a_http.to_string());
    assert_eq!(other["name"], b_name.as_str());
    assert_eq!(other["state"], "alive");
    assert_eq!(other["http"], b_http.to_string());
    assert_eq!(other["chat"], b.ready.chat.unwrap().to_string());
    assert!(other["last_heard_ms"].as_u64().unwrap() < 3_000, "{other}");
    // The table shows when each hub was last heard instead of gossip addresses.
    let url = format!("http://{a_http}");
    let out = tokio::task::spawn_blocking(move || {
        proc_util::bin().args(["members", &url]).output().unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("HEARD"), "{table}");
    assert!(lines[1].starts_with(&format!("{a_name} *")), "{table}");
    assert!(
        lines[2].starts_with(&b_name) && lines[2].contains("s ago"),
        "{table}"
    );
    assert!(
        lines[2].contains(&b_http.to_string()) && lines[2].ends_with("ann"),
        "{table}"
    );

    // A hub that stops is no longer shown once it has not been heard for the expiry.
    b.terminate();
    let deadline = std::time::Instant::now() + broker::events::LEAVE_BOUND + T;
    loop {
        let r = members_json(a_http).await;
        if r["members"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hub B still shown: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(a);
    nats.stop().await;
}

#[test]
fn broker_with_gossip_flags_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for gossip in [["--join", ""], ["--cluster-listen", "127.0.0.1:0"]] {
        let out = proc_util::bin()
            .args(["serve", "--broker", "nats://127.0.0.1:1", "--data-dir"])
            .arg(dir.path())
            .args(gossip)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--broker replaces the gossip cluster") && err.contains("drop --join"),
            "{err}"
        );
    }
}

/// The topic of `room` on `node` once it is `want` (polled, with a deadline).
async fn topic_becomes(node: &Node, room: &str, want: &str) {
    let topic = || {
        node.hub
            .rooms()
            .into_iter()
            .find(|r| r.name == room)
            .map(|r| r.topic)
    };
    let deadline = tokio::time::Instant::now() + T;
    while topic().as_deref() != Some(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{room}'s topic is {:?}, not {want:?}",
            topic()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The topic of `room` the engine's topics stream holds last, once the
/// stream holds entries up to sequence `seq` (polled, with a deadline).
async fn stream_last_topic(url: &str, room: &str, seq: u64) -> String {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = js.get_stream(broker::wire::TOPICS_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while stream.info().await.unwrap().state.last_sequence < seq {
        assert!(tokio::time::Instant::now() < deadline, "no entry {seq}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let subject = broker::wire::topic_subject(room);
    let m = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    broker::wire::decode_topic(&subject, &m.payload)
        .unwrap()
        .change
        .topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_starts_later_gets_each_rooms_last_topic() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let a = Node::start(&nats.url()).await;
    let (ann, _ann_in) = a.client("ann", None).await;
    ann.join("dev", None).await.unwrap();
    ann.settle().await;
    ann.topic("lobby", "first".into()).await.unwrap();
    ann.topic("lobby", "second".into()).await.unwrap();
    ann.topic("dev", "builds".into()).await.unwrap();

    // A hub that was not there when they were set has every room's last
    // topic, stored, and shows it to a member who joins there.
    let c = Node::start(&nats.url()).await;
    topic_becomes(&c, "lobby", "second").await;
    topic_becomes(&c, "dev", "builds").await;
    let (mut cid, mut cid_in) = c.hub.connect(Some("cid")).unwrap();
    cid.handle(ClientMsg::Join {
        room: "dev".into(),
        after: None,
        since: None,
    })
    .await
    .unwrap();
    let joined = next_event(&mut cid_in, "the join", |m| {
        matches!(m, ServerMsg::Joined { .. })
    })
    .await;
    let ServerMsg::Joined { topic, .. } = joined else {
        unreachable!()
    };
    assert_eq!(topic, "builds");

    // A topic set on the later hub reaches the first one as before.
    cid.topic("dev", "green".into()).await.unwrap();
    topic_becomes(&a, "dev", "green").await;

    // Two topics set at once on two hubs: both hubs end with the same one,
    // the one the engine stored last.
    // Entries so far: lobby twice, dev twice (builds, green).
    for round in 0..5u64 {
        let (x, y) = (format!("from a {round}"), format!("from c {round}"));
        let (ra, rc) = tokio::join!(ann.topic("dev", x.clone()), cid.topic("dev", y.clone()));
        ra.unwrap();
        rc.unwrap();
        // Once both entries of the round are stored, the last is one of them.
        let last = stream_last_topic(&nats.url(), "dev", 6 + 2 * round).await;
        assert!(last == x || last == y, "{last}");
        topic_becomes(&a, "dev", &last).await;
        topic_becomes(&c, "dev", &last).await;
    }
    drop((ann, cid));
    stop_all([a, c], nats).await;
}

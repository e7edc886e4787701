//! Resume by origin vector (`join` with `since`) without sockets: two hubs
//! stand for two cluster nodes, with the relay's part played by hand (the
//! messages posted on one, read from its log, applied to the other with
//! `apply_remote`).

use std::collections::BTreeMap;

use netkit::chat::hub::{Hub, HubConfig, HubError, Inbox, Received, Session};
use netkit::chat::protocol::{ChatMessage, ServerMsg};
use netkit::chat::store::{LogMessage, Store};

fn unlimited() -> HubConfig {
    HubConfig {
        rate: 0.0,
        ..HubConfig::default()
    }
}

struct Node {
    hub: Hub,
    /// The node's store read as the relay reads it, and how far it has been read.
    log: Store,
    origin: String,
    taken: u64,
    _dir: tempfile::TempDir,
}

fn node(origin: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node_in(dir.path(), origin);
    node._dir = dir;
    node
}

/// A message taken from a node's log: its log entry (for `apply_remote`),
/// and as the node's clients saw it (`Deref`).
struct Logged {
    entry: LogMessage,
    shown: ChatMessage,
}

impl std::ops::Deref for Logged {
    type Target = ChatMessage;
    fn deref(&self) -> &ChatMessage {
        &self.shown
    }
}

/// Applies every message posted on `from` so far (and not yet relayed) to
/// `to`, as the relay does, and waits until `to` has stored them.
async fn relay(from: &mut Node, to: &Node) {
    let msgs = take(from).await;
    apply(to, &msgs).await;
}

/// Takes the messages posted on `from` so far without applying them anywhere.
async fn take(from: &mut Node) -> Vec<Logged> {
    from.hub.sync_writes().await.unwrap();
    let entries = from
        .log
        .log_after(&from.origin, from.taken, 10_000)
        .unwrap();
    from.taken = entries.last().map_or(from.taken, |m| m.seq);
    assert_eq!(from.taken, *from.hub.local_seq().borrow());
    entries
        .into_iter()
        .map(|entry| Logged {
            // A local message's origin id is its id in the room here.
            shown: ChatMessage {
                room: entry.room.clone(),
                id: entry.origin_id,
                from: entry.from.clone(),
                text: entry.text.clone(),
                ts: entry.ts,
                kind: entry.kind,
                origin: Some(entry.origin.clone().into()),
                origin_id: entry.origin_id,
                file: None,
            },
            entry,
        })
        .collect()
}

async fn apply(to: &Node, msgs: &[Logged]) {
    for m in msgs {
        to.hub.apply_remote(m.entry.clone()).await.unwrap();
    }
    to.hub.sync_writes().await.unwrap();
}

async fn next(inbox: &mut Inbox) -> ServerMsg {
    match inbox.recv().await {
        Received::Event(ev) => ev.msg.clone(),
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn connect(hub: &Hub, nick: &str) -> (Session, Inbox) {
    let (s, mut i) = hub.connect(Some(nick)).unwrap();
    assert!(matches!(next(&mut i).await, ServerMsg::Welcome { .. }));
    (s, i)
}

/// Joins with `since` and returns (`joined`'s truncated, the history).
async fn resume(
    s: &Session,
    i: &mut Inbox,
    room: &str,
    since: Option<BTreeMap<String, u64>>,
) -> (bool, Vec<ChatMessage>) {
    s.resume(room, None, since).await.unwrap();
    let (n, truncated) = loop {
        if let ServerMsg::Joined {
            history, truncated, ..
        } = next(i).await
        {
            break (history, truncated);
        }
    };
    let mut hist = Vec::new();
    for _ in 0..n {
        match next(i).await {
            ServerMsg::Message(m) => hist.push(m),
            other => panic!("expected history, got {other:?}"),
        }
    }
    (truncated, hist)
}

async fn say(s: &Session, room: &str, text: &str) {
    s.say(room, text.into(), Default::default()).await.unwrap();
}

/// What a client keeps: per origin, the highest origin id seen.
fn vector(seen: &[ChatMessage]) -> BTreeMap<String, u64> {
    let mut v = BTreeMap::new();
    for m in seen {
        let e = v
            .entry(m.origin.clone().unwrap().into_string())
            .or_insert(0);
        *e = (*e).max(m.origin_id);
    }
    v
}

fn texts(v: &[ChatMessage]) -> Vec<&str> {
    v.iter().map(|m| m.text.as_str()).collect()
}

/// Every message queued for the client right now (the hub has committed
/// and fanned out everything before `sync_writes` returned).
fn drain(i: &mut Inbox) -> Vec<ChatMessage> {
    let mut out = Vec::new();
    while let Some(ev) = i.try_recv() {
        if let ServerMsg::Message(m) = &ev.msg {
            out.push(m.clone());
        }
    }
    out
}

#[tokio::test]
async fn since_resumes_on_another_node_with_no_gap_and_no_duplicate() {
    let mut a = node("a/1");
    let mut b = node("b/1");
    let (ann, mut ai) = connect(&a.hub, "ann").await; // a client of node a
    let (bob, mut bi) = connect(&b.hub, "bob").await; // a user of node b
    resume(&ann, &mut ai, "lobby", None).await;
    resume(&bob, &mut bi, "lobby", None).await;
    // Interleaved messages from a and b, relayed both ways.
    say(&ann, "lobby", "a1").await;
    relay(&mut a, &b).await;
    say(&bob, "lobby", "b1").await;
    say(&bob, "lobby", "b2").await;
    relay(&mut b, &a).await;
    say(&ann, "lobby", "a2").await;
    relay(&mut a, &b).await;
    a.hub.sync_writes().await.unwrap();
    let seen = drain(&mut ai);
    assert_eq!(texts(&seen), ["a1", "b1", "b2", "a2"]);
    // Every message carries its origin; local ones their own id.
    assert!(seen.iter().all(|m| m.origin.is_some()));
    assert_eq!(seen[0].origin.as_deref(), Some("a/1"));
    assert_eq!(seen[0].origin_id, seen[0].id);
    let v = vector(&seen);
    drop(ann);
    drain(&mut bi);

    // Meanwhile: more on both nodes; b has a's new ones too.
    let (ann2, mut a2i) = connect(&a.hub, "ann2").await;
    resume(&ann2, &mut a2i, "lobby", None).await;
    say(&ann2, "lobby", "a3").await;
    say(&bob, "lobby", "b3").await;
    relay(&mut a, &b).await;
    say(&ann2, "lobby", "a4").await;
    relay(&mut a, &b).await;
    say(&bob, "lobby", "b4").await;
    relay(&mut b, &a).await;
    // Ids differ per node: on b, "a3" has another id than on a.
    // The client comes back on node b with its vector.
    let (ann3, mut a3i) = connect(&b.hub, "ann").await;
    let (truncated, hist) = resume(&ann3, &mut a3i, "lobby", Some(v)).await;
    assert!(!truncated);
    // In b's order: b3 was posted on b before a3 arrived there.
    assert_eq!(texts(&hist), ["b3", "a3", "a4", "b4"]);
    // Then live ones, once.
    say(&ann2, "lobby", "a5").await;
    relay(&mut a, &b).await;
    say(&ann3, "lobby", "b5").await;
    b.hub.sync_writes().await.unwrap();
    assert_eq!(texts(&drain(&mut a3i)), ["a5", "b5"]);

    // An empty vector: everything (with an origin); a full one: nothing.
    let (c, mut ci) = connect(&b.hub, "carol").await;
    let (_, all) = resume(&c, &mut ci, "lobby", Some(BTreeMap::new())).await;
    assert_eq!(all.len(), 10);
    let (d, mut di) = connect(&b.hub, "dave").await;
    let (_, none) = resume(&d, &mut di, "lobby", Some(vector(&all))).await;
    assert!(none.is_empty());
    // Unknown origins are ignored for history.
    let (e, mut ei) = connect(&b.hub, "eve").await;
    let mut v = vector(&all);
    v.insert("zz/9".into(), 3);
    let (_, none) = resume(&e, &mut ei, "lobby", Some(v)).await;
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_node_behind_the_client_does_not_deliver_twice() {
    let mut a = node("a/1");
    let b = node("b/1");
    let (ann, mut ai) = connect(&a.hub, "ann").await;
    resume(&ann, &mut ai, "r", None).await;
    for i in 1..=3 {
        say(&ann, "r", &format!("m{i}")).await;
    }
    let early = take(&mut a).await;
    apply(&b, &early).await; // b has m1..m3
    for i in 4..=5 {
        say(&ann, "r", &format!("m{i}")).await;
    }
    let late = take(&mut a).await; // m4, m5: not yet on b (a partition)
    a.hub.sync_writes().await.unwrap();
    let seen = drain(&mut ai);
    assert_eq!(seen.len(), 5);
    let v = vector(&seen);
    // The client moves to b, which is behind it for origin a.
    let (c, mut ci) = connect(&b.hub, "ann-b").await;
    let (_, hist) = resume(&c, &mut ci, "r", Some(v)).await;
    assert!(hist.is_empty());
    // b catches up (m4, m5) and gets a new one (m6): the client gets m6 only.
    say(&ann, "r", "m6").await;
    let newer = take(&mut a).await;
    apply(&b, &late).await;
    apply(&b, &newer).await;
    assert_eq!(texts(&drain(&mut ci)), ["m6"]);
    // Another client of b without a vector got all three.
    let (d, mut di) = connect(&b.hub, "dave").await;
    let (_, hist) = resume(&d, &mut di, "r", None).await;
    assert_eq!(texts(&hist), ["m1", "m2", "m3", "m4", "m5", "m6"]);
    // The floor is gone once passed: later ones arrive normally.
    say(&ann, "r", "m7").await;
    let m7 = take(&mut a).await;
    apply(&b, &m7).await;
    assert_eq!(texts(&drain(&mut ci)), ["m7"]);
}

#[tokio::test]
async fn since_is_bounded_and_truncates_like_after() {
    let mut a = node("a/1");
    let (ann, mut ai) = connect(&a.hub, "ann").await;
    resume(&ann, &mut ai, "r", None).await;
    // Bounds: too many origins, or an origin name too long, is refused.
    let many: BTreeMap<String, u64> = (0..10_000).map(|i| (format!("n{i}/x"), 1)).collect();
    let err = ann.resume("q", None, Some(many)).await.unwrap_err();
    assert!(matches!(err, HubError::BadSince(_)));
    assert_eq!(err.code(), "bad_message");
    let long = BTreeMap::from([("x".repeat(500), 1)]);
    assert!(ann.resume("q", None, Some(long)).await.is_err());
    let empty_name = BTreeMap::from([(String::new(), 1)]);
    assert!(ann.resume("q", None, Some(empty_name)).await.is_err());
    // Huge numbers are fine (beyond everything: nothing to replay).
    let (h, mut hi) = connect(&a.hub, "huge").await;
    let (_, none) = resume(
        &h,
        &mut hi,
        "r",
        Some(BTreeMap::from([("a/1".into(), u64::MAX)])),
    )
    .await;
    assert!(none.is_empty());
    // More missed than the resume limit: the newest 500, truncated.
    for i in 0..510 {
        say(&ann, "r", &format!("m{i}")).await;
    }
    take(&mut a).await;
    let (c, mut ci) = connect(&a.hub, "carol").await;
    let (truncated, hist) = resume(&c, &mut ci, "r", Some(BTreeMap::new())).await;
    assert!(truncated);
    assert_eq!(hist.len(), 500);
    assert_eq!(hist[0].text, "m10");
    let (d, mut di) = connect(&a.hub, "dave").await;
    let v = BTreeMap::from([("a/1".to_string(), hist[489].origin_id)]);
    let (truncated, hist) = resume(&d, &mut di, "r", Some(v)).await;
    assert!(!truncated);
    assert_eq!(
        texts(&hist),
        (500..510).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn without_clustering_since_falls_back_to_after_and_messages_have_no_origin() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path(), unlimited()).unwrap().0;
    let (ann, mut ai) = connect(&hub, "ann").await;
    resume(&ann, &mut ai, "r", None).await;
    for t in ["x", "y", "z"] {
        say(&ann, "r", t).await;
    }
    hub.sync_writes().await.unwrap();
    let seen = drain(&mut ai);
    assert!(seen.iter().all(|m| m.origin.is_none() && m.origin_id == 0));
    let json = ServerMsg::Message(seen[0].clone()).to_json();
    assert!(!json.contains("origin"), "{json}");
    let (b, mut bi) = connect(&hub, "bob").await;
    b.resume("r", Some(1), Some(BTreeMap::from([("a/1".into(), 9)])))
        .await
        .unwrap();
    let n = loop {
        if let ServerMsg::Joined { history, .. } = next(&mut bi).await {
            break history;
        }
    };
    assert_eq!(n, 2);
}

/// A history database made before the origin columns opens, keeps its
/// messages (without origin) and stores new ones with theirs.
#[tokio::test]
async fn an_old_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("chat.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE rooms (name TEXT PRIMARY KEY, topic TEXT NOT NULL DEFAULT '',
                                 created_ms INTEGER NOT NULL);
             CREATE TABLE messages (room TEXT NOT NULL, id INTEGER NOT NULL, nick TEXT NOT NULL,
                 text TEXT NOT NULL, ts_ms INTEGER NOT NULL, kind TEXT NOT NULL DEFAULT 'say',
                 PRIMARY KEY (room, id)) WITHOUT ROWID;
             INSERT INTO rooms VALUES ('r', 'old topic', 1);
             INSERT INTO messages VALUES ('r', 1, 'ann', 'old one', 10, 'say');
             INSERT INTO messages VALUES ('r', 2, 'bob', 'old two', 11, 'me');",
        )
        .unwrap();
    }
    let mut a = node_in(dir.path(), "a/1");
    let (ann, mut ai) = connect(&a.hub, "ann").await;
    let (_, hist) = resume(&ann, &mut ai, "r", None).await;
    assert_eq!(texts(&hist), ["old one", "old two"]);
    assert!(hist.iter().all(|m| m.origin.is_none()));
    say(&ann, "r", "new").await;
    let posted = take(&mut a).await;
    assert_eq!(posted[0].id, 3);
    assert_eq!(posted[0].origin_id, 3);
    // Old rows have no origin: a resume by origin vector skips them.
    let (c, mut ci) = connect(&a.hub, "carol").await;
    let (_, hist) = resume(&c, &mut ci, "r", Some(BTreeMap::new())).await;
    assert_eq!(texts(&hist), ["new"]);
    let page = a.hub.history("r", None, None, 50).unwrap();
    assert_eq!(texts(&page), ["old one", "old two", "new"]);
    drop((ann, c));
    a.hub.shutdown();
    // Opening it again (already migrated) works too.
    let b = Hub::open(dir.path(), unlimited()).unwrap().0;
    assert_eq!(b.history("r", None, None, 50).unwrap().len(), 3);
}

fn node_in(dir: &std::path::Path, origin: &str) -> Node {
    let hub = Hub::open(dir, unlimited()).unwrap().0;
    assert!(hub.set_origin(origin.into()));
    let log = Store::open_in(dir).unwrap();
    let taken = log.log_heads().unwrap().get(origin).copied().unwrap_or(0);
    Node {
        hub,
        log,
        origin: origin.into(),
        taken,
        _dir: tempfile::tempdir().unwrap(),
    }
}

/// Malformed `since` over WebSocket JSON: a `bad_message` error naming the
/// problem (the connection stays; see tests/chat_net.rs for the socket side).
#[test]
fn malformed_since_is_a_bad_message() {
    use netkit::chat::ws::parse_client_msg;
    for bad in [
        r#"{"type":"join","room":"r","since":[1,2]}"#,
        r#"{"type":"join","room":"r","since":"a/1:3"}"#,
        r#"{"type":"join","room":"r","since":{"a/1":-1}}"#,
        r#"{"type":"join","room":"r","since":{"a/1":1.5}}"#,
        r#"{"type":"join","room":"r","since":{"a/1":"3"}}"#,
        r#"{"type":"join","room":"r","since":{"a/1":18446744073709551616}}"#,
    ] {
        match parse_client_msg(bad) {
            Err(ServerMsg::Error { code, message }) => {
                assert_eq!(code, "bad_message", "{bad}");
                assert!(
                    message.contains("since") || message.contains("invalid"),
                    "{message}"
                );
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // null is the same as absent.
    assert!(parse_client_msg(r#"{"type":"join","room":"r","since":null}"#).is_ok());
    assert!(parse_client_msg(r#"{"type":"join","room":"r","since":{"a/1":3},"after":7}"#).is_ok());
}

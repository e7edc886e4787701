//! Hub logic without sockets: rooms, nicks, direct messages, history paging,
//! resume-from-id, rate limiting, the slow-client policy (paused clock) and
//! presence from other cluster nodes. One behaviour per test.

use std::sync::atomic::Ordering;
use std::time::Duration;

use netkit::chat::hub::{
    DisconnectReason, Hub, HubConfig, HubError, Inbox, Received, RemotePresence, Session,
};
use netkit::chat::protocol::{
    ChatMessage, ClientMsg, MessageKind, PresenceEvent, RemoteMember, ServerMsg,
};

/// A hub in a temporary directory of its own, removed when this is dropped.
struct TestHub {
    hub: Hub,
    _dir: tempfile::TempDir,
}

impl TestHub {
    fn new(cfg: HubConfig) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path(), cfg).unwrap().0;
        TestHub { hub, _dir: dir }
    }
}

impl std::ops::Deref for TestHub {
    type Target = Hub;

    fn deref(&self) -> &Hub {
        &self.hub
    }
}

fn unlimited() -> HubConfig {
    HubConfig {
        rate: 0.0,
        ..HubConfig::default()
    }
}

async fn next(inbox: &mut Inbox) -> ServerMsg {
    match inbox.recv().await {
        Received::Event(ev) => ev.msg.clone(),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Skips messages until one matches `f`.
async fn until<T>(inbox: &mut Inbox, mut f: impl FnMut(&ServerMsg) -> Option<T>) -> T {
    loop {
        let m = next(inbox).await;
        if let Some(t) = f(&m) {
            return t;
        }
    }
}

async fn connect(hub: &Hub, nick: &str) -> (Session, Inbox) {
    let (s, mut i) = hub.connect(Some(nick)).unwrap();
    assert_eq!(next(&mut i).await, ServerMsg::Welcome { nick: nick.into() });
    (s, i)
}

async fn join(
    s: &Session,
    i: &mut Inbox,
    room: &str,
    after: Option<u64>,
) -> (usize, Vec<ChatMessage>) {
    s.join(room, after).await.unwrap();
    let n = until(i, |m| match m {
        ServerMsg::Joined { history, .. } => Some(*history),
        _ => None,
    })
    .await;
    let mut hist = Vec::new();
    for _ in 0..n {
        match next(i).await {
            ServerMsg::Message(m) => hist.push(m),
            other => panic!("expected history, got {other:?}"),
        }
    }
    (n, hist)
}

/// Connects `nick` and joins it to `room`, its history read.
async fn member(hub: &Hub, nick: &str, room: &str) -> (Session, Inbox) {
    let (s, mut i) = connect(hub, nick).await;
    join(&s, &mut i, room, None).await;
    (s, i)
}

async fn message(i: &mut Inbox) -> ChatMessage {
    until(i, |m| match m {
        ServerMsg::Message(m) => Some(m.clone()),
        _ => None,
    })
    .await
}

/// A hub with `ann` and `bob` in `lobby`.
async fn lobby_pair() -> (TestHub, (Session, Inbox), (Session, Inbox)) {
    let hub = TestHub::new(unlimited());
    let ann = member(&hub, "ann", "lobby").await;
    let bob = member(&hub, "bob", "lobby").await;
    (hub, ann, bob)
}

#[tokio::test]
async fn joins_are_announced_and_messages_reach_every_member() {
    let (_hub, (ann, mut ai), (bob, mut bi)) = lobby_pair().await;
    assert_eq!(
        next(&mut ai).await,
        ServerMsg::Presence {
            room: "lobby".into(),
            nick: "bob".into(),
            event: PresenceEvent::Join,
            node: None,
            reason: None,
        }
    );
    ann.say("lobby", "hello".into(), MessageKind::Say)
        .await
        .unwrap();
    bob.say("lobby", "waves".into(), MessageKind::Me)
        .await
        .unwrap();
    for inbox in [&mut ai, &mut bi] {
        let m1 = message(inbox).await;
        let m2 = message(inbox).await;
        assert_eq!(
            (m1.id, m1.from.as_str(), m1.text.as_str()),
            (1, "ann", "hello")
        );
        assert_eq!((m2.id, m2.kind), (2, MessageKind::Me));
    }
}

#[tokio::test]
async fn non_members_cannot_say_and_bad_joins_are_refused() {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = member(&hub, "ann", "lobby").await;
    // Not a member: refused, nothing stored.
    ann.say("other", "x".into(), MessageKind::Say)
        .await
        .unwrap();
    let err = until(&mut ai, |m| match m {
        ServerMsg::Error { code, .. } => Some(code.clone()),
        _ => None,
    })
    .await;
    assert_eq!(err, "not_member");
    assert_eq!(hub.rooms().len(), 1);
    assert!(matches!(
        ann.join("bad room!", None).await,
        Err(HubError::BadRoom(..))
    ));
    assert!(matches!(
        ann.join(&"x".repeat(33), None).await,
        Err(HubError::BadRoom(..))
    ));
    assert!(matches!(
        ann.join("lobby", None).await,
        Err(HubError::AlreadyJoined(_))
    ));
}

#[tokio::test]
async fn topics_and_member_lists_reach_members() {
    let (_hub, (ann, _ai), (bob, mut bi)) = lobby_pair().await;
    ann.topic("lobby", "rust".into()).await.unwrap();
    let t = until(&mut bi, |m| match m {
        ServerMsg::Topic { topic, by, .. } => Some((topic.clone(), by.clone())),
        _ => None,
    })
    .await;
    assert_eq!(t, ("rust".into(), "ann".into()));
    bob.who("lobby").unwrap();
    let who = until(&mut bi, |m| match m {
        ServerMsg::Members { members, .. } => Some(members.clone()),
        _ => None,
    })
    .await;
    assert_eq!(who, vec!["ann".to_string(), "bob".to_string()]);
}

#[tokio::test]
async fn leaving_is_announced_and_the_room_list_counts_members() {
    let (hub, (ann, mut ai), (bob, _bi)) = lobby_pair().await;
    for (who, text) in [(&ann, "hello"), (&bob, "hi")] {
        who.say("lobby", text.into(), MessageKind::Say)
            .await
            .unwrap();
    }
    ann.topic("lobby", "rust".into()).await.unwrap();
    hub.sync_writes().await.unwrap();
    bob.part("lobby").unwrap();
    let left = until(&mut ai, |m| match m {
        ServerMsg::Presence {
            nick,
            event: PresenceEvent::Leave,
            ..
        } => Some(nick.clone()),
        _ => None,
    })
    .await;
    assert_eq!(left, "bob");
    let rooms = hub.rooms();
    assert_eq!(rooms.len(), 1);
    assert_eq!((rooms[0].members, rooms[0].last_id), (1, 2));
    assert_eq!(rooms[0].topic, "rust");
}

#[tokio::test]
async fn nicks_are_unique_and_well_formed() {
    let hub = TestHub::new(unlimited());
    let (_ann, _ai) = connect(&hub, "ann").await;
    let (bob, _bi) = connect(&hub, "bob").await;
    assert_eq!(bob.set_nick("ANN"), Err(HubError::NickTaken("ANN".into())));
    assert!(matches!(
        bob.set_nick("has space"),
        Err(HubError::BadNick(..))
    ));
    assert!(matches!(bob.set_nick(""), Err(HubError::BadNick(..))));
    assert!(matches!(
        bob.set_nick(&"b".repeat(25)),
        Err(HubError::BadNick(..))
    ));
}

#[tokio::test]
async fn a_taken_nick_at_connect_gets_a_unique_guest_name() {
    let hub = TestHub::new(unlimited());
    let (_ann, _ai) = connect(&hub, "ann").await;
    // Asking for a taken nick at connect gives a guest name and says why.
    let (_dup, mut di) = hub.connect(Some("Ann")).unwrap();
    assert!(
        matches!(next(&mut di).await, ServerMsg::Welcome { nick } if nick.starts_with("guest-"))
    );
    assert!(matches!(next(&mut di).await, ServerMsg::Error { code, .. } if code == "nick_taken"));
    // Guests get unique generated names.
    let (g, mut gi) = hub.connect(None).unwrap();
    let ServerMsg::Welcome { nick } = next(&mut gi).await else {
        panic!()
    };
    assert!(nick.starts_with("guest-"));
    assert_eq!(g.nick(), nick);
}

#[tokio::test]
async fn direct_messages_reach_the_recipient_and_the_sender_only() {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = connect(&hub, "ann").await;
    let (_bob, mut bi) = connect(&hub, "bob").await;
    let (cat, mut ci) = connect(&hub, "cat").await;
    // To the recipient and echoed to the sender, nobody else.
    ann.direct("Bob", "psst".into()).unwrap();
    for inbox in [&mut ai, &mut bi] {
        let d = next(inbox).await;
        assert!(
            matches!(&d, ServerMsg::Direct { from, to, text, .. } if from == "ann" && to == "bob" && text == "psst"),
            "{d:?}"
        );
    }
    assert_eq!(
        ann.direct("nobody", "x".into()),
        Err(HubError::NoSuchUser("nobody".into()))
    );
    // Nothing leaked to cat from the direct message.
    cat.who("lobby").unwrap();
    assert!(matches!(next(&mut ci).await, ServerMsg::Members { .. }));
}

#[tokio::test]
async fn renames_and_disconnects_free_nicks() {
    let hub = TestHub::new(unlimited());
    let (ann, _ai) = connect(&hub, "ann").await;
    let (bob, mut bi) = connect(&hub, "bob").await;
    let (cat, mut ci) = connect(&hub, "cat").await;
    // A rename frees the old nick and is told to the renamer.
    bob.set_nick("robert").unwrap();
    assert_eq!(
        next(&mut bi).await,
        ServerMsg::Nick {
            old: "bob".into(),
            new: "robert".into(),
            node: None,
        }
    );
    cat.set_nick("bob").unwrap();
    assert!(matches!(next(&mut ci).await, ServerMsg::Nick { .. }));
    // A disconnect frees the nick.
    drop(ann);
    cat.set_nick("ann").unwrap();
}

#[tokio::test]
async fn history_on_join_paging_and_resume() {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = connect(&hub, "ann").await;
    join(&ann, &mut ai, "r", None).await;
    for i in 1..=60 {
        ann.say("r", format!("m{i}"), MessageKind::Say)
            .await
            .unwrap();
    }
    for i in 1..=60 {
        assert_eq!(message(&mut ai).await.id, i);
    }
    // A new joiner gets the last 50, oldest first.
    let (bob, mut bi) = connect(&hub, "bob").await;
    let (n, hist) = join(&bob, &mut bi, "r", None).await;
    assert_eq!(n, 50);
    assert_eq!(hist.first().unwrap().id, 11);
    assert_eq!(hist.last().unwrap().text, "m60");
    // A returning client gets exactly what it missed.
    let (cat, mut ci) = connect(&hub, "cat").await;
    let (n, hist) = join(&cat, &mut ci, "r", Some(42)).await;
    assert_eq!(n, 18);
    assert_eq!(
        hist.iter().map(|m| m.id).collect::<Vec<_>>(),
        (43..=60).collect::<Vec<_>>()
    );
    // Paging through the store.
    let ids = |v: Vec<ChatMessage>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
    let h = hub.clone();
    let page = tokio::task::spawn_blocking(move || {
        (
            ids(h.history("r", None, None, 5).unwrap()),
            ids(h.history("r", None, Some(20), 5).unwrap()),
            ids(h.history("r", Some(20), None, 5).unwrap()),
            ids(h.history("r", Some(20), Some(23), 5).unwrap()),
            ids(h.history("nope", None, None, 5).unwrap()),
        )
    })
    .await
    .unwrap();
    assert_eq!(page.0, vec![56, 57, 58, 59, 60]);
    assert_eq!(page.1, vec![15, 16, 17, 18, 19]);
    assert_eq!(page.2, vec![21, 22, 23, 24, 25]);
    assert_eq!(page.3, vec![21, 22]);
    assert!(page.4.is_empty());
}

/// Joining while messages flow: history and live messages meet with no gap and
/// no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_messages_flow_has_no_gap_or_duplicate() {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = connect(&hub, "ann").await;
    join(&ann, &mut ai, "r", None).await;
    for i in 0..20 {
        ann.say("r", format!("pre{i}"), MessageKind::Say)
            .await
            .unwrap();
    }
    let sender = tokio::spawn(async move {
        // Fewer than the 500 a resume replays at most, however far the
        // sender gets before bob joins: the test is about the seam, not the cap.
        for i in 0..300 {
            ann.say("r", format!("live{i}"), MessageKind::Say)
                .await
                .unwrap();
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        ann
    });
    let (bob, mut bi) = connect(&hub, "bob").await;
    let (_, hist) = join(&bob, &mut bi, "r", Some(10)).await;
    let mut seen: Vec<u64> = hist.iter().map(|m| m.id).collect();
    while seen.last().copied().unwrap_or(0) < 320 {
        seen.push(message(&mut bi).await.id);
    }
    let _ann = sender.await.unwrap();
    assert_eq!(seen, (11..=320).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn slow_client_is_disconnected_and_never_stalls_the_room() {
    let cfg = HubConfig {
        queue_messages: 8,
        rate: 0.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (ann, mut ai) = connect(&hub, "ann").await;
    let (slow, mut si) = connect(&hub, "slow").await;
    join(&ann, &mut ai, "r", None).await;
    join(&slow, &mut si, "r", None).await;
    assert!(matches!(
        next(&mut ai).await,
        ServerMsg::Presence {
            event: PresenceEvent::Join,
            ..
        }
    ));
    // ann reads everything; slow reads nothing while 30 messages are sent
    // (and the clock moves on: the policy depends on the queue, not on time).
    let mut seen_leave = false;
    for i in 1..=30u64 {
        ann.say("r", format!("m{i}"), MessageKind::Say)
            .await
            .unwrap();
        loop {
            match next(&mut ai).await {
                ServerMsg::Message(m) => {
                    assert_eq!(m.id, i);
                    break;
                }
                ServerMsg::Presence {
                    nick,
                    event: PresenceEvent::Leave,
                    ..
                } => {
                    assert_eq!(nick, "slow");
                    seen_leave = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // The slow client is told why, first thing.
    match si.recv().await {
        Received::Disconnected(DisconnectReason::Lagging { messages, .. }) => {
            assert_eq!(messages, 8)
        }
        other => panic!("expected lagging, got {other:?}"),
    }
    assert_eq!(hub.stats().dropped_lagging.load(Ordering::Relaxed), 1);
    // The room saw it leave, and goes on.
    assert!(seen_leave);
    assert_eq!(slow.rooms(), Vec::<String>::new());
    assert!(
        slow.say("r", "late".into(), MessageKind::Say)
            .await
            .is_err()
    );
    assert_eq!(hub.rooms()[0].members, 1);
}

#[tokio::test(start_paused = true)]
async fn byte_budget_also_bounds_the_queue() {
    let cfg = HubConfig {
        queue_messages: 1000,
        queue_bytes: 2000,
        rate: 0.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (ann, mut ai) = connect(&hub, "ann").await;
    let (slow, mut si) = connect(&hub, "slow").await;
    join(&ann, &mut ai, "r", None).await;
    join(&slow, &mut si, "r", None).await;
    for _ in 0..5 {
        ann.say("r", "x".repeat(500), MessageKind::Say)
            .await
            .unwrap();
        message(&mut ai).await;
    }
    assert!(matches!(
        si.recv().await,
        Received::Disconnected(DisconnectReason::Lagging { bytes: 2000, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn rate_limit_refills_with_time() {
    let cfg = HubConfig {
        rate: 2.0,
        burst: 3.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (mut ann, mut ai) = hub.connect(None).unwrap();
    next(&mut ai).await;
    let say = || ClientMsg::Say {
        room: "r".into(),
        text: "x".into(),
    };
    ann.handle(ClientMsg::Join {
        room: "r".into(),
        after: None,
        since: None,
    })
    .await
    .unwrap();
    ann.handle(say()).await.unwrap();
    ann.handle(say()).await.unwrap();
    assert_eq!(ann.handle(say()).await, Err(HubError::RateLimited(2.0)));
    tokio::time::advance(Duration::from_millis(500)).await;
    ann.handle(say()).await.unwrap();
    assert_eq!(ann.handle(say()).await, Err(HubError::RateLimited(2.0)));
    // Only the accepted ones were stored.
    let last = until(&mut ai, |m| match m {
        ServerMsg::Message(m) if m.id == 3 => Some(m.id),
        _ => None,
    })
    .await;
    assert_eq!(last, 3);
}

#[tokio::test]
async fn bad_text_and_connection_cap() {
    let cfg = HubConfig {
        max_clients: 2,
        max_text: 10,
        rate: 0.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (ann, mut ai) = connect(&hub, "ann").await;
    join(&ann, &mut ai, "r", None).await;
    assert!(matches!(
        ann.say("r", String::new(), MessageKind::Say).await,
        Err(HubError::BadText { .. })
    ));
    assert!(matches!(
        ann.say("r", "x".repeat(11), MessageKind::Say).await,
        Err(HubError::BadText { .. })
    ));
    let _b = hub.connect(None).unwrap();
    assert!(matches!(hub.connect(None), Err(HubError::Full(2))));
}

#[tokio::test]
async fn history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = Hub::open(dir.path(), unlimited()).unwrap();
        let (ann, mut ai) = connect(&hub, "ann").await;
        join(&ann, &mut ai, "r", None).await;
        ann.topic("r", "kept".into()).await.unwrap();
        for i in 0..5 {
            ann.say("r", format!("m{i}"), MessageKind::Say)
                .await
                .unwrap();
        }
        for _ in 0..5 {
            message(&mut ai).await;
        }
        drop((ann, ai, hub));
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
    }
    let hub = Hub::open(dir.path(), unlimited()).unwrap().0;
    let rooms = hub.rooms();
    assert_eq!(
        (
            rooms[0].name.as_str(),
            rooms[0].last_id,
            rooms[0].topic.as_str()
        ),
        ("r", 5, "kept")
    );
    let (bob, mut bi) = connect(&hub, "bob").await;
    let (n, _) = join(&bob, &mut bi, "r", None).await;
    assert_eq!(n, 5);
    bob.say("r", "after restart".into(), MessageKind::Say)
        .await
        .unwrap();
    assert_eq!(message(&mut bi).await.id, 6);
}

#[tokio::test]
async fn big_rooms_skip_presence_events() {
    let cfg = HubConfig {
        presence_limit: 2,
        rate: 0.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (a, mut ai) = connect(&hub, "a").await;
    let (b, mut bi) = connect(&hub, "b").await;
    let (c, mut ci) = connect(&hub, "c").await;
    join(&a, &mut ai, "r", None).await;
    join(&b, &mut bi, "r", None).await;
    // a sees b join (room had 1 member < 2).
    assert!(matches!(next(&mut ai).await, ServerMsg::Presence { nick, .. } if nick == "b"));
    c.join("r", None).await.unwrap();
    let joined = next(&mut ci).await;
    let ServerMsg::Joined {
        members,
        member_count,
        ..
    } = joined
    else {
        panic!("{joined:?}")
    };
    assert_eq!((members.len(), member_count), (2, 3));
    // No presence for c (room had 2 members): the next thing a sees is a message.
    c.say("r", "hi".into(), MessageKind::Say).await.unwrap();
    assert!(matches!(next(&mut ai).await, ServerMsg::Message(m) if m.from == "c"));
}

#[tokio::test]
async fn busy_room_messages_share_a_batch_and_keep_their_order() {
    let hub = TestHub::new(HubConfig {
        batch_interval: Duration::from_millis(200),
        ..unlimited()
    });
    let (a, mut ai) = connect(&hub, "ann").await;
    let (b, mut bi) = connect(&hub, "bob").await;
    join(&a, &mut ai, "r", None).await;
    join(&b, &mut bi, "r", None).await;
    hub.sync_writes().await.unwrap();
    let before = hub.stats().batches.load(Ordering::Relaxed);
    // Queued within the interval after the last batch: one transaction.
    for n in 0..50 {
        a.say("r", format!("m{n}"), MessageKind::Say).await.unwrap();
    }
    hub.sync_writes().await.unwrap();
    let batches = hub.stats().batches.load(Ordering::Relaxed) - before;
    assert!(batches <= 3, "50 messages took {batches} batches");
    for n in 0..50 {
        assert_eq!(message(&mut ai).await.text, format!("m{n}"));
        assert_eq!(message(&mut bi).await.text, format!("m{n}"));
    }
}

// Presence heard from other nodes (what the cluster relay feeds the hub):
// local members get the same events as for local users, with the node
// added, member lists and counts include remote members, their nicks are
// taken here, and direct messages go out to the relay and come in from it.

/// `nick`, connected to node `b`.
fn on_b(nick: &str) -> RemoteMember {
    RemoteMember {
        nick: nick.into(),
        node: "b".into(),
    }
}

/// `member` of another node joining `lobby`, as the relay reports it.
fn joins_lobby(member: &RemoteMember) -> RemotePresence {
    RemotePresence::Join {
        room: "lobby".into(),
        member: member.clone(),
    }
}

/// A hub with `ann` in `lobby`, and `remote` (of node `b`) in `lobby` too,
/// its join read from ann's inbox.
async fn lobby_with_remote(remote: &RemoteMember) -> (TestHub, Session, Inbox) {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = member(&hub, "ann", "lobby").await;
    hub.apply_remote_presence(vec![joins_lobby(remote)], vec![remote.clone()]);
    assert!(matches!(
        next(&mut ai).await,
        ServerMsg::Presence {
            event: PresenceEvent::Join,
            ..
        }
    ));
    (hub, ann, ai)
}

#[tokio::test]
async fn outgoing_directs_are_taken_once() {
    let hub = TestHub::new(unlimited());
    assert!(hub.take_outgoing_directs().is_some());
    assert!(hub.take_outgoing_directs().is_none());
}

#[tokio::test]
async fn a_remote_join_is_announced_once_with_its_node() {
    let hub = TestHub::new(unlimited());
    let (ann, mut ai) = member(&hub, "ann", "lobby").await;
    let bob = on_b("bob");
    hub.apply_remote_presence(vec![joins_lobby(&bob)], vec![bob.clone()]);
    let ev = next(&mut ai).await;
    assert_eq!(
        ev.to_json(),
        r#"{"type":"presence","room":"lobby","nick":"bob","event":"join","node":"b"}"#
    );
    // The same join again (a resent snapshot) is not announced twice.
    hub.apply_remote_presence(vec![joins_lobby(&bob)], vec![bob.clone()]);
    ann.who("lobby").unwrap();
    let who = next(&mut ai).await;
    assert_eq!(
        who.to_json(),
        r#"{"type":"members","room":"lobby","members":["ann","bob"],"remote":[{"nick":"bob","node":"b"}]}"#
    );
}

#[tokio::test]
async fn the_room_list_counts_remote_members() {
    let (hub, _ann, _ai) = lobby_with_remote(&on_b("bob")).await;
    let lobby = hub.rooms().into_iter().find(|r| r.name == "lobby").unwrap();
    assert_eq!((lobby.members, lobby.remote), (2, 1));
}

#[tokio::test]
async fn remote_nicks_are_taken_here() {
    let (hub, ann, _ai) = lobby_with_remote(&on_b("bob")).await;
    // bob's nick is taken here too (case-insensitively).
    assert_eq!(ann.set_nick("Bob"), Err(HubError::NickTaken("Bob".into())));
    let (_x, mut xi) = hub.connect(Some("BOB")).unwrap();
    assert!(
        matches!(next(&mut xi).await, ServerMsg::Welcome { nick } if nick.starts_with("guest-"))
    );
    assert!(matches!(next(&mut xi).await, ServerMsg::Error { code, .. } if code == "nick_taken"));
}

#[tokio::test]
async fn a_local_join_lists_remote_members() {
    let bob = on_b("bob");
    let (hub, _ann, mut ai) = lobby_with_remote(&bob).await;
    // A local join lists the remote member; local events keep their old shape.
    let (cat, mut ci) = connect(&hub, "cat").await;
    cat.join("lobby", None).await.unwrap();
    let ServerMsg::Joined {
        members,
        remote,
        member_count,
        ..
    } = next(&mut ci).await
    else {
        panic!("expected joined");
    };
    assert_eq!(members, vec!["ann", "bob", "cat"]);
    assert_eq!(remote, vec![bob.clone()]);
    assert_eq!(member_count, 3);
    assert_eq!(
        next(&mut ai).await.to_json(),
        r#"{"type":"presence","room":"lobby","nick":"cat","event":"join"}"#
    );
}

#[tokio::test]
async fn a_remote_rename_is_announced_with_its_node() {
    let (hub, ann, mut ai) = lobby_with_remote(&on_b("bob")).await;
    hub.apply_remote_presence(
        vec![RemotePresence::Nick {
            node: "b".into(),
            old: "bob".into(),
            new: "rob".into(),
        }],
        vec![on_b("rob")],
    );
    assert_eq!(
        next(&mut ai).await.to_json(),
        r#"{"type":"nick","old":"bob","new":"rob","node":"b"}"#
    );
    // The old nick is free again.
    ann.set_nick("bob").unwrap();
}

#[tokio::test]
async fn directs_to_remote_users_go_to_the_relay_and_are_echoed() {
    let rob = on_b("rob");
    let (hub, ann, mut ai) = lobby_with_remote(&rob).await;
    let mut outgoing = hub.take_outgoing_directs().unwrap();
    ann.direct("rob", "psst".into()).unwrap();
    let out = outgoing.recv().await.unwrap();
    assert_eq!(
        (out.from.as_str(), &out.to, out.text.as_str()),
        ("ann", &rob, "psst")
    );
    assert!(matches!(next(&mut ai).await, ServerMsg::Direct { to, .. } if to == "rob"));
    ann.direct("rob@b", "again".into()).unwrap();
    assert_eq!(outgoing.recv().await.unwrap().to, rob);
    assert!(matches!(next(&mut ai).await, ServerMsg::Direct { to, .. } if to == "rob@b"));
    assert_eq!(
        ann.direct("rob@c", "x".into()),
        Err(HubError::NoSuchUser("rob@c".into()))
    );
}

#[tokio::test]
async fn directs_from_remote_users_reach_local_ones() {
    let rob = on_b("rob");
    let (hub, _ann, mut ai) = lobby_with_remote(&rob).await;
    let (_cat, _ci) = connect(&hub, "cat").await;
    assert!(hub.deliver_remote_direct(rob.clone(), "ann", "hi".into(), 5));
    assert!(
        matches!(next(&mut ai).await, ServerMsg::Direct { from, to, .. } if from == "rob" && to == "ann")
    );
    // A sender whose nick is in use here shows its node.
    assert!(hub.deliver_remote_direct(on_b("cat"), "ann", "hi".into(), 5));
    assert!(matches!(next(&mut ai).await, ServerMsg::Direct { from, .. } if from == "cat@b"));
    assert!(!hub.deliver_remote_direct(rob.clone(), "nobody", "hi".into(), 5));
    assert!(!hub.deliver_remote_direct(rob.clone(), "bad nick", "hi".into(), 5));
}

#[tokio::test]
async fn a_remote_leave_is_announced_with_its_reason() {
    let rob = on_b("rob");
    let (hub, ann, mut ai) = lobby_with_remote(&rob).await;
    let (_cat, _ci) = member(&hub, "cat", "lobby").await;
    hub.apply_remote_presence(
        vec![RemotePresence::Leave {
            room: "lobby".into(),
            member: rob.clone(),
            reason: Some("node down".into()),
        }],
        vec![],
    );
    until(&mut ai, |m| match m {
        ServerMsg::Presence { nick, .. } if nick == "cat" => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        next(&mut ai).await.to_json(),
        r#"{"type":"presence","room":"lobby","nick":"rob","event":"leave","node":"b","reason":"node down"}"#
    );
    ann.who("lobby").unwrap();
    assert!(
        matches!(next(&mut ai).await, ServerMsg::Members { members, remote, .. } if members == ["ann", "cat"] && remote.is_empty())
    );
    // The nick is free again.
    ann.set_nick("rob").unwrap();
}

#[tokio::test]
async fn local_presence_lists_local_users_and_their_rooms() {
    let (hub, _ann, _ai) = lobby_with_remote(&on_b("rob")).await;
    let (_bob, _bi) = member(&hub, "bob", "lobby").await;
    let (_cat, _ci) = member(&hub, "cat", "lobby").await;
    // The local presence the cluster is sent.
    let users = hub.local_presence();
    let nicks: Vec<(&str, Vec<String>)> = users
        .iter()
        .map(|u| (u.nick.as_str(), u.rooms.clone()))
        .collect();
    assert!(
        nicks.contains(&("bob", vec!["lobby".to_string()])),
        "{nicks:?}"
    );
    assert!(
        nicks.contains(&("cat", vec!["lobby".to_string()])),
        "{nicks:?}"
    );
    assert!(!nicks.iter().any(|(n, _)| *n == "rob"), "{nicks:?}");
}

#[tokio::test(start_paused = true)]
async fn refusals_of_one_spell_are_reported_together_with_their_count() {
    let cfg = HubConfig {
        rate: 0.5,
        burst: 1.0,
        ..HubConfig::default()
    };
    let hub = TestHub::new(cfg);
    let (mut ann, mut ai) = connect(&hub, "ann").await;
    // Nothing here awaits the writer thread, so the paused clock stands still.
    ann.handle(ClientMsg::Rooms).await.unwrap();
    let refuse = async |ann: &mut Session, n: usize| {
        for _ in 0..n {
            let e = ann.handle(ClientMsg::Rooms).await.unwrap_err();
            ann.report(e);
        }
    };
    // That took the only token: five refused, one error at once.
    refuse(&mut ann, 5).await;
    // Over a second later (still no token) a refusal reports itself and the
    // four before it; the next is counted.
    tokio::time::advance(Duration::from_millis(1200)).await;
    refuse(&mut ann, 2).await;
    // Accepted again: the unreported refusal is told first.
    tokio::time::advance(Duration::from_secs(1)).await;
    ann.handle(ClientMsg::Rooms).await.unwrap();
    let mut errors = Vec::new();
    while let Some(ev) = ai.try_recv() {
        if let ServerMsg::Error { message, .. } = &ev.msg {
            errors.push(message.clone());
        }
    }
    let more =
        |n: u32| format!("{n} more message(s) refused: the limit is 0.5 per second; slow down");
    assert_eq!(
        errors,
        [HubError::RateLimited(0.5).to_string(), more(5), more(1)]
    );
}

/// The log key of a message from another node: the same `(origin, seq)`
/// twice, in one batch or in two, is stored and shown once, and the room's
/// ids stay gap-free; local messages get this node's next sequence.
#[tokio::test]
async fn a_message_relayed_twice_is_stored_and_shown_once() {
    let hub = TestHub::new(unlimited());
    assert!(hub.set_origin("a/1".into()));
    let (ann, mut ai) = member(&hub, "ann", "lobby").await;
    let from_b = |seq: u64, text: &str| netkit::chat::store::LogMessage {
        origin: "b/2".into(),
        seq,
        room: "lobby".into(),
        from: "bob".into(),
        text: text.into(),
        kind: MessageKind::Say,
        ts: 1,
        origin_id: seq + 10,
        moderation: None,
        file: None,
    };
    for m in [from_b(1, "one"), from_b(1, "one"), from_b(2, "two")] {
        hub.apply_remote(m).await.unwrap();
    }
    hub.sync_writes().await.unwrap();
    hub.apply_remote(from_b(2, "two")).await.unwrap();
    // Queued after the duplicates: anything shown twice would come before it.
    ann.say("lobby", "mine".into(), MessageKind::Say)
        .await
        .unwrap();
    hub.sync_writes().await.unwrap();
    let got: Vec<(u64, String, u64)> = [
        message(&mut ai).await,
        message(&mut ai).await,
        message(&mut ai).await,
    ]
    .into_iter()
    .map(|m| (m.id, m.text, m.origin_id))
    .collect();
    assert_eq!(
        got,
        [
            (1, "one".into(), 11),
            (2, "two".into(), 12),
            (3, "mine".into(), 3)
        ]
    );
    assert_eq!(*hub.local_seq().borrow(), 1);
    let page = hub.history("lobby", None, None, 50).unwrap();
    assert_eq!(page.len(), 3);
}

/// A topic of `lobby` from another gossip node, set by zed at `ms` on `origin`.
fn gossip_topic(topic: &str, ms: i64, origin: &str) -> netkit::chat::hub::TopicChange {
    netkit::chat::hub::TopicChange {
        room: "lobby".into(),
        topic: topic.into(),
        by: "zed".into(),
        ms,
        origin: origin.into(),
    }
}

/// The next topic shown to `i`.
async fn topic_shown(i: &mut Inbox) -> (String, String) {
    until(i, |m| match m {
        ServerMsg::Topic { topic, by, .. } => Some((topic.clone(), by.clone())),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn gossip_topics_keep_the_later_setting_whatever_the_order() {
    let (hub, (ann, mut ai), _bob) = lobby_pair().await;
    let future = netkit::chat::protocol::now_ms() + 3_600_000;
    hub.apply_gossip_topic(gossip_topic("newer", future, "b/1"))
        .await
        .unwrap();
    assert_eq!(topic_shown(&mut ai).await, ("newer".into(), "zed".into()));
    // Older, and as old but from a lower origin: neither is stored nor shown.
    for (topic, ms, origin) in [("older", future - 1, "c/1"), ("tie, lower", future, "a/1")] {
        hub.apply_gossip_topic(gossip_topic(topic, ms, origin))
            .await
            .unwrap();
    }
    // The same again (a resend): nothing either.
    hub.apply_gossip_topic(gossip_topic("newer", future, "b/1"))
        .await
        .unwrap();
    hub.apply_gossip_topic(gossip_topic("tie, higher", future, "z/1"))
        .await
        .unwrap();
    assert_eq!(
        topic_shown(&mut ai).await,
        ("tie, higher".into(), "zed".into()),
        "the ignored ones were not shown in between"
    );
    let room = |hub: &Hub| hub.rooms().into_iter().find(|r| r.name == "lobby").unwrap();
    assert_eq!(room(&hub).topic, "tie, higher");

    // A topic set here replaces it even though this clock is an hour behind
    // the other node's: it is stamped just after the one it replaces.
    ann.topic("lobby", "ann's".into()).await.unwrap();
    assert_eq!(topic_shown(&mut ai).await, ("ann's".into(), "ann".into()));
    let held = hub.topics();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].topic.as_str(), held[0].by.as_str()),
        ("ann's", "ann")
    );
    assert_eq!(held[0].ms, future + 1);

    // Bad input from another node is refused, and changes nothing.
    let mut bad = gossip_topic("x", future + 10, "b/1");
    bad.by = "not a nick!".into();
    assert!(hub.apply_gossip_topic(bad).await.is_err());
    let mut bad = gossip_topic(&"t".repeat(10_000), future + 10, "b/1");
    bad.by = "zed".into();
    assert!(hub.apply_gossip_topic(bad).await.is_err());
    assert_eq!(room(&hub).topic, "ann's");
}

//! The hub's store as the cluster's one message log, with real memberships,
//! hubs and relays in one process over UDP on 127.0.0.1: a relay more than
//! 10,000 messages behind its hub still sends every one; a node killed
//! between its commit and its push (its runtime dropped, so no shutdown path
//! runs: no leave, no last push) restarts and every node ends up with each
//! message exactly once. Runtimes stand for processes: a node whose
//! current-thread runtime is not being driven is stopped, as if paused.

use std::path::Path;
use std::time::Duration;

use netkit::chat::hub::{Hub, HubConfig, Inbox, Received, Session};
use netkit::chat::protocol::{MessageKind, ServerMsg};
use netkit::chat::store::Store;
use netkit::cluster::{self, ClusterArgs, MemberState, Membership, NodeMeta};
use tokio::runtime::{Builder, Runtime};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DEADLINE: Duration = Duration::from_secs(60);

fn config() -> HubConfig {
    HubConfig {
        rate: 0.0,
        // Readers here take thousands of messages at once.
        queue_messages: 1 << 20,
        queue_bytes: 1 << 30,
        ..HubConfig::default()
    }
}

/// One node's membership and hub (its relay is started apart, so a test
/// can run it on a runtime of its own).
struct Node {
    hub: Hub,
    membership: Membership,
    /// Never cancelled: these nodes end by being dropped, as if killed.
    stop: CancellationToken,
}

impl Node {
    /// Membership `name` on 127.0.0.1 port 0 joining `join`, and the hub on
    /// `dir` with its origin; tasks go to the current runtime.
    async fn start(name: &str, dir: &Path, join: &str) -> Node {
        let args = ClusterArgs {
            node_name: Some(name.into()),
            cluster_listen: Some("127.0.0.1:0".parse().unwrap()),
            join: Some(join.into()),
            cluster_probe_period: Duration::from_millis(200),
            cluster_probe_rtt: Duration::from_millis(100),
            cluster_suspect_timeout: Duration::from_secs(2),
            cluster_gossip_interval: Duration::from_millis(50),
            cluster_push_pull_interval: Duration::from_secs(2),
            cluster_size: 8,
            ..ClusterArgs::default()
        };
        let bound = cluster::bind(&args).await.unwrap().expect("clustering on");
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let membership =
            cluster::membership::spawn(bound, NodeMeta::default(), stop.clone(), &tracker).unwrap();
        let hub = Hub::open(dir, config()).unwrap().0;
        let origin = Store::open_in(dir).unwrap().origin(name).unwrap();
        assert!(hub.set_origin(origin));
        Node {
            hub,
            membership,
            stop,
        }
    }

    /// The relay task of this node, reading the log in `dir`.
    fn relay(&self, dir: &Path) -> impl Future<Output = ()> + Send + 'static {
        cluster::relay::run(
            self.hub.clone(),
            self.membership.clone(),
            Store::open_in(dir).unwrap(),
            Default::default(),
            self.stop.clone(),
        )
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.membership.local_addr()
    }
}

/// Waits until `m` holds the member at `addr` alive.
async fn sees(m: &Membership, addr: std::net::SocketAddr) {
    let mut watch = m.watch();
    let found = timeout(DEADLINE, async {
        loop {
            if watch
                .borrow_and_update()
                .members
                .iter()
                .any(|x| x.id.addr == addr && x.state == MemberState::Alive)
            {
                return;
            }
            watch.changed().await.unwrap();
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{} never saw {addr} alive", m.local_addr()));
}

/// A client `nick` in #lobby, past its `joined`.
async fn member(hub: &Hub, nick: &str) -> (Session, Inbox) {
    let (s, mut inbox) = hub.connect(Some(nick)).unwrap();
    s.join("lobby", None).await.unwrap();
    loop {
        if let Received::Event(ev) = inbox.recv().await
            && matches!(ev.msg, ServerMsg::Joined { .. })
        {
            return (s, inbox);
        }
    }
}

async fn say(s: &Session, text: &str) {
    s.say("lobby", text.into(), MessageKind::Say).await.unwrap();
}

/// The texts of the room messages `inbox` gets, up to and including `last`.
async fn texts_until(inbox: &mut Inbox, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    let got = timeout(DEADLINE, async {
        loop {
            match inbox.recv().await {
                Received::Event(ev) => {
                    if let ServerMsg::Message(m) = &ev.msg {
                        out.push(m.text.clone());
                        if m.text == last {
                            return;
                        }
                    }
                }
                other => panic!("client dropped: {other:?}"),
            }
        }
    })
    .await;
    let n = out.len();
    got.unwrap_or_else(|_| panic!("no '{last}' within {DEADLINE:?}; got {n} messages"));
    out
}

/// The texts of `room` in the store in `dir`, in id order.
fn stored_texts(dir: &Path) -> Vec<String> {
    let store = Store::open_in(dir).unwrap();
    let msgs = store.earliest("lobby", 0, u64::MAX, usize::MAX).unwrap();
    msgs.into_iter().map(|m| m.text).collect()
}

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// With the old broadcast of stored messages (8,192 deep), a relay this far
/// behind lost what it skipped; reading the log, it sends everything.
#[test]
fn a_relay_more_than_10000_messages_behind_still_delivers_every_one() {
    let main = multi_thread();
    // a's relay runs here, and only while the test drives it.
    let relay_rt = current_thread();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b, (ann, _ann_in), (_bob, mut bob_in)) = main.block_on(async {
        let a = Node::start("a", dir_a.path(), "").await;
        let b = Node::start("b", dir_b.path(), &a.addr().to_string()).await;
        tokio::spawn(b.relay(dir_b.path()));
        sees(&a.membership, b.addr()).await;
        sees(&b.membership, a.addr()).await;
        let bob = member(&b.hub, "bob").await;
        let ann = member(&a.hub, "ann").await;
        (a, b, ann, bob)
    });
    relay_rt.spawn(a.relay(dir_a.path()));
    main.block_on(say(&ann, "first"));
    let first = relay_rt.block_on(texts_until(&mut bob_in, "first"));
    assert_eq!(first, ["first"]);

    // a's relay does not run while 10,001 more are committed.
    let texts: Vec<String> = (0..10_001).map(|i| format!("m{i}")).collect();
    main.block_on(async {
        for t in &texts {
            say(&ann, t).await;
        }
        a.hub.sync_writes().await.unwrap();
    });
    assert_eq!(*a.hub.local_seq().borrow(), 10_002);

    // Running again, it sends them all: bob gets each once, in order.
    let got = relay_rt.block_on(texts_until(&mut bob_in, "m10000"));
    assert_eq!(got.len(), texts.len());
    assert!(
        got == texts,
        "b's client got the messages out of order or twice"
    );
    main.block_on(b.hub.sync_writes()).unwrap();
    let stored = stored_texts(dir_b.path());
    assert_eq!(stored.len(), 10_002);
    assert!(
        stored[1..] == texts[..],
        "b stored them out of order or twice"
    );
}

/// The window the old relay could lose: stored by the hub, not yet sent.
/// Here a is dropped inside it (no shutdown path runs) and restarted on its
/// data dir with a new gossip port, as a restarted process would be.
#[test]
fn a_node_killed_between_commit_and_push_restarts_and_each_message_arrives_once_everywhere() {
    let main = multi_thread();
    let a_rt = current_thread();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (dir_a, dir_b, dir_c) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    let (b, c, (_bob, mut bob_in), (_carol, mut carol_in)) = main.block_on(async {
        let b = Node::start("b", dir_b, "").await;
        let c = Node::start("c", dir_c, &b.addr().to_string()).await;
        tokio::spawn(b.relay(dir_b));
        tokio::spawn(c.relay(dir_c));
        let bob = member(&b.hub, "bob").await;
        let carol = member(&c.hub, "carol").await;
        (b, c, bob, carol)
    });
    let a = a_rt.block_on(Node::start("a", dir_a, &b.addr().to_string()));
    a_rt.spawn(a.relay(dir_a));
    let (ann, ann_in) = main.block_on(member(&a.hub, "ann"));
    let live: Vec<String> = (0..10).map(|i| format!("live-{i}")).collect();
    a_rt.block_on(async {
        for (m, addr) in [
            (&a.membership, b.addr()),
            (&a.membership, c.addr()),
            (&b.membership, a.addr()),
            (&c.membership, a.addr()),
        ] {
            sees(m, addr).await;
        }
        for t in &live {
            say(&ann, t).await;
        }
        assert_eq!(texts_until(&mut bob_in, "live-9").await, live);
        assert_eq!(texts_until(&mut carol_in, "live-9").await, live);
    });

    // Committed on a while its relay cannot run; then a is killed.
    let held: Vec<String> = (0..40).map(|i| format!("held-{i}")).collect();
    main.block_on(async {
        for t in &held {
            say(&ann, t).await;
        }
        a.hub.sync_writes().await.unwrap();
    });
    assert_eq!(*a.hub.local_seq().borrow(), 50);
    drop((ann, ann_in, a));
    drop(a_rt);

    let a = main.block_on(Node::start("a", dir_a, &b.addr().to_string()));
    assert_eq!(*a.hub.local_seq().borrow(), 50);
    main.spawn(a.relay(dir_a));
    main.block_on(async {
        assert_eq!(texts_until(&mut bob_in, "held-39").await, held);
        assert_eq!(texts_until(&mut carol_in, "held-39").await, held);
        // Nothing comes twice after them either.
        let (ann, _ann_in) = member(&a.hub, "ann").await;
        say(&ann, "after-restart").await;
        assert_eq!(
            texts_until(&mut bob_in, "after-restart").await,
            ["after-restart"]
        );
        assert_eq!(
            texts_until(&mut carol_in, "after-restart").await,
            ["after-restart"]
        );
        for hub in [&a.hub, &b.hub, &c.hub] {
            hub.sync_writes().await.unwrap();
        }
    });
    let mut all: Vec<String> = live.iter().chain(&held).cloned().collect();
    all.push("after-restart".into());
    for (name, dir) in [("a", dir_a), ("b", dir_b), ("c", dir_c)] {
        assert_eq!(stored_texts(dir), all, "history of {name}");
    }
    assert_eq!(*a.hub.local_seq().borrow(), 51);
    drop(c);
}

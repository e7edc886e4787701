//! The `Membership` handle a relay builds on, through the real tokio driver
//! and UDP on 127.0.0.1: member events, the view with metadata, payloads to
//! and from a member, and a graceful leave seen as "left".

use std::net::SocketAddr;
use std::time::Duration;

use netkit::cluster::{self, ClusterArgs, MemberState, Membership, NodeMeta};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DEADLINE: Duration = Duration::from_secs(10);

async fn node(
    name: &str,
    join: &str,
    http: u16,
    tracker: &TaskTracker,
) -> (Membership, CancellationToken) {
    let args = ClusterArgs {
        node_name: Some(name.into()),
        cluster_listen: Some("127.0.0.1:0".parse().unwrap()),
        join: Some(join.into()),
        cluster_probe_period: Duration::from_millis(200),
        cluster_probe_rtt: Duration::from_millis(80),
        cluster_suspect_timeout: Duration::from_millis(600),
        cluster_gossip_interval: Duration::from_millis(50),
        cluster_push_pull_interval: Duration::from_secs(2),
        cluster_size: 8,
        ..ClusterArgs::default()
    };
    let bound = cluster::bind(&args).await.unwrap().expect("clustering on");
    let meta = NodeMeta {
        http: Some(SocketAddr::from(([127, 0, 0, 1], http))),
        chat: None,
    };
    let stop = CancellationToken::new();
    let m = cluster::membership::spawn(bound, meta, stop.clone(), tracker).unwrap();
    (m, stop)
}

#[tokio::test]
async fn events_view_payloads_and_leave() {
    let tracker = TaskTracker::new();
    let (a, stop_a) = node("a", "", 8081, &tracker).await;
    let mut a_events = a.events();
    let mut a_payloads = a.payloads();
    let (b, stop_b) = node("b", &a.local_addr().to_string(), 8082, &tracker).await;
    let mut b_payloads = b.payloads();

    // a hears that b joined.
    let joined = timeout(DEADLINE, async {
        loop {
            let e = a_events.recv().await.unwrap();
            if e.id.name == "b" && e.state == MemberState::Alive {
                return e;
            }
        }
    })
    .await
    .expect("a sees b join");
    assert_eq!(joined.previous, None);
    assert_eq!(joined.id.addr, b.local_addr());

    // b's view gets a, with a's metadata.
    let mut watch = b.watch();
    timeout(DEADLINE, async {
        loop {
            {
                let v = watch.borrow_and_update();
                if v.members.iter().any(|m| {
                    m.id.name == "a"
                        && m.state == MemberState::Alive
                        && m.meta.as_ref().and_then(|m| m.http).map(|h| h.port()) == Some(8081)
                }) {
                    assert_eq!(v.counts.members, 2);
                    break;
                }
            }
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("b sees a with its metadata");

    // Payloads both ways.
    b.send(a.local_addr(), b"to a".to_vec()).await.unwrap();
    let p = timeout(DEADLINE, a_payloads.recv()).await.unwrap().unwrap();
    assert_eq!(
        (p.from.name.as_str(), p.data.as_slice()),
        ("b", &b"to a"[..])
    );
    a.send(b.local_addr(), b"to b".to_vec()).await.unwrap();
    let p = timeout(DEADLINE, b_payloads.recv()).await.unwrap().unwrap();
    assert_eq!(
        (p.from.name.as_str(), p.data.as_slice()),
        ("a", &b"to b"[..])
    );
    let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert!(a.send(stranger, b"x".to_vec()).await.is_err());

    // b leaves gracefully: a sees "left".
    stop_b.cancel();
    let left = timeout(DEADLINE, async {
        loop {
            let e = a_events.recv().await.unwrap();
            if e.id.name == "b" && !e.state.is_active() {
                return e;
            }
        }
    })
    .await
    .expect("a sees b leave");
    assert_eq!(left.state, MemberState::Left);
    assert_eq!(a.view().counts.members, 1);

    stop_a.cancel();
    tracker.close();
    timeout(DEADLINE, tracker.wait()).await.expect("tasks stop");
}

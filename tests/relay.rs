//! Chat across nodes with real `netkit serve` processes on 127.0.0.1: three
//! nodes, line-chat users on two of them see each other's messages exactly
//! once and in order, a node killed with `kill -9` restarts and its history
//! converges. Every wait reads a socket or polls HTTP with a deadline.

mod proc_util;

use proc_util::{ClusterNode, LineUser, wait_until};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// A line-chat user `nick` in #lobby.
fn join_lobby(chat: std::net::SocketAddr, nick: &str) -> LineUser {
    let mut u = LineUser::connect(chat, nick);
    u.send("/join lobby");
    u.wait_for("-- joined #lobby");
    u
}

fn history_texts(node: &ClusterNode) -> Vec<String> {
    node.get("/api/rooms/lobby/messages?limit=500")["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn messages_cross_nodes_and_histories_converge_after_kill_9() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = ClusterNode::start("a", dirs[0].path(), "127.0.0.1:0", "", true);
    let seed = a.gossip.to_string();
    let b = ClusterNode::start("b", dirs[1].path(), "127.0.0.1:0", &seed, true);
    let mut c = ClusterNode::start("c", dirs[2].path(), "127.0.0.1:0", &seed, true);
    wait_until("three nodes see each other", DEADLINE, || {
        [&a, &b, &c].iter().all(|n| n.alive_peers() == 2)
    });

    let mut ann = join_lobby(a.chat(), "ann");
    let mut bob = join_lobby(b.chat(), "bob");
    let a_texts: Vec<String> = (0..20).map(|i| format!("from-a-{i}")).collect();
    let b_texts: Vec<String> = (0..5).map(|i| format!("from-b-{i}")).collect();
    for t in &a_texts {
        ann.send(t);
    }
    for t in &b_texts {
        bob.send(t);
    }
    // A message larger than one gossip datagram crosses in pieces.
    let long = format!("long-{}", "L".repeat(5000));
    bob.send(&long);
    bob.wait_for("<ann> from-a-19");
    ann.wait_for("<bob> from-b-4");
    ann.wait_for(&format!("<bob> {long}"));
    // Exactly once, in the sender's order, on the other node.
    assert_eq!(bob.texts_from("ann"), a_texts);
    let mut b_sent = b_texts.clone();
    b_sent.push(long.clone());
    assert_eq!(ann.texts_from("bob"), b_sent);

    // kill -9 of c; a message posted meanwhile still reaches b.
    let c_gossip = c.gossip;
    c.kill9();
    wait_until("a and b count c out", DEADLINE, || {
        a.alive_peers() == 1 && b.alive_peers() == 1
    });
    ann.send("while-c-was-down");
    bob.wait_for("<ann> while-c-was-down");

    // c restarts on its gossip address with its data dir; its history catches up.
    let c = ClusterNode::start("c", dirs[2].path(), &c_gossip.to_string(), &seed, true);
    let mut want: Vec<String> = a_texts.clone();
    want.extend(b_sent.iter().cloned());
    want.push("while-c-was-down".into());
    want.sort();
    for node in [&a, &b, &c] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut got = history_texts(node);
            got.sort();
            if got == want {
                break;
            }
            let last: Vec<String> = history_texts(node)
                .into_iter()
                .map(|t| t.chars().take(16).collect())
                .collect();
            assert!(
                Instant::now() < deadline,
                "history of {} never converged: {last:?}\nlog: {}",
                node.http,
                node.p.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50)); // poll interval
        }
        // Each sender's messages are stored in its order.
        let got = history_texts(node);
        let from_a: Vec<&String> = got.iter().filter(|t| t.starts_with("from-a-")).collect();
        assert_eq!(from_a, a_texts.iter().collect::<Vec<_>>());
    }
    // And a user on the restarted node gets it all from its own history.
    let mut cid = join_lobby(c.chat(), "cid");
    cid.wait_for("while-c-was-down");
}

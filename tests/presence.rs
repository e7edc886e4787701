//! Presence across nodes with real `netkit serve` processes on 127.0.0.1:
//! a line-chat user on one node sees users of another node join, rename and
//! appear in `/who`, can send them a direct message, is refused a nick in use
//! there, and sees them leave ("node down") when that node is killed with
//! `kill -9`. Every wait reads a socket or polls HTTP with a deadline.

mod proc_util;

use proc_util::{ClusterNode, LineUser, wait_until};
use std::net::UdpSocket;
use std::time::Duration;

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// The members of `/api/cluster` other than the node itself.
fn peers(node: &ClusterNode) -> Vec<Value> {
    node.get("/api/cluster")["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["self"] == false)
        .cloned()
        .collect()
}

#[test]
fn presence_spans_nodes_and_a_killed_node_s_users_leave() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, mut b) = ClusterNode::pair(&dirs, true);

    // ann joins on a; once b has heard of her, bob joins on b and sees her.
    let mut ann = LineUser::connect(a.chat(), "ann");
    ann.send("/join lobby");
    ann.wait_for("-- joined #lobby");
    wait_until("b hears of ann in lobby", DEADLINE, || {
        b.get("/api/rooms")["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "lobby" && r["remote"] == 1)
    });
    // /api/cluster lists a's users on b.
    assert!(peers(&b).iter().any(|m| {
        m["users"]
            .as_array()
            .is_some_and(|u| u.contains(&"ann".into()))
    }));
    let mut bob = LineUser::connect(b.chat(), "bob");
    bob.send("/join lobby");
    let joined = bob.wait_for("-- joined #lobby");
    assert!(joined.contains("members: ann@a, bob "), "{joined}");

    // ann sees bob join, as she sees local joins, marked with his node.
    ann.wait_for("-- bob@b joined #lobby");
    ann.send("/who");
    let who = ann.wait_for("-- members of #lobby:");
    assert_eq!(who, "-- members of #lobby: ann, bob@b");
    // The room list counts members on every node.
    let rooms = a.get("/api/rooms");
    let lobby = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "lobby")
        .unwrap()
        .clone();
    assert_eq!(lobby["members"], 2, "{rooms}");
    assert_eq!(lobby["remote"], 1, "{rooms}");

    // A rename on b is seen on a; the nick is then taken cluster-wide.
    bob.send("/nick bobby");
    bob.wait_for("-- bob is now known as bobby");
    ann.wait_for("-- bob@b is now known as bobby@b");
    let mut cat = LineUser::connect(a.chat(), "cat");
    cat.send("/nick bobby");
    cat.wait_for("ERR nick_taken");

    // A direct message crosses nodes.
    ann.send("/msg bobby psst");
    ann.wait_for("*ann -> bobby* psst");
    bob.wait_for("*ann -> bobby* psst");

    // A second user on b joins and parts: ann sees both.
    let mut dan = LineUser::connect(b.chat(), "dan");
    dan.send("/join lobby");
    ann.wait_for("-- dan@b joined #lobby");
    dan.send("/part lobby");
    ann.wait_for("-- dan@b left #lobby");
    dan.send("/join lobby");
    ann.wait_for("-- dan@b joined #lobby");

    // Garbage at a's gossip socket changes nothing.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in [&b"\xC7\x05\xff\xff"[..], &[0u8; 1400][..], b"presence"] {
        junk.send_to(d, a.gossip).unwrap();
    }

    // kill -9 of b: once a declares it down, b's users leave ann's room.
    b.p.child.kill().unwrap();
    b.p.child.wait().unwrap();
    let first = ann.wait_for("(node down)");
    let second = ann.wait_for("(node down)");
    let mut leaves = [first, second];
    leaves.sort();
    assert_eq!(
        leaves,
        [
            "-- bobby@b left #lobby (node down)".to_string(),
            "-- dan@b left #lobby (node down)".to_string(),
        ]
    );
    ann.send("/who");
    assert_eq!(
        ann.wait_for("-- members of #lobby:"),
        "-- members of #lobby: ann"
    );
    // Each event exactly once.
    assert_eq!(ann.count("bob@b joined"), 1);
    assert_eq!(ann.count("bobby@b left"), 1);
    assert_eq!(ann.count("dan@b joined"), 2);
    // The freed nick can be taken on a now.
    cat.send("/nick bobby");
    cat.wait_for("-- cat is now known as bobby");
    // a still serves its history and its users.
    assert!(
        a.get("/api/rooms/lobby/messages")["messages"]
            .as_array()
            .is_some()
    );
}

//! Room topics across a gossip cluster, with real `netkit serve` processes on
//! 127.0.0.1: a topic set on one node is announced to the room's members on
//! the others and becomes the room's topic there; the later of two settings
//! wins everywhere; a node that joins afterwards, or was down when a topic
//! was set, gets the current topic without anyone setting it again. Every
//! wait reads a socket or polls HTTP with a deadline.

mod proc_util;

use std::time::Duration;

use proc_util::{ClusterNode, LineUser, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

/// A user of `node` that has joined `room`.
fn member(node: &ClusterNode, nick: &str, room: &str) -> LineUser {
    let mut u = LineUser::connect(node.chat(), nick);
    u.send(&format!("/join {room}"));
    u.wait_for(&format!("-- joined #{room}"));
    u
}

/// `room`'s topic as `node` serves it in `/api/rooms` (None: no such room there).
fn topic_of(node: &ClusterNode, room: &str) -> Option<String> {
    node.get("/api/rooms")["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == room)
        .map(|r| r["topic"].as_str().unwrap_or_default().to_string())
}

/// Node `name` on `dir`, joining the cluster through `via`.
fn joining(name: &str, dir: &tempfile::TempDir, via: &ClusterNode) -> ClusterNode {
    ClusterNode::start(
        name,
        dir.path(),
        "127.0.0.1:0",
        &via.gossip.to_string(),
        true,
    )
}

fn has_topic(node: &ClusterNode, room: &str, topic: &str) -> bool {
    topic_of(node, room).as_deref() == Some(topic)
}

#[test]
fn a_topic_set_on_one_node_is_the_topic_on_every_node() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, mut b) = ClusterNode::pair(&dirs, true);
    let mut ann = member(&a, "ann", "dev");
    let mut bob = member(&b, "bob", "dev");

    // Set on a: announced to bob on b, and b's topic.
    ann.send("/topic Release on Friday");
    bob.wait_for("-- ann set the topic of #dev: Release on Friday");
    wait_until("b has a's topic", DEADLINE, || {
        has_topic(&b, "dev", "Release on Friday")
    });

    // Set on b afterwards: the later one, on both.
    bob.send("/topic Moved to Monday");
    ann.wait_for("-- bob set the topic of #dev: Moved to Monday");
    wait_until("a has b's topic", DEADLINE, || {
        has_topic(&a, "dev", "Moved to Monday")
    });
    assert!(has_topic(&b, "dev", "Moved to Monday"));

    // A node that joins afterwards gets it when it comes up, with nobody
    // setting it again; its first member sees it on joining.
    let c = joining("c", &dirs[2], &a);
    wait_until("c has the topic", DEADLINE, || {
        has_topic(&c, "dev", "Moved to Monday")
    });
    let mut cy = LineUser::connect(c.chat(), "cy");
    cy.send("/join dev");
    cy.wait_for("-- joined #dev — topic: Moved to Monday");

    // b goes down; a topic set meanwhile reaches it when it comes back.
    drop(bob);
    b.kill9();
    ann.send("/topic Shipped");
    wait_until("c has the topic set while b was down", DEADLINE, || {
        has_topic(&c, "dev", "Shipped")
    });
    let b = joining("b", &dirs[1], &a);
    wait_until("b catches up with the topic", DEADLINE, || {
        has_topic(&b, "dev", "Shipped")
    });
}

//! Moderation across a gossip cluster, with real `netkit serve` processes on
//! 127.0.0.1: an operator on node a bans, mutes, kicks and makes operators
//! of users of node b, and b enforces it; a mode set on b holds on a; a node
//! that was down during a ban learns it when it comes back. Every wait reads
//! a socket or polls HTTP with a deadline.

mod proc_util;

use std::time::Duration;

use proc_util::{ClusterNode, LineUser, Netkit, cluster_node_command, wait_until};

const SECRET: &str = "a deployment secret of 32 bytes or more";
const DEADLINE: Duration = Duration::from_secs(30);

/// A node with accounts and application tokens (the same secret on both).
fn node(name: &str, data: &std::path::Path, join: &str) -> ClusterNode {
    let mut cmd = cluster_node_command(name, data, "127.0.0.1:0", join, true);
    cmd.args(["--chat-rate", "0", "--chat-auth", "accounts"])
        .args(["--chat-token-secret", SECRET]);
    let p = Netkit::start(cmd);
    ClusterNode {
        http: p.ready.http.expect("http is on"),
        chat: p.ready.chat,
        gossip: p.ready.cluster.expect("clustering is on"),
        p,
    }
}

fn token(sub: &str) -> String {
    proc_util::hs256_token(SECRET.as_bytes(), sub)
}

/// A user of `node` that has joined `room`.
fn member(node: &ClusterNode, nick: &str, room: &str) -> LineUser {
    let mut u = LineUser::connect(node.chat(), nick);
    u.send(&format!("/join {room}"));
    u.wait_for(&format!("-- joined #{room}"));
    u
}

/// True once `node` has stored a message of `room` containing `text`.
fn has_message(node: &ClusterNode, room: &str, text: &str) -> bool {
    node.get(&format!("/api/rooms/{room}/messages"))["messages"]
        .as_array()
        .is_some_and(|ms| {
            ms.iter()
                .any(|m| m["text"].as_str().is_some_and(|t| t.contains(text)))
        })
}

/// True once `node` counts `n` members of `room` on other nodes.
fn sees_remote(node: &ClusterNode, room: &str, n: u64) -> bool {
    node.get("/api/rooms")["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == room && r["remote"] == n)
}

#[test]
fn moderation_on_one_node_holds_on_the_other() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node("a", dirs[0].path(), "");
    let mut b = node("b", dirs[1].path(), &a.gossip.to_string());
    wait_until("a and b see each other", DEADLINE, || {
        a.alive_peers() == 1 && b.alive_peers() == 1
    });

    // ann makes #dev on a (its operator there); eve makes it on b (its
    // operator there, a guest: b's own choice, not a's).
    let mut ann = member(&a, "ann", "dev");
    let mut hal = member(&a, "hal", "dev");
    let mut eve = member(&b, "eve", "dev");
    let mut dave = LineUser::connect(b.chat(), "dtmp");
    dave.send(&format!("/token {}", token("dave")));
    dave.wait_for("-- logged in as dave (by token)");
    dave.send("/join dev");
    dave.wait_for("-- joined #dev");
    // Without the operator status from a, dave may not moderate on b.
    dave.send("/mode +m");
    dave.wait_for("ERR not_operator");
    wait_until("a knows of eve and dave", DEADLINE, || {
        sees_remote(&a, "dev", 2)
    });

    // An operator made on a (dave's account, a user of b) moderates on b,
    // and the mode holds on a too.
    ann.send("/op dave");
    ann.wait_for("-- ann made dave an operator");
    dave.wait_for("-- ann made dave an operator");
    dave.send("/mode +m");
    eve.wait_for("-- dave set mode +m");
    hal.wait_for("-- dave set mode +m");
    hal.send("may I?");
    hal.wait_for("ERR moderated");
    dave.send("/mode -m");
    hal.wait_for("-- dave set mode -m");

    // A ban on a puts eve out of #dev on b and keeps her out.
    ann.send("/ban eve spam");
    ann.wait_for("-- ann banned eve from #dev (spam)");
    eve.wait_for("ERR kicked");
    eve.send("/join dev");
    eve.wait_for("ERR banned");

    // A mute on a silences dave's account on b.
    ann.send("/mute dave 10m");
    dave.wait_for("-- ann muted dave for 10m");
    dave.send("still talking");
    dave.wait_for("ERR muted");
    ann.send("/unmute dave");
    dave.wait_for("-- ann unmuted dave");
    dave.send("talking again");
    hal.wait_for("<dave> talking again");

    // A kick on a of a member of b.
    let mut gus = member(&b, "gus", "dev");
    ann.wait_for("-- gus@b joined #dev");
    ann.send("/kick gus go away");
    gus.wait_for("ERR kicked");
    dave.wait_for("-- ann kicked gus from #dev (go away)");

    // b is down while ann bans frank; back, it learns the ban.
    drop((eve, dave, gus));
    b.p.terminate();
    ann.send("/ban frank");
    ann.wait_for("-- ann banned frank from #dev");
    let b = node("b", dirs[1].path(), &a.gossip.to_string());
    wait_until("b catches up on the ban", DEADLINE, || {
        has_message(&b, "dev", "ann banned frank")
    });
    let mut frank = LineUser::connect(b.chat(), "frank");
    frank.send("/join dev");
    frank.wait_for("ERR banned");
    // The ban of eve, learnt before the restart, is stored on b.
    let mut eve = LineUser::connect(b.chat(), "eve");
    eve.send("/join dev");
    eve.wait_for("ERR banned");
}

/// A user of `node` (connected as `tmp`) logged in to account `nick` by
/// token, in `room`.
fn account_member(node: &ClusterNode, tmp: &str, nick: &str, room: &str) -> LineUser {
    let mut u = LineUser::connect(node.chat(), tmp);
    u.send(&format!("/token {}", token(nick)));
    u.wait_for(&format!("-- logged in as {nick} (by token)"));
    u.send(&format!("/join {room}"));
    u.wait_for(&format!("-- joined #{room}"));
    u
}

#[test]
fn an_operator_the_hub_chose_holds_on_every_node() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node("a", dirs[0].path(), "");
    let b = node("b", dirs[1].path(), &a.gossip.to_string());
    wait_until("a and b see each other", DEADLINE, || {
        a.alive_peers() == 1 && b.alive_peers() == 1
    });

    // ann (an account) makes #fresh on a: the hub makes her its operator,
    // and the notice saying so carries it to b.
    let mut ann = account_member(&a, "t1", "ann", "fresh");
    ann.wait_for("-- ann is now the operator of #fresh (the first to join)");
    wait_until("b learns that ann is the operator", DEADLINE, || {
        has_message(&b, "fresh", "ann is now the operator")
    });

    // bob is the first on b to join, but the room has an operator: not him.
    let mut bob = account_member(&b, "t2", "bob", "fresh");
    bob.send("/mode +m");
    bob.wait_for("ERR not_operator");

    // ann, on b, is the operator there too: her mode holds on both nodes.
    let mut ann_b = account_member(&b, "t3", "ann", "fresh");
    ann_b.send("/mode +m");
    bob.wait_for("-- ann set mode +m");
    ann.wait_for("-- ann set mode +m");
    bob.send("may I?");
    bob.wait_for("ERR moderated");
}

//! Abuse of the gossip port of a keyed cluster, against the real binary with
//! raw UDP datagrams: truncated, oversized, replayed and wrongly keyed
//! packets, and a flood of join requests under forged names. Each kind is
//! refused with a logged reason, the two real nodes stay members of each
//! other, and chat still flows between them.

mod abuse_util;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use abuse_util::{LineUser, Netkit, T, cluster_node_command, http_get_json, wait_until};
use netkit::cluster::NodeId;
use netkit::cluster::wire::{self, AppFrame, AppMsg, Sealer};

/// The key both real nodes share.
const KEY: &str = "abuse-suite-key";

/// A keyed cluster node with line chat, joining through `join`.
fn node(name: &str, dir: &std::path::Path, join: &str) -> Netkit {
    let mut cmd = cluster_node_command(name, dir, "127.0.0.1:0", join, true);
    cmd.args(["--cluster-key", KEY, "--chat-rate", "0"]);
    Netkit::start(cmd)
}

/// Members as `/api/cluster` lists them (self included).
fn members(p: &Netkit) -> Vec<serde_json::Value> {
    http_get_json(p.ready.http.unwrap(), "/api/cluster")["members"]
        .as_array()
        .unwrap()
        .clone()
}

/// How many other members `p` sees alive.
fn alive_peers(p: &Netkit) -> usize {
    members(p)
        .iter()
        .filter(|m| m["self"] == false && m["state"] == "alive")
        .count()
}

/// Passes what `b` sends it on to `a` and keeps each datagram, sealed as it
/// was: real packets to replay later. (b joins through it and through a
/// itself: a seed must answer from the address it was asked at.)
fn recording_proxy(a: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            keep.lock().unwrap().push(buf[..n].to_vec());
            let _ = sock.send_to(&buf[..n], a);
        }
    });
    (addr, seen)
}

/// Sends each datagram from a fresh socket (so each gets its own warning)
/// and waits for the node's log to give `reason` for it.
fn refused(p: &mut Netkit, datagrams: &[Vec<u8>], reason: &str) {
    let to = p.ready.cluster.unwrap();
    for d in datagrams {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(d, to).unwrap();
        let from = s.local_addr().unwrap().to_string();
        p.wait_log(&["ignoring gossip packet", &from, reason], T);
    }
}

/// A plain netkit frame from a forged identity `name`.
fn forged_frame(name: &str) -> Vec<u8> {
    let frame = AppFrame {
        from: NodeId::new(name, "127.0.0.1:9".parse().unwrap()),
        msg: AppMsg::Meta {
            meta: Default::default(),
            want_reply: true,
        },
    };
    let mut out = Vec::new();
    wire::frame_app(&frame, &mut out);
    out
}

#[test]
fn bad_gossip_packets_are_refused_and_the_cluster_carries_on() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut a = node("a", dirs[0].path(), "");
    let a_gossip = a.ready.cluster.unwrap();
    let (proxy, recorded) = recording_proxy(a_gossip);
    let b = node("b", dirs[1].path(), &format!("{proxy},{a_gossip}"));
    wait_until("a and b see each other", T, || {
        alive_peers(&a) == 1 && alive_peers(&b) == 1
    });
    let real: Vec<Vec<u8>> = recorded.lock().unwrap().clone();
    assert!(!real.is_empty(), "b's join went through the proxy");

    // Truncated.
    let mut cut = real[0].clone();
    cut.pop();
    let no_auth = "does not authenticate";
    refused(&mut a, &[Vec::new()], "empty packet");
    refused(
        &mut a,
        &[vec![0xA5; 10], cut, real[0][..1].to_vec()],
        no_auth,
    );
    // Oversized for the gossip packet limit.
    let mut big = real[0].clone();
    big.resize(1_500, 0);
    refused(&mut a, &[big], "exceeds the packet limit");
    // Flipped bits and the wrong key.
    let mut flipped = real[0].clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut wrong = Vec::new();
    Sealer::from_passphrase("not the key").seal(&forged_frame("mallory"), [1; 24], &mut wrong);
    refused(&mut a, &[flipped, wrong], no_auth);
    // Unsealed, to a node that requires a key.
    refused(
        &mut a,
        &[forged_frame("mallory"), vec![0x00, 1, 2, 3]],
        "unencrypted packet",
    );

    // A datagram far over any limit: dropped without harm.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&vec![0xA5; 60_000], a_gossip).unwrap();

    // Replays of b's real (sealed, authentic) packets, many times over.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        for d in &real {
            s.send_to(d, a_gossip).unwrap();
        }
    }

    // A flood of join requests under forged names, with and without a key.
    let wrong = Sealer::from_passphrase("guess");
    for i in 0..2_000 {
        let plain = forged_frame(&format!("forged-{i}"));
        let mut sealed = Vec::new();
        wrong.seal(&plain, [(i % 251) as u8; 24], &mut sealed);
        s.send_to(&plain, a_gossip).unwrap();
        s.send_to(&sealed, a_gossip).unwrap();
    }

    // The cluster is as it was: a and b, alive, and nobody else.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = probe.local_addr().unwrap().to_string();
    // The flood above can fill a's socket buffer, and UDP drops what does not
    // fit: the probe is sent again until a has logged it.
    wait_until("a answers the probe after the flood", T, || {
        probe.send_to(&[], a_gossip).unwrap();
        a.drain_log().iter().any(|l| {
            l.contains("ignoring gossip packet") && l.contains(&from) && l.contains("empty packet")
        })
    });
    for p in [&a, &b] {
        let list = members(p);
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(alive_peers(p), 1, "{list:?}");
        let text = serde_json::to_string(&list).unwrap();
        assert!(
            !text.contains("forged") && !text.contains("mallory"),
            "{text}"
        );
    }
    // And chat still crosses from a to b.
    let mut ann = LineUser::connect(a.ready.chat.unwrap(), "ann");
    let mut bob = LineUser::connect(b.ready.chat.unwrap(), "bob");
    bob.send("/join lobby");
    bob.wait_for("joined #lobby");
    ann.send("/join lobby");
    ann.wait_for("joined #lobby");
    ann.send("through the noise");
    bob.wait_for("<ann> through the noise");
}

//! The relay core in simulated networks (loss, partitions, restarts) and
//! its handling of duplicates, gaps and garbage, with no sockets or clocks.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::chat::protocol::MessageKind;

/// The actions for packet `packet` from peer `from` (generation 0).
fn receive<P: Clone + Ord + std::hash::Hash>(
    relay: &mut Relay<P>,
    from: P,
    packet: RelayPacket,
    now: Duration,
) -> Vec<RelayAction<P>> {
    let event = RelayEvent::Packet {
        from,
        generation: 0,
        packet,
    };
    relay.handle(event, now)
}
/// One simulated node: its relay, its "storage" (the hub's store, the one
/// log: every message it holds, by origin and sequence, its own numbered
/// there) and the order it applied remote messages in.
struct SimNode {
    relay: Relay<usize>,
    store: BTreeMap<(String, u64), RelayedMessage>,
    applied: Vec<(String, u64)>,
    up: bool,
}

struct Sim {
    nodes: Vec<SimNode>,
    rng: StdRng,
    loss: f64,
    /// `cut[a][b]`: packets from a to b are lost.
    cut: Vec<Vec<bool>>,
    queue: Vec<(usize, usize, RelayPacket)>,
    now: Duration,
}

impl Sim {
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        Sim {
            nodes: (0..n)
                .map(|i| SimNode {
                    relay: Relay::new(format!("n{i}"), BTreeMap::new()),
                    store: BTreeMap::new(),
                    applied: Vec::new(),
                    up: true,
                })
                .collect(),
            rng: StdRng::seed_from_u64(seed),
            loss,
            cut: vec![vec![false; n]; n],
            queue: Vec::new(),
            now: Duration::ZERO,
        }
    }

    fn send(&mut self, from: usize, to: usize, p: RelayPacket) {
        // Every packet goes through the wire format.
        let p = RelayPacket::decode(&p.encode()).unwrap();
        self.queue.push((from, to, p));
    }

    /// A message posted on `node`, numbered as its hub numbers it: the
    /// next sequence of its origin in its store.
    fn local_message(&self, node: usize, text: &str) -> RelayedMessage {
        let me = format!("n{node}");
        let last = self.nodes[node]
            .store
            .range((me.clone(), 0)..=(me.clone(), u64::MAX))
            .next_back()
            .map_or(0, |((_, seq), _)| *seq);
        RelayedMessage {
            origin: me,
            seq: last + 1,
            room: "lobby".into(),
            from: format!("u{node}"),
            text: text.into(),
            kind: MessageKind::Say,
            ts: 0,
            origin_id: 1,
            moderation: None,
            file: None,
        }
    }

    /// Stores a message posted on `node` and hands it to its relay.
    fn post(&mut self, node: usize, text: &str) {
        let m = self.local_message(node, text);
        self.nodes[node]
            .store
            .insert((m.origin.clone(), m.seq), m.clone());
        let actions = self.nodes[node]
            .relay
            .handle(RelayEvent::Local(m), self.now);
        self.act(node, actions);
    }

    fn act(&mut self, node: usize, actions: Vec<RelayAction<usize>>) {
        for a in actions {
            match a {
                RelayAction::Apply(m) => {
                    let n = &mut self.nodes[node];
                    n.applied.push((m.origin.clone(), m.seq));
                    n.store.insert((m.origin.clone(), m.seq), m);
                }
                RelayAction::Send(to, p) => self.send(node, to, p),
                RelayAction::Broadcast(p) => {
                    for to in (0..self.nodes.len()).filter(|&to| to != node) {
                        self.send(node, to, p.clone());
                    }
                }
                RelayAction::Serve { to, origin, after } => {
                    let msgs: Vec<RelayedMessage> = self.nodes[node]
                        .store
                        .range((origin.clone(), after + 1)..=(origin.clone(), u64::MAX))
                        .take(SERVE_BATCH)
                        .map(|(_, m)| m.clone())
                        .collect();
                    for m in msgs {
                        self.send(node, to, RelayPacket::Msg(m));
                    }
                }
                // Only messages, summaries and pulls travel in the simulation.
                other => panic!("unexpected action {other:?}"),
            }
        }
    }

    /// Delivers queued packets in a random order, with loss and cuts.
    fn deliver(&mut self) {
        while !self.queue.is_empty() {
            let i = self.rng.random_range(0..self.queue.len());
            let (from, to, p) = self.queue.swap_remove(i);
            if self.cut[from][to] || !self.nodes[to].up || self.rng.random_bool(self.loss) {
                continue;
            }
            self.now += Duration::from_micros(100);
            let actions = receive(&mut self.nodes[to].relay, from, p, self.now);
            self.act(to, actions);
        }
    }

    /// One anti-entropy round: each live node sends its summary to a random peer.
    fn round(&mut self) {
        self.now += Duration::from_secs(1);
        let n = self.nodes.len();
        for i in 0..n {
            if !self.nodes[i].up {
                continue;
            }
            let mut to = self.rng.random_range(0..n - 1);
            if to >= i {
                to += 1;
            }
            let s = self.nodes[i].relay.summary();
            self.send(i, to, s);
        }
        self.deliver();
    }

    /// Summary rounds until every node has every message; panics after `max`.
    fn round_until_converged(&mut self, max: usize) {
        let mut rounds = 0;
        while !self.converged() {
            self.round();
            rounds += 1;
            assert!(rounds < max, "no convergence after {max} rounds");
        }
    }

    fn converged(&self) -> bool {
        let first = &self.nodes[0].store;
        self.nodes.iter().all(|n| n.store.len() == first.len())
    }

    /// Each node applied every other origin's messages exactly once, in order.
    fn check_exactly_once_in_order(&self, per_origin: &BTreeMap<String, u64>) {
        for n in &self.nodes {
            for (origin, &count) in per_origin {
                if *origin == n.relay.me {
                    continue;
                }
                let seqs: Vec<u64> = n
                    .applied
                    .iter()
                    .filter(|(o, _)| o == origin)
                    .map(|(_, s)| *s)
                    .collect();
                assert_eq!(
                    seqs,
                    (1..=count).collect::<Vec<_>>(),
                    "{} applied {origin}'s messages",
                    n.relay.me
                );
            }
        }
    }
}

fn seed() -> u64 {
    std::env::var("NETKIT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

#[test]
fn lossy_network_delivers_exactly_once_in_order() {
    let mut sim = Sim::new(3, seed(), 0.3);
    let mut counts = BTreeMap::new();
    for i in 0..300 {
        let node = i % 3;
        sim.post(node, &format!("m{i}"));
        *counts.entry(format!("n{node}")).or_insert(0u64) += 1;
        if i % 7 == 0 {
            sim.deliver();
        }
    }
    sim.deliver();
    sim.round_until_converged(200);
    assert_eq!(sim.nodes[0].store.len(), 300);
    sim.check_exactly_once_in_order(&counts);
}

#[test]
fn partition_and_restart_converge() {
    let mut sim = Sim::new(3, seed(), 0.05);
    let mut counts = BTreeMap::new();
    let mut post = |sim: &mut Sim, node: usize, i: usize| {
        sim.post(node, &format!("m{i}"));
        *counts.entry(format!("n{node}")).or_insert(0u64) += 1;
    };
    for i in 0..30 {
        post(&mut sim, i % 3, i);
    }
    sim.deliver();
    // Partition {n0} | {n1, n2}; both sides keep talking.
    for (a, b) in [(0, 1), (0, 2)] {
        sim.cut[a][b] = true;
        sim.cut[b][a] = true;
    }
    for i in 30..90 {
        post(&mut sim, i % 3, i);
        sim.deliver();
    }
    for _ in 0..5 {
        sim.round();
    }
    assert!(!sim.converged());
    // n2 crashes (kill -9) and restarts from what it had persisted: its
    // store and its have map. Messages posted meanwhile are missed.
    sim.nodes[2].up = false;
    for i in 90..120 {
        post(&mut sim, i % 2, i);
        sim.deliver();
    }
    let persisted = sim.nodes[2].relay.have().clone();
    sim.nodes[2].relay = Relay::new("n2", persisted);
    sim.nodes[2].up = true;
    // Heal.
    sim.cut = vec![vec![false; 3]; 3];
    sim.round_until_converged(200);
    assert_eq!(sim.nodes[1].store.len(), 120);
    sim.check_exactly_once_in_order(&counts);
    // Restarted n2 keeps numbering after what it had assigned (its store
    // numbers it), and its relay sends it on.
    let m = sim.local_message(2, "after");
    assert_eq!(m.seq, counts["n2"] + 1);
    sim.post(2, "after");
    assert_eq!(sim.nodes[2].relay.have()["n2"], counts["n2"] + 1);
}

#[test]
fn duplicates_own_messages_and_garbage_are_ignored() {
    let mut r = Relay::<u8>::new("a", BTreeMap::new());
    let m = |origin: &str, seq| RelayedMessage {
        origin: origin.into(),
        seq,
        room: "r".into(),
        from: "x".into(),
        text: "t".into(),
        kind: MessageKind::Say,
        ts: 0,
        origin_id: seq,
        moderation: None,
        file: None,
    };
    let now = Duration::ZERO;
    assert_eq!(
        receive(&mut r, 1, RelayPacket::Msg(m("b", 1)), now).len(),
        1
    );
    assert!(receive(&mut r, 1, RelayPacket::Msg(m("b", 1)), now).is_empty());
    assert!(receive(&mut r, 1, RelayPacket::Msg(m("a", 5)), now).is_empty());
    assert!(receive(&mut r, 1, RelayPacket::Msg(m("b", 0)), now).is_empty());
    // A gap: held, and pulled once per PULL_RETRY.
    let got = receive(&mut r, 1, RelayPacket::Msg(m("b", 3)), now);
    assert_eq!(
        got,
        vec![RelayAction::Send(
            1,
            RelayPacket::Pull {
                origin: "b".into(),
                after: 1
            }
        )]
    );
    assert!(receive(&mut r, 1, RelayPacket::Msg(m("b", 4)), now).is_empty());
    let got = receive(&mut r, 1, RelayPacket::Msg(m("b", 2)), now);
    let seqs: Vec<u64> = got
        .iter()
        .map(|a| match a {
            RelayAction::Apply(m) => m.seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(r.have()["b"], 4);
    assert_eq!(RelayPacket::decode(b"\x00garbage"), None);
    assert_eq!(RelayPacket::decode(&[MAGIC, 0xff, 0xff]), None);
    assert_eq!(RelayPacket::decode(&[]), None);
}

#[test]
fn a_member_up_gets_a_summary_and_a_quiet_relay_sends_one_datagram_per_interval() {
    let have = BTreeMap::from([("a".to_string(), 7), ("b".to_string(), 2)]);
    let mut r = Relay::<u8>::new("a", have);
    let summary = RelayPacket::Summary(vec![("a".into(), 7), ("b".into(), 2)]);
    // A member that comes up is sent the summary at once, to it alone.
    let got = r.handle(RelayEvent::MemberUp { peer: 3 }, Duration::from_millis(10));
    assert_eq!(got, vec![RelayAction::Send(3, summary.clone())]);
    // With no messages, ticks send nothing until the quiet interval is up:
    // a quiet cluster does not pay a summary per node per second.
    for s in 1..QUIET_SUMMARY_INTERVAL.as_secs() {
        let t = r.handle(RelayEvent::Tick { peer: Some(4) }, Duration::from_secs(s));
        assert!(t.is_empty(), "tick at {s} s sent {t:?}");
    }
    // Then one datagram per quiet interval: the presence snapshot and the
    // summary in turn.
    let q = QUIET_SUMMARY_INTERVAL;
    let t = r.handle(RelayEvent::Tick { peer: Some(4) }, q);
    assert_eq!(t, vec![RelayAction::SendPresence(4)]);
    let t = r.handle(RelayEvent::Tick { peer: Some(4) }, q + q / 2);
    assert!(t.is_empty(), "{t:?}");
    let t = r.handle(RelayEvent::Tick { peer: Some(4) }, q * 2);
    assert_eq!(t, vec![RelayAction::Send(4, summary)]);
    // A member gone: summaries every tick for a while (catching up).
    r.handle(RelayEvent::MembersChanged, q * 2);
    let t = r.handle(
        RelayEvent::Tick { peer: Some(5) },
        q * 2 + Duration::from_secs(1),
    );
    assert_eq!(t.len(), 1, "{t:?}");
}

#[test]
fn topics_are_handed_to_the_hub_an_oversized_list_is_dropped_and_asking_gets_them() {
    let topic = |i: usize| crate::chat::hub::TopicChange {
        room: format!("r{i}"),
        topic: "t".into(),
        by: "ann".into(),
        ms: 1,
        origin: "a/1".into(),
    };
    let mut r: Relay<usize> = Relay::new("me", BTreeMap::new());
    let full: Vec<_> = (0..TOPICS_PER_PACKET).map(topic).collect();
    let packet = RelayPacket::Topics(full.clone());
    assert_eq!(RelayPacket::decode(&packet.encode()), Some(packet.clone()));
    assert_eq!(
        receive(&mut r, 1, packet, Duration::ZERO),
        vec![RelayAction::ApplyTopics(1, full)]
    );
    let too_many = (0..=TOPICS_PER_PACKET).map(topic).collect();
    assert!(receive(&mut r, 1, RelayPacket::Topics(too_many), Duration::ZERO).is_empty());
    let please = RelayPacket::TopicsPlease;
    assert_eq!(RelayPacket::decode(&please.encode()), Some(please.clone()));
    assert_eq!(
        receive(&mut r, 2, please, Duration::ZERO),
        vec![RelayAction::SendTopics(2)]
    );
}

//! The sans-IO core of the chat relay between nodes: which room messages a
//! node must apply, forward, ask for or serve, so that every node ends up with
//! every message exactly once and in each origin's order. No sockets, clocks
//! or storage here; a driver feeds packets in and carries the actions out.
//!
//! NOT WIRED YET: `netkit serve` does not run a relay; see docs/cluster.md
//! ("Chat across nodes: status") for what the driver and the hub still need.
//!
//! # Protocol
//!
//! Every message is identified by its origin node's name and the origin's
//! sequence number (1, 2, 3, … per origin, never reused). Each node keeps,
//! per origin, the highest sequence it has applied *without a gap* (`have`).
//!
//! - [`RelayPacket::Msg`]: a message, pushed by its origin to every live
//!   member, or served to a member that asked. Applied if it is the next one
//!   of its origin; a duplicate is dropped; one that arrives early is held
//!   (bounded) and the gap is asked for with a `Pull` to the sender.
//! - [`RelayPacket::Summary`]: every node's `have` map, sent periodically to
//!   a random live member (anti-entropy). The receiver pulls what the sender
//!   has more of and serves what the sender lacks, so a lost datagram, a
//!   restart or a healed partition converges within a few rounds.
//! - [`RelayPacket::Pull`]: "send me `origin`'s messages after `after`". The
//!   answer is a [`RelayAction::Serve`]: the driver reads them from storage
//!   (any node may serve any origin's messages) and sends them as `Msg`s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::protocol::MessageKind;

/// First byte of every relay datagram, so the gossip payload channel can be shared.
pub const MAGIC: u8 = 0xC7;
/// Most messages held per origin while waiting for a gap to be filled.
pub const MAX_EARLY: usize = 512;
/// Most messages served for one `Pull` or summary difference; the rest follow
/// on the next summary round.
pub const SERVE_BATCH: usize = 64;
/// Least time between two pulls for the same origin.
pub const PULL_RETRY: Duration = Duration::from_millis(500);

/// A room message as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedMessage {
    /// Name of the node where it was posted.
    pub origin: String,
    /// Its sequence number at the origin, from 1.
    pub seq: u64,
    /// Room name.
    pub room: String,
    /// Author nick.
    pub from: String,
    /// The text.
    pub text: String,
    /// Plain message or `/me` action.
    pub kind: MessageKind,
    /// Milliseconds since the Unix epoch, at the origin.
    pub ts: i64,
}

/// One relay datagram between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayPacket {
    /// A message, new or served on request.
    Msg(RelayedMessage),
    /// The sender's highest gap-free sequence per origin.
    Summary(Vec<(String, u64)>),
    /// Asks for `origin`'s messages with a sequence above `after`.
    Pull {
        /// Whose messages.
        origin: String,
        /// The highest one the asker has without a gap.
        after: u64,
    },
}

impl RelayPacket {
    /// The datagram: [`MAGIC`] then the packet in postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC];
        out.extend(postcard::to_allocvec(self).expect("relay packets always serialize"));
        out
    }

    /// Parses a datagram; `None` if it is not a relay packet or is malformed.
    pub fn decode(data: &[u8]) -> Option<RelayPacket> {
        match data.split_first() {
            Some((&MAGIC, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// What the driver must do after a call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAction<P> {
    /// Store this message and deliver it to the room's local members, then
    /// record `(origin, seq)` as applied in the same transaction.
    Apply(RelayedMessage),
    /// Send a packet to a peer.
    Send(P, RelayPacket),
    /// Read `origin`'s stored messages with a sequence above `after` (at most
    /// [`SERVE_BATCH`]) and send each to the peer as a [`RelayPacket::Msg`].
    Serve {
        /// Who asked.
        to: P,
        /// Whose messages.
        origin: String,
        /// Send those above this.
        after: u64,
    },
}

/// One node's relay state.
#[derive(Debug, Clone)]
pub struct Relay {
    me: String,
    have: BTreeMap<String, u64>,
    early: BTreeMap<String, BTreeMap<u64, RelayedMessage>>,
    last_pull: BTreeMap<String, Duration>,
}

impl Relay {
    /// A relay for node `me`, resuming from the persisted `have` map (its own
    /// entry is the last sequence it assigned).
    pub fn new(me: impl Into<String>, have: BTreeMap<String, u64>) -> Self {
        Relay {
            me: me.into(),
            have,
            early: BTreeMap::new(),
            last_pull: BTreeMap::new(),
        }
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The highest gap-free sequence applied per origin (persist it with the messages).
    pub fn have(&self) -> &BTreeMap<String, u64> {
        &self.have
    }

    /// Gives a message posted on this node its `(origin, seq)`; the driver
    /// stores it, then sends `RelayPacket::Msg` of it to every live member.
    pub fn local(
        &mut self,
        room: String,
        from: String,
        text: String,
        kind: MessageKind,
        ts: i64,
    ) -> RelayedMessage {
        let seq = self.have.entry(self.me.clone()).or_insert(0);
        *seq += 1;
        RelayedMessage {
            origin: self.me.clone(),
            seq: *seq,
            room,
            from,
            text,
            kind,
            ts,
        }
    }

    /// The anti-entropy summary to send to a random live member.
    pub fn summary(&self) -> RelayPacket {
        RelayPacket::Summary(self.have.iter().map(|(o, s)| (o.clone(), *s)).collect())
    }

    /// Handles one packet from peer `from` at time `now` (any monotonic origin).
    pub fn receive<P: Clone>(
        &mut self,
        from: P,
        packet: RelayPacket,
        now: Duration,
    ) -> Vec<RelayAction<P>> {
        let mut out = Vec::new();
        match packet {
            RelayPacket::Msg(m) => self.on_msg(from, m, now, &mut out),
            RelayPacket::Summary(theirs) => {
                let theirs: BTreeMap<String, u64> = theirs.into_iter().collect();
                for (origin, &their) in &theirs {
                    let mine = self.have_of(origin);
                    if their > mine {
                        self.pull(from.clone(), origin, now, &mut out);
                    }
                }
                for (origin, &mine) in &self.have {
                    let their = theirs.get(origin).copied().unwrap_or(0);
                    if mine > their {
                        out.push(RelayAction::Serve {
                            to: from.clone(),
                            origin: origin.clone(),
                            after: their,
                        });
                    }
                }
            }
            RelayPacket::Pull { origin, after } => {
                if self.have_of(&origin) > after {
                    out.push(RelayAction::Serve {
                        to: from,
                        origin,
                        after,
                    });
                }
            }
        }
        out
    }

    fn have_of(&self, origin: &str) -> u64 {
        self.have.get(origin).copied().unwrap_or(0)
    }

    fn on_msg<P: Clone>(
        &mut self,
        from: P,
        m: RelayedMessage,
        now: Duration,
        out: &mut Vec<RelayAction<P>>,
    ) {
        if m.origin == self.me || m.seq == 0 {
            return;
        }
        let have = self.have_of(&m.origin);
        if m.seq <= have {
            return; // a duplicate
        }
        if m.seq > have + 1 {
            let origin = m.origin.clone();
            let early = self.early.entry(origin.clone()).or_default();
            if early.len() < MAX_EARLY || early.keys().next_back().is_some_and(|&k| m.seq < k) {
                early.insert(m.seq, m);
                if early.len() > MAX_EARLY {
                    early.pop_last();
                }
            }
            self.pull(from, &origin, now, out);
            return;
        }
        let origin = m.origin.clone();
        let mut next = m.seq;
        out.push(RelayAction::Apply(m));
        if let Some(early) = self.early.get_mut(&origin) {
            while let Some(m) = early.remove(&(next + 1)) {
                next += 1;
                out.push(RelayAction::Apply(m));
            }
            early.retain(|&seq, _| seq > next);
            if early.is_empty() {
                self.early.remove(&origin);
            }
        }
        self.have.insert(origin, next);
    }

    fn pull<P>(&mut self, from: P, origin: &str, now: Duration, out: &mut Vec<RelayAction<P>>) {
        let due = self
            .last_pull
            .get(origin)
            .is_none_or(|&at| now >= at + PULL_RETRY);
        if due {
            self.last_pull.insert(origin.to_string(), now);
            out.push(RelayAction::Send(
                from,
                RelayPacket::Pull {
                    origin: origin.to_string(),
                    after: self.have_of(origin),
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// One simulated node: its relay, its "storage" (every message it holds,
    /// by origin and sequence) and the order it applied remote messages in.
    struct SimNode {
        relay: Relay,
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

        fn post(&mut self, node: usize, text: &str) {
            let m = self.nodes[node].relay.local(
                "lobby".into(),
                format!("u{node}"),
                text.into(),
                MessageKind::Say,
                0,
            );
            self.nodes[node]
                .store
                .insert((m.origin.clone(), m.seq), m.clone());
            for to in 0..self.nodes.len() {
                if to != node {
                    self.send(node, to, RelayPacket::Msg(m.clone()));
                }
            }
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
                let actions = self.nodes[to].relay.receive(from, p, self.now);
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
        let mut rounds = 0;
        while !sim.converged() {
            sim.round();
            rounds += 1;
            assert!(rounds < 200, "no convergence after 200 rounds");
        }
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
        let mut rounds = 0;
        while !sim.converged() {
            sim.round();
            rounds += 1;
            assert!(rounds < 200, "no convergence after 200 rounds");
        }
        assert_eq!(sim.nodes[1].store.len(), 120);
        sim.check_exactly_once_in_order(&counts);
        // Restarted n2 keeps numbering after what it had assigned.
        let m = sim.nodes[2].relay.local(
            "lobby".into(),
            "u2".into(),
            "after".into(),
            MessageKind::Say,
            0,
        );
        assert_eq!(m.seq, counts["n2"] + 1);
    }

    #[test]
    fn duplicates_own_messages_and_garbage_are_ignored() {
        let mut r = Relay::new("a", BTreeMap::new());
        let m = |origin: &str, seq| RelayedMessage {
            origin: origin.into(),
            seq,
            room: "r".into(),
            from: "x".into(),
            text: "t".into(),
            kind: MessageKind::Say,
            ts: 0,
        };
        let now = Duration::ZERO;
        assert_eq!(r.receive(1, RelayPacket::Msg(m("b", 1)), now).len(), 1);
        assert!(r.receive(1, RelayPacket::Msg(m("b", 1)), now).is_empty());
        assert!(r.receive(1, RelayPacket::Msg(m("a", 5)), now).is_empty());
        assert!(r.receive(1, RelayPacket::Msg(m("b", 0)), now).is_empty());
        // A gap: held, and pulled once per PULL_RETRY.
        let got = r.receive(1, RelayPacket::Msg(m("b", 3)), now);
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
        assert!(r.receive(1, RelayPacket::Msg(m("b", 4)), now).is_empty());
        let got = r.receive(1, RelayPacket::Msg(m("b", 2)), now);
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
}

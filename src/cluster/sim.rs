//! A deterministic simulator for the sans-IO [`Node`]: many nodes, simulated
//! time, a seeded RNG, and a network that delays, loses and partitions
//! datagrams. The membership tests below run minutes of cluster life in
//! well under a second of wall time.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::id::{NodeId, NodeMeta};
use super::node::{MemberEvent, MemberState, Node, Payload, Timer, Tuning};
use super::wire::Sealer;

enum Ev {
    Deliver {
        to: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Timer {
        node: usize,
        epoch: u32,
        timer: Timer,
    },
    /// An ICMP "port unreachable" for a datagram `node` sent to `to`.
    Unreachable {
        node: usize,
        epoch: u32,
        to: SocketAddr,
    },
}

struct SimNode {
    node: Node,
    up: bool,
    epoch: u32,
}

/// A simulated cluster.
pub(crate) struct Sim {
    now: Duration,
    queue: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    rng: StdRng,
    tuning: Tuning,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// One-way delay range.
    pub latency: (Duration, Duration),
    /// Group of each node; datagrams between groups are dropped.
    pub groups: Option<Vec<u8>>,
    /// Whether a datagram sent to a stopped node draws an ICMP "port
    /// unreachable" back to its sender (as on a host whose process died).
    pub icmp: bool,
    /// Every member event: (time, observing node, event).
    pub events: Vec<(Duration, usize, MemberEvent)>,
    /// Every payload received: (receiving node, payload).
    pub payloads: Vec<(usize, Payload)>,
}

pub(crate) fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1),
        7946,
    ))
}

impl Sim {
    pub(crate) fn new(seed: u64, tuning: Tuning) -> Sim {
        Sim {
            now: Duration::ZERO,
            queue: BTreeMap::new(),
            seq: 0,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            tuning,
            loss: 0.0,
            latency: (Duration::from_micros(200), Duration::from_millis(2)),
            groups: None,
            icmp: false,
            events: Vec::new(),
            payloads: Vec::new(),
        }
    }

    pub(crate) fn now(&self) -> Duration {
        self.now
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn node(&self, i: usize) -> &Node {
        &self.nodes[i].node
    }

    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up
    }

    /// Starts node `i` (a new one when `i == len()`, else a restart with a
    /// later generation) joining through the nodes in `seeds`.
    pub(crate) fn start(&mut self, i: usize, seeds: &[usize], key: Option<&str>) {
        let generation = if i < self.nodes.len() {
            self.nodes[i].node.id().bump + 1000
        } else {
            1
        };
        let id = NodeId::with_bump(format!("n{i}"), addr(i), generation);
        let meta = NodeMeta {
            http: Some(SocketAddr::from(([10, 1, 0, 1], 8000 + i as u16))),
            chat: None,
        };
        let rng = StdRng::seed_from_u64(self.rng.random());
        let node = Node::new(
            id,
            meta,
            self.tuning.clone(),
            key.map(|k| Sealer::from_keys(k).expect("no empty key")),
            seeds.iter().map(|&s| addr(s)).collect(),
            rng,
        )
        .expect("valid tuning");
        if i < self.nodes.len() {
            let n = &mut self.nodes[i];
            n.node = node;
            n.up = true;
            n.epoch += 1;
        } else {
            assert_eq!(i, self.nodes.len(), "nodes are added in order");
            self.nodes.push(SimNode {
                node,
                up: true,
                epoch: 0,
            });
            self.by_addr.insert(addr(i), i);
        }
        self.nodes[i].node.start();
        self.drain(i);
    }

    /// Stops node `i` without a word (like `kill -9`).
    pub(crate) fn kill(&mut self, i: usize) {
        self.nodes[i].up = false;
        self.nodes[i].epoch += 1;
    }

    /// Node `i` leaves gracefully, then stops.
    pub(crate) fn leave(&mut self, i: usize) {
        self.nodes[i].node.leave();
        self.drain(i);
        self.kill(i);
    }

    /// Node `i` is told that node `about` is unreachable (true or not).
    pub(crate) fn report_unreachable(&mut self, i: usize, about: usize) {
        self.nodes[i].node.handle_unreachable(addr(about));
        self.drain(i);
    }

    pub(crate) fn send_payload(&mut self, from: usize, to: usize, data: &[u8]) {
        self.nodes[from]
            .node
            .send_payload(addr(to), data)
            .expect("payload accepted");
        self.drain(from);
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn drain(&mut self, i: usize) {
        let out = self.nodes[i].node.take_output();
        let epoch = self.nodes[i].epoch;
        for (after, timer) in out.timers {
            let at = self.now + after;
            self.schedule(
                at,
                Ev::Timer {
                    node: i,
                    epoch,
                    timer,
                },
            );
        }
        for (to, data) in out.sends {
            let Some(&j) = self.by_addr.get(&to) else {
                continue;
            };
            if let Some(groups) = &self.groups
                && groups[i] != groups[j]
            {
                continue;
            }
            if self.loss > 0.0 && self.rng.random_bool(self.loss) {
                continue;
            }
            let (lo, hi) = self.latency;
            let delay = lo + (hi - lo).mul_f64(self.rng.random_range(0.0..1.0));
            if self.icmp && !self.nodes[j].up {
                let at = self.now + delay * 2;
                self.schedule(at, Ev::Unreachable { node: i, epoch, to });
                continue;
            }
            let at = self.now + delay;
            self.schedule(
                at,
                Ev::Deliver {
                    to: j,
                    from: addr(i),
                    data,
                },
            );
        }
        for e in out.events {
            self.events.push((self.now, i, e));
        }
        for p in out.payloads {
            self.payloads.push((i, p));
        }
    }

    /// Processes every event up to `until`.
    pub(crate) fn run_until(&mut self, until: Duration) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), ev) = entry.remove_entry();
            self.now = at;
            match ev {
                Ev::Deliver { to, from, data } => {
                    if self.nodes[to].up {
                        self.nodes[to].node.handle_packet(from, &data);
                        self.drain(to);
                    }
                }
                Ev::Timer { node, epoch, timer } => {
                    if self.nodes[node].up && self.nodes[node].epoch == epoch {
                        self.nodes[node].node.handle_timer(timer);
                        self.drain(node);
                    }
                }
                Ev::Unreachable { node, epoch, to } => {
                    if self.nodes[node].up && self.nodes[node].epoch == epoch {
                        self.nodes[node].node.handle_unreachable(to);
                        self.drain(node);
                    }
                }
            }
        }
        self.now = until;
    }

    pub(crate) fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Runs in steps of 10 ms until `pred` holds, at most `limit`; returns
    /// the simulated time it took, or `None`.
    pub(crate) fn run_until_true(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        while self.now - start <= limit {
            if pred(self) {
                return Some(self.now - start);
            }
            self.run_for(Duration::from_millis(10));
        }
        None
    }

    /// Whether every running node counts exactly `n` members.
    pub(crate) fn all_count(&self, n: usize) -> bool {
        (0..self.len())
            .filter(|&i| self.is_up(i))
            .all(|i| self.node(i).counts().members == n)
    }

    /// Down events about anyone, as (observer, member name).
    pub(crate) fn downs(&self) -> Vec<(usize, String)> {
        self.events
            .iter()
            .filter(|(_, _, e)| e.state == MemberState::Down)
            .map(|(_, i, e)| (*i, e.id.name.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed seed; `NETKIT_SIM_SEED=N` explores others.
    fn seed() -> u64 {
        std::env::var("NETKIT_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_2026)
    }

    fn tuning() -> Tuning {
        Tuning::default()
    }

    /// Starts `n` nodes, one every `gap`, all joining through node 0, and
    /// returns the time from the first joiner's start until all see all
    /// (panics after 10 simulated seconds).
    fn converge(sim: &mut Sim, n: usize, gap: Duration) -> Duration {
        let limit = Duration::from_secs(10);
        sim.start(0, &[], None);
        let t0 = sim.now();
        for i in 1..n {
            sim.start(i, &[0], None);
            sim.run_for(gap);
        }
        if sim.run_until_true(limit, |s| s.all_count(n)).is_none() {
            let counts: Vec<usize> = (0..n).map(|i| sim.node(i).counts().members).collect();
            panic!("no convergence within {limit:?}: {counts:?}");
        }
        sim.now() - t0
    }

    #[test]
    fn fifty_nodes_converge_and_learn_each_others_metadata() {
        let mut sim = Sim::new(seed(), tuning());
        let took = converge(&mut sim, 50, Duration::from_millis(10));
        // 49 joiners over 0.49 s; everyone sees everyone within a second.
        assert!(took <= Duration::from_millis(1000), "took {took:?}");
        sim.run_for(Duration::from_secs(2));
        for i in 0..50 {
            let known = sim
                .node(i)
                .members()
                .filter(|m| m.meta.as_ref().and_then(|m| m.http).is_some())
                .count();
            assert_eq!(
                known, 49,
                "node {i} knows the metadata of every other member"
            );
        }
        assert!(sim.downs().is_empty());
    }

    #[test]
    fn a_killed_node_is_declared_down_by_all_and_a_restart_rejoins() {
        let mut sim = Sim::new(seed(), tuning());
        converge(&mut sim, 50, Duration::from_millis(10));
        sim.run_for(Duration::from_secs(30));
        // Five victims one after another: the tail matters, not one lucky run.
        let victims = [17, 3, 42, 28, 9];
        let mut tooks = Vec::new();
        for (k, &victim) in victims.iter().enumerate() {
            sim.kill(victim);
            let alive = 50 - k - 1;
            let t_kill = sim.now();
            let took = sim
                .run_until_true(Duration::from_secs(60), |s| s.all_count(alive))
                .expect("victim declared down everywhere");
            let name = format!("n{victim}");
            let about: Vec<(Duration, MemberState)> = sim
                .events
                .iter()
                .filter(|(t, _, e)| *t >= t_kill && e.id.name == name)
                .map(|(t, _, e)| (*t - t_kill, e.state))
                .collect();
            let first_suspect = about.iter().find(|(_, s)| *s == MemberState::Suspect);
            let first_down = about.iter().find(|(_, s)| *s == MemberState::Down);
            // SWIM's weak spot: nobody may happen to probe the victim for a
            // few seconds (probes of it arrive about once a second
            // cluster-wide, exponentially spaced), so one victim may exceed
            // the 5 s target; the median must not.
            assert!(
                took <= Duration::from_secs(10),
                "{name}: detection took {took:?}; first suspect {first_suspect:?}, first down {first_down:?}"
            );
            tooks.push(took);
            sim.run_for(Duration::from_secs(10));
        }
        tooks.sort();
        assert!(
            tooks[2] <= Duration::from_secs(5),
            "median detection {tooks:?}"
        );
        let downs = sim.downs();
        let names: Vec<String> = victims.iter().map(|v| format!("n{v}")).collect();
        assert!(
            downs.iter().all(|(_, name)| names.contains(name)),
            "{downs:?}"
        );
        let observers = downs.iter().filter(|(_, name)| name == "n17").count();
        assert_eq!(observers, 49, "every survivor saw n17 go down");
        for v in victims.into_iter().skip(1) {
            sim.start(v, &[0], None);
        }

        sim.start(17, &[5], None);
        sim.run_until_true(Duration::from_secs(5), |s| s.all_count(50))
            .expect("restarted nodes rejoin");
    }

    #[test]
    fn with_icmp_killed_nodes_are_out_everywhere_in_a_median_under_three_seconds() {
        // A crashed process leaves its port unbound, so the first datagram
        // sent to it draws "port unreachable": its sender suspects it at
        // once instead of a probe period later.
        let mut sim = Sim::new(seed(), tuning());
        sim.icmp = true;
        converge(&mut sim, 50, Duration::from_millis(10));
        sim.run_for(Duration::from_secs(30));
        let victims = [17, 3, 42, 28, 9, 33, 21, 11, 46, 5];
        let mut tooks = Vec::new();
        for (k, &victim) in victims.iter().enumerate() {
            sim.kill(victim);
            let took = sim
                .run_until_true(Duration::from_secs(60), |s| s.all_count(50 - k - 1))
                .expect("victim declared down everywhere");
            tooks.push(took);
            sim.run_for(Duration::from_secs(10));
        }
        tooks.sort();
        // What is left is the wait for a first datagram to the victim: probes
        // of any one member come about once per probe period cluster-wide,
        // exponentially spaced, so a long wait now and then is inherent.
        assert!(
            tooks[tooks.len() / 2] <= Duration::from_millis(3000),
            "median {tooks:?}"
        );
        assert!(
            tooks.iter().all(|t| *t <= Duration::from_secs(8)),
            "{tooks:?}"
        );
        let downs = sim.downs();
        let names: Vec<String> = victims.iter().map(|v| format!("n{v}")).collect();
        assert!(
            downs.iter().all(|(_, name)| names.contains(name)),
            "only victims go down: {downs:?}"
        );
    }

    #[test]
    fn a_false_unreachable_report_is_refuted_and_nobody_goes_down() {
        let mut sim = Sim::new(seed(), tuning());
        sim.icmp = true;
        converge(&mut sim, 5, Duration::from_millis(10));
        sim.run_for(Duration::from_secs(5));
        let t0 = sim.now();
        // Forged (or stale) reports about a live member, repeated.
        for _ in 0..3 {
            sim.report_unreachable(0, 3);
            sim.report_unreachable(1, 3);
        }
        let suspected = sim
            .events
            .iter()
            .any(|(t, _, e)| *t >= t0 && e.id.name == "n3" && e.state == MemberState::Suspect);
        assert!(suspected, "the report starts a suspicion");
        sim.run_for(Duration::from_secs(20));
        assert!(sim.downs().is_empty(), "{:?}", sim.downs());
        assert!(sim.all_count(5), "n3 refuted and is alive everywhere");
        // Reports about an unknown address or this node itself change nothing.
        let before = sim.events.len();
        sim.report_unreachable(0, 0);
        sim.nodes[0]
            .node
            .handle_unreachable(SocketAddr::from(([127, 0, 0, 1], 1)));
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.events.len(), before);
    }

    #[test]
    fn ten_minutes_at_ten_percent_loss_give_no_false_down() {
        let mut sim = Sim::new(seed(), tuning());
        converge(&mut sim, 50, Duration::from_millis(10));
        sim.loss = 0.10;
        sim.run_for(Duration::from_secs(600));
        let mut open: HashMap<(usize, String), Duration> = HashMap::new();
        let mut durations = Vec::new();
        for (t, i, e) in &sim.events {
            if e.state == MemberState::Suspect {
                open.insert((*i, e.id.name.clone()), *t);
            } else if let Some(t0) = open.remove(&(*i, e.id.name.clone())) {
                durations.push(*t - t0);
            }
        }
        durations.sort();
        eprintln!(
            "suspicions seen {}; suspect→alive p50 {:?} p99 {:?} max {:?}",
            durations.len(),
            durations.get(durations.len() / 2),
            durations.get(durations.len() * 99 / 100),
            durations.last()
        );
        assert_eq!(sim.downs(), vec![], "no member declared down");
        let suspicions = sim
            .events
            .iter()
            .filter(|(_, _, e)| e.state == MemberState::Suspect)
            .count();
        assert!(suspicions > 0, "the loss did cause (refuted) suspicions");
        assert!(sim.all_count(50));
    }

    #[test]
    fn a_partition_heals() {
        let mut sim = Sim::new(seed(), tuning());
        converge(&mut sim, 20, Duration::from_millis(10));
        sim.groups = Some((0..20).map(|i| (i % 2) as u8).collect());
        sim.run_until_true(Duration::from_secs(30), |s| s.all_count(10))
            .expect("each side declares the other down");
        sim.groups = None;
        let took = sim
            .run_until_true(Duration::from_secs(120), |s| s.all_count(20))
            .expect("the partition heals");
        assert!(took <= Duration::from_secs(30), "healing took {took:?}");
        // And it stays healed.
        sim.run_for(Duration::from_secs(30));
        assert!(sim.all_count(20));
    }

    #[test]
    fn a_leaving_node_is_seen_as_left_at_once() {
        let mut sim = Sim::new(seed(), tuning());
        converge(&mut sim, 10, Duration::from_millis(10));
        sim.run_for(Duration::from_secs(1));
        sim.leave(4);
        let took = sim
            .run_until_true(Duration::from_secs(10), |s| s.all_count(9))
            .unwrap();
        assert!(took <= Duration::from_millis(50), "took {took:?}");
        let lefts = sim
            .events
            .iter()
            .filter(|(_, _, e)| e.state == MemberState::Left && e.id.name == "n4")
            .count();
        assert_eq!(lefts, 9);
        // Foca's own gossip of the departure may beat the direct notice by a
        // moment; the notice then relabels the member "left".
        for i in (0..10).filter(|&i| i != 4) {
            let m = sim.node(i).members().find(|m| m.id.name == "n4").unwrap();
            assert_eq!(m.state, MemberState::Left, "as seen by n{i}");
        }
    }

    #[test]
    fn payloads_reach_a_member_and_subscribers_see_events() {
        let mut sim = Sim::new(seed(), tuning());
        converge(&mut sim, 3, Duration::from_millis(10));
        sim.send_payload(0, 2, b"hello n2");
        sim.run_for(Duration::from_millis(50));
        assert_eq!(sim.payloads.len(), 1);
        assert_eq!(sim.payloads[0].0, 2);
        assert_eq!(sim.payloads[0].1.from.name, "n0");
        assert_eq!(sim.payloads[0].1.data, b"hello n2");
        let err = sim.nodes[0].node.send_payload(addr(9), b"x").unwrap_err();
        assert!(err.to_string().contains("no live member"));
        let big = vec![0u8; 5000];
        assert!(sim.nodes[0].node.send_payload(addr(1), &big).is_err());
    }

    #[test]
    fn a_node_with_the_wrong_key_stays_out() {
        let mut sim = Sim::new(seed(), tuning());
        sim.start(0, &[], Some("k"));
        sim.start(1, &[0], Some("k"));
        sim.start(2, &[0], Some("other"));
        sim.start(3, &[0], None);
        sim.run_for(Duration::from_secs(5));
        assert_eq!(sim.node(0).counts().members, 2);
        assert_eq!(sim.node(1).counts().members, 2);
        assert_eq!(sim.node(2).counts().members, 1);
        assert_eq!(sim.node(3).counts().members, 1);
        assert!(sim.node(0).stats().rejected > 0);
    }

    /// Three nodes on key "old" restart one at a time (a graceful leave, as
    /// on SIGTERM) through the keyrings in `steps`. After every restart all
    /// must see all again; returns the packets rejected over the run.
    fn restart_through(steps: &[&str]) -> u64 {
        let mut sim = Sim::new(seed(), tuning());
        for i in 0..3 {
            sim.start(i, &[0][..i.min(1)], Some("old"));
        }
        let settle = Duration::from_secs(10);
        assert!(sim.run_until_true(settle, |s| s.all_count(3)).is_some());
        for ring in steps {
            for i in 0..3 {
                // Every identity that is running now: none of them may be marked down.
                let live: Vec<NodeId> = (0..3).map(|j| sim.node(j).id().clone()).collect();
                sim.leave(i);
                sim.run_for(Duration::from_millis(100));
                let seeds: Vec<usize> = (0..3).filter(|&j| j != i).collect();
                sim.start(i, &seeds, Some(ring));
                let joined = sim.run_until_true(settle, |s| s.all_count(3));
                let rejected: u64 = (0..3).map(|j| sim.node(j).stats().rejected).sum();
                if rejected > 0 {
                    return rejected;
                }
                assert!(joined.is_some(), "step {ring:?}, node {i}: no convergence");
                let wrongly_down = sim.events.iter().any(|(_, _, e)| {
                    e.state == MemberState::Down
                        && live[..]
                            .iter()
                            .enumerate()
                            .any(|(j, id)| j != i && *id == e.id)
                });
                assert!(
                    !wrongly_down,
                    "step {ring:?}, node {i}: a running member was marked down"
                );
            }
        }
        (0..3).map(|i| sim.node(i).stats().rejected).sum()
    }

    #[test]
    fn three_nodes_rotate_their_key_one_at_a_time_with_no_running_member_down() {
        assert_eq!(restart_through(&["old,new", "new,old", "new"]), 0);
        // Switching the sealing key before every node can open it does show.
        assert!(restart_through(&["new,old", "new,old", "new"]) > 0);
    }

    #[test]
    fn same_seed_same_run() {
        let run = |seed| {
            let mut sim = Sim::new(seed, tuning());
            converge(&mut sim, 8, Duration::from_millis(5));
            sim.loss = 0.2;
            sim.kill(3);
            sim.run_for(Duration::from_secs(20));
            sim.events
                .iter()
                .map(|(t, i, e)| format!("{t:?} {i} {:?} {}", e.id, e.state))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}

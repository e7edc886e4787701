//! The sans-IO membership node: foca plus what netkit adds around it —
//! joining through seeds, push-pull state exchange, metadata, graceful leave,
//! member-state tracking with events, application payloads and packet
//! sealing. It never touches a socket or a clock: the caller feeds it packets
//! and timer events and drains an [`Output`] of datagrams to send, timers to
//! arm and events to publish, so the same code runs under tokio
//! ([`super::membership`]) and in the seeded simulator used by the tests.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use foca::{Foca, Identity, NoCustomBroadcast, OwnedNotification, PostcardCodec, Runtime, State};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tracing::{debug, info, warn};

mod app;
mod report;
mod tuning;

pub use report::{Counts, MemberEvent, MemberInfo, MemberState, Output, Payload, SendError, Stats};
pub use tuning::Tuning;

use super::id::{NodeId, NodeMeta};
use super::wire::{self, AppFrame, AppMsg, Packet, Sealer};

/// A timer the node asked for; hand it back to [`Node::handle_timer`] when due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// One of foca's timers.
    Foca(foca::Timer<NodeId>),
    /// Time for a push-pull exchange with a random member.
    PushPull,
    /// Time to announce to the seeds again (no live member known).
    Join,
    /// Time to nudge a member this node suspects again, if it still does.
    Nudge {
        /// The suspect.
        id: NodeId,
        /// Its incarnation when suspected.
        incarnation: u16,
        /// Nudges left after this one.
        remaining: u8,
    },
    /// The suspect timeout of a suspicion raised by an unreachable report
    /// ([`Node::handle_unreachable`]) is over: down, unless it refuted.
    UnreachableDown {
        /// The suspect.
        id: NodeId,
        /// Its incarnation when suspected.
        incarnation: u16,
    },
}

/// The part of the node foca writes into while it runs (its `Runtime`).
struct Io {
    rng: StdRng,
    sealer: Option<Sealer>,
    out: Output,
    stats: Stats,
    notes: Vec<OwnedNotification<NodeId>>,
    /// Members this node just started suspecting (its own probe failed).
    suspected: Vec<(NodeId, u16)>,
    plain: Vec<u8>,
}

impl Io {
    fn emit(&mut self, to: SocketAddr) {
        let packet = match &self.sealer {
            Some(sealer) => {
                let nonce: [u8; 24] = self.rng.random();
                let mut sealed = Vec::with_capacity(self.plain.len() + wire::SEAL_OVERHEAD);
                sealer.seal(&self.plain, nonce, &mut sealed);
                sealed
            }
            None => self.plain.clone(),
        };
        self.stats.tx_bytes += packet.len() as u64;
        self.stats.tx_pkts += 1;
        self.out.sends.push((to, packet));
    }

    fn send_app(&mut self, to: SocketAddr, frame: &AppFrame) {
        wire::frame_app(frame, &mut self.plain);
        self.emit(to);
    }
}

impl Runtime<NodeId> for Io {
    fn notify(&mut self, notification: foca::Notification<'_, NodeId>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        wire::frame_foca(data, &mut self.plain);
        self.emit(to.addr);
    }

    fn submit_after(&mut self, event: foca::Timer<NodeId>, after: Duration) {
        // Foca arms this timer exactly when its own probe of a member failed.
        if let foca::Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &event
        {
            self.suspected.push((member_id.clone(), *incarnation));
        }
        // Foca probes at a fixed period, so nodes started together probe in
        // lock-step bursts forever; ±10 % jitter spreads them out (the mean
        // period, and so the packet rate, stays the same).
        let after = if matches!(event, foca::Timer::ProbeRandomMember(_)) {
            after.mul_f64(self.rng.random_range(0.9..1.1))
        } else {
            after
        };
        self.out.timers.push((after, Timer::Foca(event)));
    }
}

/// One cluster member's protocol state, driven by packets and timers.
pub struct Node {
    foca: Foca<NodeId, PostcardCodec, StdRng, NoCustomBroadcast>,
    io: Io,
    tuning: Tuning,
    meta: NodeMeta,
    seeds: Vec<SocketAddr>,
    view: HashMap<SocketAddr, MemberInfo>,
    left: HashSet<NodeId>,
    metas: HashMap<NodeId, NodeMeta>,
    meta_sent: HashSet<NodeId>,
    warned: HashSet<SocketAddr>,
    join_pending: bool,
    leaving: bool,
    version: u64,
    /// (addr, generation, incarnation, state) of foca's members at the last look.
    snapshot: Vec<(SocketAddr, u32, u16, State)>,
    /// Suspicions raised by unreachable reports whose timeout is running.
    unreachable: HashSet<(NodeId, u16)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", self.foca.identity())
            .finish()
    }
}

impl Node {
    /// A node with identity `id` that will join through `seeds` (none: it
    /// starts a new cluster). `rng` drives every random choice, so a seeded
    /// one makes a run reproducible. Call [`Node::start`] next.
    pub fn new(
        id: NodeId,
        meta: NodeMeta,
        tuning: Tuning,
        sealer: Option<Sealer>,
        seeds: Vec<SocketAddr>,
        mut rng: StdRng,
    ) -> Result<Self, String> {
        let config = tuning.foca_config()?;
        let foca_rng = StdRng::from_rng(&mut rng);
        let seeds = seeds.into_iter().filter(|s| *s != id.addr).collect();
        Ok(Self {
            foca: Foca::new(id, config, foca_rng, PostcardCodec),
            io: Io {
                rng,
                sealer,
                out: Output::default(),
                stats: Stats::default(),
                notes: Vec::new(),
                suspected: Vec::new(),
                plain: Vec::with_capacity(1500),
            },
            tuning,
            meta,
            seeds,
            view: HashMap::new(),
            left: HashSet::new(),
            metas: HashMap::new(),
            meta_sent: HashSet::new(),
            warned: HashSet::new(),
            join_pending: false,
            leaving: false,
            version: 0,
            snapshot: Vec::new(),
            unreachable: HashSet::new(),
        })
    }

    /// Arms the periodic timers and announces to the seeds.
    pub fn start(&mut self) {
        let first = self.jittered(self.tuning.push_pull_interval);
        self.io.out.timers.push((first, Timer::PushPull));
        if self.seeds.is_empty() {
            info!(id = ?self.id(), "cluster: starting a new cluster (no seeds)");
        } else {
            info!(id = ?self.id(), seeds = ?self.seeds, "cluster: joining through seeds");
            self.handle_timer(Timer::Join);
        }
    }

    /// This node's current identity.
    pub fn id(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Every member this node knows of (itself excluded), down and left ones included.
    pub fn members(&self) -> impl Iterator<Item = &MemberInfo> {
        self.view.values()
    }

    /// Member counts, this node included.
    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            members: 1,
            alive: 1,
            suspect: 0,
        };
        for m in self.view.values() {
            match m.state {
                MemberState::Alive => {
                    c.members += 1;
                    c.alive += 1;
                }
                MemberState::Suspect => {
                    c.members += 1;
                    c.suspect += 1;
                }
                MemberState::Down | MemberState::Left => {}
            }
        }
        if self.leaving {
            c = Counts::default();
        }
        c
    }

    /// A number that changes whenever the member view (states or metadata) does.
    pub fn view_version(&self) -> u64 {
        self.version
    }

    /// Traffic counters.
    pub fn stats(&self) -> Stats {
        self.io.stats
    }

    /// Takes what the node wants done since the last call.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.io.out)
    }

    /// Largest application payload [`Node::send_payload`] accepts.
    pub fn max_payload(&self) -> usize {
        // Frame kind, identity (name ≤ 64 bytes), enum tags and length prefixes.
        self.tuning.max_packet - wire::SEAL_OVERHEAD - 1 - 100
    }

    /// Handles one received datagram.
    pub fn handle_packet(&mut self, from: SocketAddr, packet: &[u8]) {
        self.io.stats.rx_bytes += packet.len() as u64;
        self.io.stats.rx_pkts += 1;
        if packet.len() > self.tuning.max_packet {
            self.reject(
                from,
                &format!("{} bytes exceeds the packet limit", packet.len()),
            );
            return;
        }
        let opened;
        let plain = match &self.io.sealer {
            Some(sealer) => match sealer.open(packet) {
                Ok(p) => {
                    opened = p;
                    &opened[..]
                }
                Err(e) => {
                    self.reject(from, &e.to_string());
                    return;
                }
            },
            None => packet,
        };
        match wire::decode(plain) {
            Ok(Packet::Foca(data)) => {
                if let Err(e) = self.foca.handle_data(data, &mut self.io) {
                    debug!(%from, "cluster: foca refused a packet: {e}");
                }
                self.after_foca();
            }
            Ok(Packet::App(frame)) => self.handle_app(frame),
            Err(e) => self.reject(from, &e.to_string()),
        }
    }

    /// The host of `addr` answered a datagram sent there with "port
    /// unreachable" (ICMP): no socket is bound there, so the member gossiping
    /// from it has most likely crashed. This is taken as a failed probe that
    /// came early: the member is suspected at once (and the suspicion
    /// gossiped, and the member nudged, so one that is alive after all
    /// refutes it as usual), and declared down after two thirds of the
    /// suspect timeout unless it refutes. The
    /// report only ever starts a suspicion of an alive member, so a forged
    /// one costs a refutation and nothing more.
    pub fn handle_unreachable(&mut self, addr: SocketAddr) {
        if self.leaving {
            return;
        }
        let Some(member) = self
            .foca
            .iter_membership_state()
            .find(|m| m.id().addr == addr && m.state() == State::Alive)
        else {
            return;
        };
        let (id, incarnation) = (member.id().clone(), member.incarnation());
        if !self.unreachable.insert((id.clone(), incarnation)) {
            return;
        }
        info!(member = %id, "cluster: member's gossip port is unreachable; suspecting it now");
        let suspect = foca::Member::new(id.clone(), incarnation, State::Suspect);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(suspect), true, &mut self.io)
        {
            debug!("cluster: applying an unreachable suspicion: {e}");
        }
        // A shorter wait than a failed probe's: the evidence is stronger
        // (nothing is bound there), and the member is told directly, so a
        // live one refutes within a round trip.
        self.io.out.timers.push((
            self.tuning.suspect_timeout.mul_f64(2.0 / 3.0),
            Timer::UnreachableDown {
                id: id.clone(),
                incarnation,
            },
        ));
        // Should the report be wrong, the member hears of it directly too.
        self.nudge(id, incarnation, 2);
        self.after_foca();
    }

    /// Handles a timer that came due.
    pub fn handle_timer(&mut self, timer: Timer) {
        match timer {
            Timer::UnreachableDown { id, incarnation } => {
                self.unreachable.remove(&(id.clone(), incarnation));
                let still = self.foca.iter_membership_state().any(|m| {
                    m.id() == &id && m.incarnation() == incarnation && m.state() == State::Suspect
                });
                if still && !self.leaving {
                    let down = foca::Member::new(id, incarnation, State::Down);
                    if let Err(e) = self
                        .foca
                        .apply_many(std::iter::once(down), true, &mut self.io)
                    {
                        debug!("cluster: declaring an unreachable member down: {e}");
                    }
                    self.after_foca();
                }
            }
            Timer::Foca(t) => {
                if let Err(e) = self.foca.handle_timer(t, &mut self.io) {
                    debug!("cluster: foca timer: {e}");
                }
                self.after_foca();
            }
            Timer::PushPull => {
                let next = self.jittered(self.push_pull_interval());
                self.io.out.timers.push((next, Timer::PushPull));
                if self.leaving {
                    return;
                }
                let active: Vec<SocketAddr> = self
                    .view
                    .values()
                    .filter(|m| m.state.is_active())
                    .map(|m| m.id.addr)
                    .collect();
                if !active.is_empty() {
                    let peer = active[self.io.rng.random_range(0..active.len())];
                    self.send_state(peer, false);
                }
            }
            Timer::Nudge {
                id,
                incarnation,
                remaining,
            } => {
                let still = self
                    .view
                    .get(&id.addr)
                    .is_some_and(|m| m.id == id && m.state == MemberState::Suspect);
                if still && !self.leaving {
                    self.nudge(id, incarnation, remaining);
                }
            }
            Timer::Join => {
                self.join_pending = false;
                if self.leaving || self.foca.num_members() > 0 || self.seeds.is_empty() {
                    return;
                }
                for seed in self.seeds.clone() {
                    if let Err(e) = self.foca.announce(NodeId::seed(seed), &mut self.io) {
                        debug!(%seed, "cluster: announce: {e}");
                    }
                }
                self.after_foca();
                self.join_pending = true;
                self.io
                    .out
                    .timers
                    .push((self.tuning.join_retry, Timer::Join));
            }
        }
    }

    /// Sends opaque application data to the live member gossiping at `to`.
    pub fn send_payload(&mut self, to: SocketAddr, data: &[u8]) -> Result<(), SendError> {
        let max = self.max_payload();
        if data.len() > max {
            return Err(SendError::TooBig {
                len: data.len(),
                max,
            });
        }
        match self.view.get(&to) {
            Some(m) if m.state.is_active() => {}
            _ => return Err(SendError::NoSuchMember(to)),
        }
        let frame = AppFrame {
            from: self.id().clone(),
            msg: AppMsg::Payload(data.to_vec()),
        };
        self.io.send_app(to, &frame);
        Ok(())
    }

    /// Leaves the cluster: tells every live member directly (so they see
    /// "left" at once), then lets foca gossip its own departure.
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        let frame = AppFrame {
            from: self.id().clone(),
            msg: AppMsg::Leave,
        };
        let active: Vec<SocketAddr> = self
            .view
            .values()
            .filter(|m| m.state.is_active())
            .map(|m| m.id.addr)
            .collect();
        for addr in &active {
            self.io.send_app(*addr, &frame);
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.io) {
            debug!("cluster: leave: {e}");
        }
        self.io.notes.clear();
        self.leaving = true;
        info!(id = ?self.id(), told = active.len(), "cluster: left the cluster");
    }

    fn reject(&mut self, from: SocketAddr, why: &str) {
        self.io.stats.rejected += 1;
        // Bounded: a flood from many addresses cannot grow it without limit.
        if self.warned.len() >= 1024 {
            self.warned.clear();
        }
        if self.warned.insert(from) {
            warn!(%from, "cluster: ignoring gossip packet: {why} (further ones from this address are logged at debug level)");
        } else {
            debug!(%from, "cluster: ignoring gossip packet: {why}");
        }
    }

    /// The push-pull interval, stretched in large clusters as memberlist
    /// does (×2 above 32 members, ×3 above 64, …) so that full-state traffic
    /// per node stays flat as the state grows.
    fn push_pull_interval(&self) -> Duration {
        let n = self.counts().members.max(1) as f64;
        let scale = if n <= 32.0 {
            1.0
        } else {
            (n / 32.0).log2().ceil() + 1.0
        };
        self.tuning.push_pull_interval.mul_f64(scale)
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        let f: f64 = self.io.rng.random_range(0.75..1.25);
        d.mul_f64(f)
    }

    /// Whether `id` is the identity this node currently knows as active.
    fn is_active_member(&self, id: &NodeId) -> bool {
        self.view
            .get(&id.addr)
            .is_some_and(|m| &m.id == id && m.state.is_active())
    }

    /// Reacts to foca's notifications and brings the member view up to date,
    /// emitting an event for every state change.
    fn after_foca(&mut self) {
        for (id, incarnation) in std::mem::take(&mut self.io.suspected) {
            if !self.leaving {
                self.nudge(id, incarnation, 4);
            }
        }
        for note in std::mem::take(&mut self.io.notes) {
            match note {
                OwnedNotification::MemberUp(id) => {
                    if !self.meta_sent.contains(&id) {
                        let want = !self.metas.contains_key(&id);
                        self.send_meta(id, want);
                    }
                }
                OwnedNotification::Rejoin(id) => {
                    warn!(id = ?id, "cluster: the cluster declared this node down; rejoined with a new generation");
                }
                OwnedNotification::Defunct => {
                    warn!("cluster: this node was declared down and cannot rejoin");
                }
                OwnedNotification::Active => debug!("cluster: joined; known by a live member"),
                OwnedNotification::Idle => {
                    info!("cluster: no live member left");
                    if !self.join_pending && !self.seeds.is_empty() && !self.leaving {
                        self.join_pending = true;
                        self.io
                            .out
                            .timers
                            .push((self.tuning.join_retry, Timer::Join));
                    }
                }
                OwnedNotification::MemberDown(_) | OwnedNotification::Rename(_, _) => {}
            }
        }
        self.refresh_view();
    }

    fn refresh_view(&mut self) {
        // Fast path: nothing changed since the last look (most packets).
        let unchanged = self.foca.iter_membership_state().len() == self.snapshot.len()
            && self
                .foca
                .iter_membership_state()
                .zip(&self.snapshot)
                .all(|(m, s)| (m.id().addr, m.id().bump, m.incarnation(), m.state()) == *s);
        if unchanged {
            return;
        }
        self.snapshot.clear();
        self.snapshot.extend(
            self.foca
                .iter_membership_state()
                .map(|m| (m.id().addr, m.id().bump, m.incarnation(), m.state())),
        );
        let mut seen = 0usize;
        let me = self.foca.identity().addr;
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            // Our own earlier generation, declared down by foca itself.
            if id.addr == me {
                continue;
            }
            seen += 1;
            let state = match m.state() {
                State::Alive => MemberState::Alive,
                State::Suspect => MemberState::Suspect,
                State::Down if self.left.contains(id) => MemberState::Left,
                State::Down => MemberState::Down,
            };
            let previous = match self.view.get(&id.addr) {
                Some(old) if &old.id == id && old.state == state => continue,
                Some(old) if &old.id == id => Some(old.state),
                Some(old) if old.state.is_active() && state.is_active() => Some(old.state),
                Some(_) | None => None,
            };
            let info = MemberInfo {
                id: id.clone(),
                state,
                meta: self.metas.get(id).cloned(),
            };
            match (previous, state) {
                (_, MemberState::Down) => warn!(member = %id, "cluster: member is down"),
                (_, MemberState::Left) => info!(member = %id, "cluster: member left"),
                (Some(MemberState::Alive), MemberState::Suspect) => {
                    info!(member = %id, "cluster: member is suspect");
                    // If the refutation has not reached this node by the time
                    // the suspicion should be over, ask the member itself.
                    let after = self.tuning.suspect_timeout + self.tuning.probe_period;
                    let nudge = Timer::Nudge {
                        id: id.clone(),
                        incarnation: m.incarnation(),
                        remaining: 1,
                    };
                    self.io.out.timers.push((after, nudge));
                }
                (Some(MemberState::Suspect), MemberState::Alive) => {
                    info!(member = %id, "cluster: member refuted suspicion; alive")
                }
                (None, _) | (Some(_), _) => info!(member = %id, %state, "cluster: member joined"),
            }
            self.io.out.events.push(MemberEvent {
                id: id.clone(),
                state,
                previous,
            });
            self.view.insert(id.addr, info);
            self.version += 1;
        }
        if seen != self.view.len() {
            let present: HashSet<SocketAddr> = self
                .foca
                .iter_membership_state()
                .map(|m| m.id().addr())
                .collect();
            self.view.retain(|addr, _| present.contains(addr));
            self.version += 1;
        }
    }
}

fn postcard_len<T: Serialize>(value: &T) -> usize {
    postcard::to_allocvec(value).map_or(64, |v| v.len())
}

//! The chat relay between nodes. [`Relay`] is the sans-IO core: which room
//! messages a node must apply, forward, ask for or serve, so that every node
//! ends up with every message exactly once and in each origin's order, plus
//! the direct messages, split packets and summary timing around them (no
//! sockets, clocks or storage: [`Relay::handle`] takes an event and the time
//! and returns actions). [`driver`] is the tokio task `netkit serve` runs when
//! clustering and chat are both on; the messages themselves live in the
//! hub's store, the one log ([`crate::chat::store`]), keyed by origin and
//! sequence; [`presence`] holds who is connected to the other nodes.
//!
//! # Protocol
//!
//! Every message is identified by its origin (the node's name and a tag made
//! once per data dir, `name/TAG`) and the origin's sequence number (1, 2, 3,
//! … per origin, never reused; the origin's hub assigns it in the
//! transaction that stores the message). Each node keeps, per origin, the
//! highest sequence it has applied *without a gap* (`have`).
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
//!   A node far behind pulls the next batch as soon as the last one has
//!   arrived, so catching up on thousands of messages takes round trips,
//!   not summary rounds.

pub mod direct;
pub mod driver;
pub mod packet;
pub mod parts;
pub mod presence;
mod presence_link;
#[cfg(test)]
mod tests;
mod transport;

use std::collections::BTreeMap;
use std::time::Duration;

pub use direct::DirectLink;
pub use driver::run;
pub use packet::{MAGIC, RelayPacket, RelayedMessage, TOPICS_PER_PACKET};
pub use parts::{MAX_DATAGRAM, Reassembly, split};
pub use presence::SharedPresence;

/// Most messages held per origin while waiting for a gap to be filled.
pub const MAX_EARLY: usize = 512;
/// Most messages served for one `Pull` or summary difference; the rest follow
/// on the next summary round.
pub const SERVE_BATCH: usize = 64;
/// Least time between two pulls for the same origin.
pub const PULL_RETRY: Duration = Duration::from_millis(500);
/// How often each node sends its summary to a random live member while
/// there is activity (messages, catch-up, member changes): the tick.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// How long activity keeps summaries at [`SUMMARY_INTERVAL`].
pub const BUSY_FOR: Duration = Duration::from_secs(10);
/// How often a quiet node sends one safety-net datagram: its summary and its
/// presence snapshot in turn (so each goes every other interval).
pub const QUIET_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What happened, for [`Relay::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent<P> {
    /// A datagram's packet from peer `from`, a member in membership
    /// generation `generation`.
    Packet {
        /// The sending peer.
        from: P,
        /// Its membership generation (tells its lives apart).
        generation: u32,
        /// What it sent.
        packet: RelayPacket,
    },
    /// A message posted on this node, as read from its log (stored, with
    /// its sequence): send it to every live member.
    Local(RelayedMessage),
    /// A user here sends a direct message to user `to` of node `peer`.
    Direct {
        /// The recipient's node.
        peer: P,
        /// Sender nick.
        from: String,
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch.
        ts: i64,
    },
    /// Member `peer` is alive: new, or back after being down. It gets this
    /// node's summary at once, so the two catch up on each other (the
    /// receiver of a summary pulls and serves) without summaries to random
    /// members every tick.
    MemberUp {
        /// The member's address.
        peer: P,
    },
    /// A member went (or member events were missed): summaries every tick
    /// for a while.
    MembersChanged,
    /// The periodic tick ([`SUMMARY_INTERVAL`]); `peer` is a live member
    /// picked at random, if there is one.
    Tick {
        /// Where a summary would go.
        peer: Option<P>,
    },
}

/// What the driver must do after a call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAction<P> {
    /// Store this message with its `(origin, seq)` and deliver it to the
    /// room's local members (a message already stored dies in the store).
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
    /// Send a packet to every live member.
    Broadcast(RelayPacket),
    /// Show a direct message from user `from` of peer `peer` to user `to` here.
    ShowDirect {
        /// The sending node.
        peer: P,
        /// Sender nick.
        from: String,
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch, at the sender.
        ts: i64,
    },
    /// A presence snapshot from `peer`, for the presence table.
    Presence(P, presence::Snapshot),
    /// The nicknames of a node that predates presence snapshots.
    LegacyUsers(P, Vec<String>),
    /// Send this node's presence snapshot to `peer` (now and then, in case a
    /// change was lost).
    SendPresence(P),
    /// This many direct messages were never acknowledged and are given up.
    DirectsGivenUp(usize),
    /// Room topics from `peer`, each to be kept if later than the room's.
    ApplyTopics(P, Vec<crate::chat::hub::TopicChange>),
    /// Send every topic this node holds to `peer`, which asked.
    SendTopics(P),
}

/// One node's relay state.
#[derive(Debug, Clone)]
pub struct Relay<P = std::net::SocketAddr> {
    me: String,
    have: BTreeMap<String, u64>,
    early: BTreeMap<String, BTreeMap<u64, RelayedMessage>>,
    /// Per origin: when the last pull went, and what it asked for (after).
    last_pull: BTreeMap<String, (Duration, u64)>,
    /// Per origin: the highest sequence some member is known to hold (from
    /// summaries and messages), so a node behind keeps pulling.
    known: BTreeMap<String, u64>,
    /// Direct messages sent and not yet acknowledged.
    directs: DirectLink<P>,
    /// Direct messages received, by sender and its generation.
    directs_seen: DirectLink<(P, u32)>,
    parts: Reassembly<P>,
    /// Summaries go every tick until then, and every
    /// [`QUIET_SUMMARY_INTERVAL`] after.
    busy_until: Duration,
    last_summary: Duration,
    /// Whether the last quiet tick sent the presence snapshot (the next one
    /// sends the summary).
    quiet_presence_turn: bool,
}

impl<P: Clone + Ord + std::hash::Hash> Relay<P> {
    /// A relay for node `me`, resuming from the `have` map its store holds
    /// (its own entry is the newest sequence of its log). Its clock starts at zero.
    pub fn new(me: impl Into<String>, have: BTreeMap<String, u64>) -> Self {
        Relay {
            me: me.into(),
            have,
            early: BTreeMap::new(),
            last_pull: BTreeMap::new(),
            known: BTreeMap::new(),
            directs: DirectLink::default(),
            directs_seen: DirectLink::default(),
            parts: Reassembly::default(),
            // Quiet from the start: every member that comes up gets a summary
            // ([`RelayEvent::MemberUp`]), which is how a restarted node catches up.
            busy_until: Duration::ZERO,
            last_summary: Duration::ZERO,
            quiet_presence_turn: false,
        }
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The highest gap-free sequence applied per origin.
    pub fn have(&self) -> &BTreeMap<String, u64> {
        &self.have
    }

    /// Direct messages waiting for an acknowledgement.
    pub fn directs_pending(&self) -> usize {
        self.directs.pending()
    }

    /// Handles one event at time `now` (any monotonic origin); returns what
    /// the driver must do, in order.
    pub fn handle(&mut self, event: RelayEvent<P>, now: Duration) -> Vec<RelayAction<P>> {
        let mut out = Vec::new();
        match event {
            RelayEvent::Packet {
                from,
                generation,
                packet,
            } => self.on_packet(from, generation, packet, now, &mut out),
            RelayEvent::Local(m) => {
                self.busy_until = now + BUSY_FOR;
                self.announce_local(m.seq);
                out.push(RelayAction::Broadcast(RelayPacket::Msg(m)));
            }
            RelayEvent::Direct {
                peer,
                from,
                to,
                text,
                ts,
            } => {
                let packet = self.directs.send(peer.clone(), from, to, text, ts, now);
                out.push(RelayAction::Send(peer, packet));
            }
            RelayEvent::MemberUp { peer } => out.push(RelayAction::Send(peer, self.summary())),
            RelayEvent::MembersChanged => self.busy_until = now + BUSY_FOR,
            RelayEvent::Tick { peer } => self.on_tick(peer, now, &mut out),
        }
        out
    }

    /// This node's log goes up to `seq` although the messages were not sent
    /// (the driver could not read them): summaries announce them, and the
    /// members pull them (served from the log once it reads again).
    pub fn announce_local(&mut self, seq: u64) {
        let have = self.have.entry(self.me.clone()).or_insert(0);
        *have = (*have).max(seq);
    }

    /// The anti-entropy summary to send to a random live member.
    pub fn summary(&self) -> RelayPacket {
        RelayPacket::Summary(self.have.iter().map(|(o, s)| (o.clone(), *s)).collect())
    }

    /// One packet from `from`: a handler per kind.
    fn on_packet(
        &mut self,
        from: P,
        generation: u32,
        packet: RelayPacket,
        now: Duration,
        out: &mut Vec<RelayAction<P>>,
    ) {
        let before = out.len();
        match packet {
            RelayPacket::Msg(m) => self.on_msg(from, m, now, out),
            RelayPacket::Summary(theirs) => self.on_summary(from, theirs, now, out),
            RelayPacket::Pull { origin, after } => {
                if self.have_of(&origin) > after {
                    out.push(RelayAction::Serve {
                        to: from,
                        origin,
                        after,
                    });
                }
            }
            RelayPacket::Part {
                id,
                index,
                count,
                data,
            } => {
                if let Some(whole) = self.parts.add(from.clone(), id, index, count, data, now) {
                    self.on_packet(from, generation, whole, now, out);
                }
                return;
            }
            RelayPacket::Users(nicks) => return out.push(RelayAction::LegacyUsers(from, nicks)),
            RelayPacket::Presence(snap) => return out.push(RelayAction::Presence(from, snap)),
            RelayPacket::Direct {
                from: nick,
                to,
                text,
                ts,
                id,
            } => {
                out.push(RelayAction::Send(
                    from.clone(),
                    RelayPacket::DirectAck { id },
                ));
                // A resend of one already shown is acknowledged, not shown.
                if self.directs_seen.first_time((from.clone(), generation), id) {
                    out.push(RelayAction::ShowDirect {
                        peer: from,
                        from: nick,
                        to,
                        text,
                        ts,
                    });
                }
                return;
            }
            RelayPacket::DirectAck { id } => return self.directs.acked(&from, id),
            RelayPacket::Topics(topics) => {
                if topics.len() <= TOPICS_PER_PACKET {
                    out.push(RelayAction::ApplyTopics(from, topics));
                }
                return;
            }
            RelayPacket::TopicsPlease => return out.push(RelayAction::SendTopics(from)),
        }
        // Relay traffic means catching up: summaries go often for a while.
        if out.len() > before {
            self.busy_until = now + BUSY_FOR;
        }
    }

    /// A summary: pull what the sender has more of, serve what it lacks.
    fn on_summary(
        &mut self,
        from: P,
        theirs: Vec<(String, u64)>,
        now: Duration,
        out: &mut Vec<RelayAction<P>>,
    ) {
        let theirs: BTreeMap<String, u64> = theirs.into_iter().collect();
        for (origin, &their) in &theirs {
            let mine = self.have_of(origin);
            if their > mine {
                self.learn(origin, their);
                self.pull(from.clone(), origin, now, out);
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

    /// The tick: resend unacknowledged direct messages, and send a summary
    /// while busy or when a quiet interval is over.
    fn on_tick(&mut self, peer: Option<P>, now: Duration, out: &mut Vec<RelayAction<P>>) {
        let (resend, given_up) = self.directs.due(now);
        out.extend(
            resend
                .into_iter()
                .map(|(p, packet)| RelayAction::Send(p, packet)),
        );
        if given_up > 0 {
            out.push(RelayAction::DirectsGivenUp(given_up));
        }
        let Some(peer) = peer else { return };
        if now < self.busy_until {
            self.last_summary = now;
            out.push(RelayAction::Send(peer, self.summary()));
        } else if now >= self.last_summary + QUIET_SUMMARY_INTERVAL {
            // A quiet node sends one datagram per interval, the summary and
            // its presence snapshot in turn: both are only a safety net then
            // (changes are sent when they happen), and a quiet cluster's
            // traffic is the membership protocol's and little more.
            self.last_summary = now;
            self.quiet_presence_turn = !self.quiet_presence_turn;
            out.push(if self.quiet_presence_turn {
                RelayAction::SendPresence(peer)
            } else {
                RelayAction::Send(peer, self.summary())
            });
        }
    }

    fn have_of(&self, origin: &str) -> u64 {
        self.have.get(origin).copied().unwrap_or(0)
    }

    /// Some member holds `origin`'s messages up to `seq`.
    fn learn(&mut self, origin: &str, seq: u64) {
        let known = self.known.entry(origin.to_string()).or_insert(0);
        *known = (*known).max(seq);
    }

    fn on_msg(&mut self, from: P, m: RelayedMessage, now: Duration, out: &mut Vec<RelayAction<P>>) {
        if m.origin == self.me || m.seq == 0 {
            return;
        }
        let have = self.have_of(&m.origin);
        if m.seq <= have {
            return; // a duplicate
        }
        self.learn(&m.origin, m.seq);
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
        self.have.insert(origin.clone(), next);
        self.pull_next_batch(from, &origin, now, out);
    }

    /// Catching up: once everything the last pull asked for has arrived and
    /// more is known to exist, the next batch is asked for at once (from the
    /// member that served this one) instead of at the next summary.
    fn pull_next_batch(
        &mut self,
        from: P,
        origin: &str,
        now: Duration,
        out: &mut Vec<RelayAction<P>>,
    ) {
        let have = self.have_of(origin);
        let behind = self.known.get(origin).is_some_and(|&k| k > have);
        let served = self
            .last_pull
            .get(origin)
            .is_some_and(|&(_, after)| have >= after + SERVE_BATCH as u64);
        if behind && served {
            self.last_pull.remove(origin);
            self.pull(from, origin, now, out);
        }
    }

    fn pull(&mut self, from: P, origin: &str, now: Duration, out: &mut Vec<RelayAction<P>>) {
        let due = self
            .last_pull
            .get(origin)
            .is_none_or(|&(at, _)| now >= at + PULL_RETRY);
        if due {
            self.last_pull
                .insert(origin.to_string(), (now, self.have_of(origin)));
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

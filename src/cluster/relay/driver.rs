//! The tokio driver of the relay: it owns the hub and membership handles, a
//! connection to the hub's store (the one message log) and the [`Relay`]
//! core, feeds the core events (local messages read from the log, packets,
//! member changes, outgoing direct messages, the tick) and carries out the
//! actions it returns. It makes no protocol decisions of its own. Topics set
//! here go to every live member as they are set, all of them to a member
//! that comes up (which is asked for its own, as are the members already up
//! when this task starts), and 32 at a time, in turn, after each quiet
//! presence snapshot; the hub keeps the later setting of each room
//! ([`Hub::apply_gossip_topic`]).

use std::net::SocketAddr;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::packet::{RelayPacket, TOPICS_PER_PACKET};
use super::presence::SharedPresence;
use super::presence_link::PresenceLink;
use super::transport::{live_peers, send};
use super::{Relay, RelayAction, RelayEvent, SERVE_BATCH, SUMMARY_INTERVAL};
use crate::chat::hub::{Hub, OutgoingDirect, TopicChange};
use crate::chat::protocol::RemoteMember;
use crate::chat::store::Store;
use crate::cluster::{MemberEvent, MemberState, Membership, NodeId, Payload, sleep_until};

/// Most local messages read from the log and sent in one turn of the loop;
/// packets and timers are handled between turns.
pub const PUSH_BATCH: usize = 64;

/// The relay task of `netkit serve`: relays messages posted on this node to
/// every live member (reading them from `log`, the hub's store, as the hub's
/// [`Hub::local_seq`] moves), applies the other nodes' messages to the hub,
/// and exchanges summaries so that histories converge. Runs until `shutdown`.
pub async fn run(
    hub: Hub,
    membership: Membership,
    log: Store,
    remote_users: SharedPresence,
    shutdown: CancellationToken,
) {
    let Some((mut driver, mut inputs)) = Driver::start(hub, membership, log, remote_users) else {
        return;
    };
    // Members already up when this task started came up before it listened
    // (no event, and their topics may have arrived before it read): ask them.
    for peer in live_peers(&driver.membership) {
        send(&driver.membership, peer, &RelayPacket::TopicsPlease).await;
    }
    loop {
        let behind = driver.pushed < *inputs.local.borrow();
        let go_on = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            got = inputs.payloads.recv() => driver.on_payload(got).await,
            () = std::future::ready(()), if behind => {
                driver.push_local().await;
                true
            }
            Ok(()) = inputs.local.changed() => true,
            got = inputs.member_events.recv() => driver.on_member_event(got).await,
            Ok(()) = driver.presence.changes.changed() => {
                driver.presence.schedule();
                true
            }
            _ = sleep_until(driver.presence.due) => {
                driver.presence.send_if_changed(&driver.hub, &driver.membership).await;
                true
            }
            _ = sleep_until(driver.presence.resend_due) => {
                driver.presence.resend_due = None;
                driver.presence.send_all(&driver.membership).await;
                true
            }
            Some(d) = recv_some(&mut inputs.directs) => {
                driver.on_outgoing_direct(d).await;
                true
            }
            Some(t) = recv_some(&mut inputs.topics) => {
                let packet = RelayPacket::Topics(vec![t]);
                for peer in live_peers(&driver.membership) {
                    send(&driver.membership, peer, &packet).await;
                }
                true
            }
            _ = inputs.tick.tick() => {
                driver.on_tick().await;
                true
            }
        };
        if !go_on {
            break;
        }
    }
    tracing::debug!("relay: stopped");
}

/// What the relay task waits on besides shutdown and presence timers.
struct Inputs {
    /// [`Hub::local_seq`]: how far this node's log goes.
    local: watch::Receiver<u64>,
    payloads: broadcast::Receiver<Payload>,
    member_events: broadcast::Receiver<MemberEvent>,
    directs: Option<mpsc::Receiver<OutgoingDirect>>,
    /// Topics set here (none if the hub's were taken already).
    topics: Option<mpsc::Receiver<TopicChange>>,
    tick: Interval,
}

/// The relay task's state: the core and what its actions act on.
struct Driver {
    hub: Hub,
    membership: Membership,
    /// The hub's store, read for local messages to send and for `Serve`.
    log: Store,
    /// This node's origin.
    me: String,
    /// The newest sequence of this node's log sent to the members (at
    /// start, what the log held: the rest goes by anti-entropy).
    pushed: u64,
    relay: Relay,
    presence: PresenceLink,
    /// The core's clock starts here.
    started: Instant,
    /// Where the next quiet turn's packet of topics starts in the room list.
    topics_turn: usize,
}

impl Driver {
    /// Takes this node's origin and what its log holds, and subscribes to
    /// everything the relay follows; `None` (logged) if the store fails.
    fn start(
        hub: Hub,
        membership: Membership,
        log: Store,
        remote_users: SharedPresence,
    ) -> Option<(Driver, Inputs)> {
        let name = membership.view().me.name;
        // Subscribed before the log is read: nothing committed in between is missed.
        let local = hub.local_seq();
        let (me, have) = match log.origin(&name).and_then(|me| Ok((me, log.log_heads()?))) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!("relay: not relaying: {e}");
                return None;
            }
        };
        // Normally set by `serve` before any client connects.
        if !hub.set_origin(me.clone()) {
            tracing::warn!(node = %me, hub = ?hub.origin(), "relay: the hub has another origin");
        }
        tracing::info!(node = %me, origins = have.len(), "relay: running");
        let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inputs = Inputs {
            local,
            payloads: membership.payloads(),
            member_events: membership.events(),
            directs: hub.take_outgoing_directs(),
            topics: hub.take_outgoing_topics(),
            tick,
        };
        let driver = Driver {
            presence: PresenceLink::new(&hub, remote_users),
            pushed: have.get(&me).copied().unwrap_or(0),
            relay: Relay::new(me.clone(), have),
            me,
            hub,
            membership,
            log,
            started: Instant::now(),
            topics_turn: 0,
        };
        Some((driver, inputs))
    }

    /// Feeds one event to the core and carries out its actions; `from` is
    /// the member the event came from, if any.
    async fn feed(&mut self, event: RelayEvent<SocketAddr>, from: Option<&NodeId>) {
        let actions = self.relay.handle(event, self.started.elapsed());
        self.carry_out(actions, from).await;
    }

    /// Messages posted here since the last turn: the next [`PUSH_BATCH`]
    /// after [`Driver::pushed`], read from the log and sent to every live member.
    async fn push_local(&mut self) {
        let batch = match self.log.log_after(&self.me, self.pushed, PUSH_BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                // Anti-entropy serves them from the log once it reads again.
                tracing::error!("relay: cannot read messages posted here: {e}");
                Vec::new()
            }
        };
        let Some(last) = batch.last().map(|m| m.seq) else {
            // Not readable now: announced, so the members pull them later.
            self.pushed = *self.hub.local_seq().borrow();
            self.relay.announce_local(self.pushed);
            return;
        };
        for m in batch {
            self.feed(RelayEvent::Local(m), None).await;
        }
        self.pushed = last;
    }

    /// A datagram from a member. Returns whether to go on.
    async fn on_payload(&mut self, got: Result<Payload, RecvError>) -> bool {
        match got {
            Ok(p) => match RelayPacket::decode(&p.data) {
                Some(packet) => {
                    let event = RelayEvent::Packet {
                        from: p.from.addr,
                        generation: p.from.bump,
                        packet,
                    };
                    self.feed(event, Some(&p.from)).await;
                }
                None => tracing::debug!(from = ?p.from, "relay: malformed packet dropped"),
            },
            // Summaries recover whatever was dropped.
            Err(RecvError::Lagged(n)) => tracing::debug!("relay: {n} packets dropped (lagging)"),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    /// A member came, went or came back: catch up quickly. Returns whether to go on.
    async fn on_member_event(&mut self, got: Result<MemberEvent, RecvError>) -> bool {
        match got {
            Ok(ev) => {
                if ev.state == MemberState::Alive {
                    send_topics(&self.hub, &self.membership, ev.id.addr).await;
                    send(&self.membership, ev.id.addr, &RelayPacket::TopicsPlease).await;
                }
                let event = match ev.state {
                    MemberState::Alive => Some(RelayEvent::MemberUp { peer: ev.id.addr }),
                    // Nothing to catch up on while a member is only suspected.
                    MemberState::Suspect => None,
                    MemberState::Down | MemberState::Left => Some(RelayEvent::MembersChanged),
                };
                if let Some(event) = event {
                    self.feed(event, None).await;
                }
                let (hub, membership) = (&self.hub, &self.membership);
                self.presence.member_event(hub, membership, &ev).await;
            }
            Err(RecvError::Lagged(_)) => {
                self.feed(RelayEvent::MembersChanged, None).await;
                self.presence.check_view(&self.hub, &self.membership);
                self.presence.resend_due = Some(Instant::now());
            }
            Err(RecvError::Closed) => return false,
        }
        true
    }

    /// A user here sends a direct message to a user of another node.
    async fn on_outgoing_direct(&mut self, d: OutgoingDirect) {
        let Some(peer) = self.presence.peer_named(&d.to.node) else {
            tracing::debug!(node = %d.to.node, "relay: direct message for a node no longer known; dropped");
            return;
        };
        let event = RelayEvent::Direct {
            peer,
            from: d.from,
            to: d.to.nick,
            text: d.text,
            ts: d.ts,
        };
        self.feed(event, None).await;
    }

    /// The tick: resends, summaries, and the member view checked against
    /// the presence held (member events cover this; the view is the fallback).
    async fn on_tick(&mut self) {
        self.presence.check_view(&self.hub, &self.membership);
        let peers = live_peers(&self.membership);
        let peer = (!peers.is_empty()).then(|| peers[rand::random_range(0..peers.len())]);
        self.feed(RelayEvent::Tick { peer }, None).await;
    }

    /// Carries out the core's actions in order.
    async fn carry_out(&mut self, actions: Vec<RelayAction<SocketAddr>>, from: Option<&NodeId>) {
        for action in actions {
            self.carry_out_one(action, from).await;
        }
    }

    /// One action; `from` is the member the event came from, if any.
    async fn carry_out_one(&mut self, action: RelayAction<SocketAddr>, from: Option<&NodeId>) {
        let membership = &self.membership;
        match action {
            RelayAction::Apply(m) => {
                let (origin, seq) = (m.origin.clone(), m.seq);
                if let Err(e) = self.hub.apply_remote(m).await {
                    tracing::warn!(%origin, seq, "relay: hub refused a message: {e}");
                }
            }
            RelayAction::Send(to, p) => send(membership, to, &p).await,
            RelayAction::Serve { to, origin, after } => {
                match self.log.log_after(&origin, after, SERVE_BATCH) {
                    Ok(msgs) => {
                        for m in msgs {
                            send(membership, to, &RelayPacket::Msg(m)).await;
                        }
                    }
                    Err(e) => tracing::error!("relay: {e}"),
                }
            }
            RelayAction::Broadcast(p) => {
                for peer in live_peers(membership) {
                    send(membership, peer, &p).await;
                }
            }
            RelayAction::ShowDirect {
                from: nick,
                to,
                text,
                ts,
                ..
            } => {
                let node = from.map(|f| f.name.clone()).unwrap_or_default();
                let ok = text.len() <= self.hub.config().max_text
                    && self
                        .hub
                        .deliver_remote_direct(RemoteMember { nick, node }, &to, text, ts);
                if !ok {
                    tracing::debug!(from = ?from, "relay: direct message for nobody here, or malformed; dropped");
                }
            }
            RelayAction::Presence(_, snap) => {
                if let Some(from) = from {
                    self.presence.receive(&self.hub, membership, from, snap);
                }
            }
            RelayAction::LegacyUsers(_, nicks) => {
                if let Some(from) = from {
                    self.presence.legacy_users(from, nicks);
                }
            }
            RelayAction::SendPresence(peer) => {
                self.presence.send_to(membership, peer).await;
                // One packet of topics per quiet turn, taking the rooms in
                // turn: the safety net costs one datagram however many
                // rooms have a topic.
                let topics = self.hub.topics();
                if !topics.is_empty() {
                    let (window, next) = topics_window(topics.len(), self.topics_turn);
                    self.topics_turn = next;
                    let packet = RelayPacket::Topics(topics[window].to_vec());
                    send(membership, peer, &packet).await;
                }
            }
            RelayAction::ApplyTopics(peer, topics) => {
                for t in topics {
                    let room = t.room.clone();
                    if let Err(e) = self.hub.apply_gossip_topic(t).await {
                        tracing::warn!(%peer, %room, "relay: topic change refused: {e}");
                    }
                }
            }
            RelayAction::SendTopics(peer) => send_topics(&self.hub, membership, peer).await,
            RelayAction::DirectsGivenUp(given_up) => {
                tracing::warn!(
                    given_up,
                    "relay: direct messages never acknowledged; dropped"
                );
            }
        }
    }
}

/// Which of `len` (> 0) topics, sorted by room, the quiet turn starting at
/// `turn` sends (at most [`TOPICS_PER_PACKET`]), and where the next turn
/// starts: the rooms in turn, from the first again after the last.
fn topics_window(len: usize, turn: usize) -> (std::ops::Range<usize>, usize) {
    let at = turn % len;
    let end = (at + TOPICS_PER_PACKET).min(len);
    (at..end, if end == len { 0 } else { end })
}

/// Sends every room topic `hub` holds to `peer` (a member that came up), if
/// it holds any.
async fn send_topics(hub: &Hub, membership: &Membership, peer: SocketAddr) {
    for chunk in hub.topics().chunks(TOPICS_PER_PACKET) {
        send(membership, peer, &RelayPacket::Topics(chunk.to_vec())).await;
    }
}

async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::{TOPICS_PER_PACKET, topics_window};

    #[test]
    fn quiet_turns_send_the_topics_in_turn() {
        let n = TOPICS_PER_PACKET;
        // Two and a half packets' worth: three turns, then the first again.
        let len = 2 * n + n / 2;
        assert_eq!(topics_window(len, 0), (0..n, n));
        assert_eq!(topics_window(len, n), (n..2 * n, 2 * n));
        assert_eq!(topics_window(len, 2 * n), (2 * n..len, 0));
        // Fewer than one packet: all of them every turn.
        assert_eq!(topics_window(3, 0), (0..3, 0));
        // Rooms gone since the last turn: the turn wraps into the shorter list.
        assert_eq!(topics_window(n + 1, 2 * n), (n - 1..n + 1, 0));
    }
}

//! The tokio driver of the relay: it owns the store, the hub and membership
//! handles and the [`Relay`] core, feeds the core events (local messages,
//! packets, member changes, outgoing direct messages, the tick) and carries
//! out the actions it returns. It makes no protocol decisions of its own.

use std::net::SocketAddr;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::packet::{RelayPacket, RelayedMessage};
use super::presence::SharedPresence;
use super::presence_link::PresenceLink;
use super::store::{RelayStore, StoreError};
use super::transport::{live_peers, send};
use super::{LocalMessage, Relay, RelayAction, RelayEvent, SERVE_BATCH, SUMMARY_INTERVAL};
use crate::chat::hub::{Hub, HubError, OutgoingDirect};
use crate::chat::protocol::{ChatMessage, RemoteMember};
use crate::cluster::{MemberEvent, Membership, NodeId, Payload, sleep_until};

/// Why the relay cannot start (or reconcile) on this node.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub refused a message, or is shutting down.
    #[error("{0}")]
    Hub(#[from] HubError),
    /// The hub's history could not be read.
    #[error("{0}")]
    History(String),
}

/// The relay task of `netkit serve`: relays messages posted on this node to
/// every live member, applies the other nodes' messages to the hub, and
/// exchanges summaries so that histories converge. Runs until `shutdown`.
pub async fn run(
    hub: Hub,
    membership: Membership,
    store: RelayStore,
    remote_users: SharedPresence,
    shutdown: CancellationToken,
) {
    let Some((mut driver, mut inputs)) = Driver::start(hub, membership, store, remote_users).await
    else {
        return;
    };
    loop {
        let go_on = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            got = inputs.local.recv() => driver.on_local(got).await,
            got = inputs.payloads.recv() => driver.on_payload(got).await,
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
            Some(d) = recv_direct(&mut inputs.directs) => {
                driver.on_outgoing_direct(d).await;
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
    local: broadcast::Receiver<ChatMessage>,
    payloads: broadcast::Receiver<Payload>,
    member_events: broadcast::Receiver<MemberEvent>,
    directs: Option<mpsc::Receiver<OutgoingDirect>>,
    tick: Interval,
}

/// The relay task's state: the core and what its actions act on.
struct Driver {
    hub: Hub,
    membership: Membership,
    store: RelayStore,
    relay: Relay,
    presence: PresenceLink,
    /// The core's clock starts here.
    started: Instant,
}

impl Driver {
    /// Takes this node's origin, settles what a crash left unconfirmed and
    /// subscribes to everything the relay follows; `None` (logged) if the
    /// store fails.
    async fn start(
        hub: Hub,
        membership: Membership,
        mut store: RelayStore,
        remote_users: SharedPresence,
    ) -> Option<(Driver, Inputs)> {
        let name = membership.view().me.name;
        let (me, have) = match store.origin(&name).and_then(|me| Ok((me, store.have()?))) {
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
        if let Err(e) = reconcile(&hub, &mut store).await {
            tracing::error!("relay: not relaying: {e}");
            return None;
        }
        tracing::info!(node = %me, origins = have.len(), "relay: running");
        let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inputs = Inputs {
            local: hub.stored_local(),
            payloads: membership.payloads(),
            member_events: membership.events(),
            directs: hub.take_outgoing_directs(),
            tick,
        };
        let driver = Driver {
            presence: PresenceLink::new(&hub, remote_users),
            relay: Relay::new(me, have),
            hub,
            membership,
            store,
            started: Instant::now(),
        };
        Some((driver, inputs))
    }

    /// Feeds one event to the core and carries out its actions; `from` is
    /// the member the event came from, if any.
    async fn feed(&mut self, event: RelayEvent<SocketAddr>, from: Option<&NodeId>) {
        let actions = self.relay.handle(event, self.started.elapsed());
        self.carry_out(actions, from).await;
    }

    /// A message posted here. Returns whether to go on.
    async fn on_local(&mut self, got: Result<ChatMessage, RecvError>) -> bool {
        match got {
            Ok(m) => {
                let m = LocalMessage {
                    room: m.room,
                    from: m.from,
                    text: m.text,
                    kind: m.kind,
                    ts: m.ts,
                    id: m.id,
                };
                self.feed(RelayEvent::Local(m), None).await;
            }
            Err(RecvError::Lagged(n)) => {
                tracing::error!("relay: fell behind; {n} messages posted here were not relayed");
            }
            Err(RecvError::Closed) => return false,
        }
        true
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
                self.feed(RelayEvent::MembersChanged, None).await;
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

    /// Carries out the core's actions in order. The relay's record of
    /// messages to apply comes first (not done), then the hub's commit, then
    /// the mark: a crash anywhere in between is settled by [`reconcile`].
    async fn carry_out(&mut self, actions: Vec<RelayAction<SocketAddr>>, from: Option<&NodeId>) {
        let to_apply: Vec<RelayedMessage> = actions
            .iter()
            .filter_map(|a| match a {
                RelayAction::Apply(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        if !to_apply.is_empty()
            && let Err(e) = self.store.insert(&to_apply, false)
        {
            tracing::error!("relay: {e}");
        }
        for action in actions {
            self.carry_out_one(action, from).await;
        }
        if to_apply.is_empty() {
            return;
        }
        if self.hub.sync_writes().await.is_err() {
            return; // shutting down: reconciled at the next start
        }
        if let Err(e) = self.store.mark_done(&to_apply) {
            tracing::error!("relay: {e}");
        }
    }

    /// One action; `from` is the member the event came from, if any.
    async fn carry_out_one(&mut self, action: RelayAction<SocketAddr>, from: Option<&NodeId>) {
        let membership = &self.membership;
        match action {
            RelayAction::Apply(m) => {
                if let Err(e) = apply(&self.hub, &m).await {
                    tracing::warn!(origin = %m.origin, seq = m.seq, "relay: hub refused a message: {e}");
                }
            }
            RelayAction::Send(to, p) => send(membership, to, &p).await,
            RelayAction::Serve { to, origin, after } => {
                match self.store.after(&origin, after, SERVE_BATCH) {
                    Ok(msgs) => {
                        for m in msgs {
                            send(membership, to, &RelayPacket::Msg(m)).await;
                        }
                    }
                    Err(e) => tracing::error!("relay: {e}"),
                }
            }
            RelayAction::Store(m) => {
                if let Err(e) = self.store.insert(std::slice::from_ref(&m), true) {
                    tracing::error!("relay: {e}");
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
            RelayAction::SendPresence(peer) => self.presence.send_to(membership, peer).await,
            RelayAction::DirectsGivenUp(given_up) => {
                tracing::warn!(
                    given_up,
                    "relay: direct messages never acknowledged; dropped"
                );
            }
        }
    }
}

async fn recv_direct(rx: &mut Option<mpsc::Receiver<OutgoingDirect>>) -> Option<OutgoingDirect> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands a relayed message to the hub, with its origin.
async fn apply(hub: &Hub, m: &RelayedMessage) -> Result<(), HubError> {
    hub.apply_remote(
        m.room.clone(),
        m.from.clone(),
        m.text.clone(),
        m.kind,
        m.ts,
        Some((m.origin.clone(), m.origin_id)),
    )
    .await
}

/// After a crash: a message stored by the relay but not marked done may or
/// may not have reached the hub's history. It is applied again only if the
/// room's recent history has no message with the same author, text and time.
async fn reconcile(hub: &Hub, store: &mut RelayStore) -> Result<(), RelayError> {
    let pending = store.not_done()?;
    if pending.is_empty() {
        return Ok(());
    }
    for m in &pending {
        let (h, room) = (hub.clone(), m.room.clone());
        let recent = tokio::task::spawn_blocking(move || h.history(&room, None, None, 500))
            .await
            .map_err(|e| RelayError::History(e.to_string()))?
            .map_err(|e| RelayError::History(e.to_string()))?;
        let present = recent.iter().any(|r| {
            if m.origin_id > 0 && r.origin.is_some() {
                r.origin.as_deref() == Some(m.origin.as_str()) && r.origin_id == m.origin_id
            } else {
                r.from == m.from && r.text == m.text && r.ts == m.ts && r.kind == m.kind
            }
        });
        if !present {
            apply(hub, m).await?;
        }
    }
    hub.sync_writes().await?;
    store.mark_done(&pending)?;
    tracing::info!(
        messages = pending.len(),
        "relay: reconciled messages a crash left unconfirmed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::protocol::MessageKind;

    /// A crash between the relay's record and the hub's commit: at start the
    /// message is applied if the hub lacks it, and not again if it has it.
    #[tokio::test]
    async fn reconcile_applies_only_what_the_hub_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, _writer) =
            crate::chat::hub::Hub::open(dir.path(), crate::chat::hub::HubConfig::default())
                .unwrap();
        let mut store = RelayStore::open_in(dir.path()).unwrap();
        let msg = |seq, text: &str| RelayedMessage {
            origin: "b/1".into(),
            seq,
            room: "lobby".into(),
            from: "bob".into(),
            text: text.into(),
            kind: MessageKind::Say,
            ts: 1000 + seq as i64,
            origin_id: seq,
        };
        let (in_hub, lost) = (msg(1, "made it"), msg(2, "lost"));
        hub.apply_remote(
            "lobby".into(),
            "bob".into(),
            "made it".into(),
            MessageKind::Say,
            1001,
            None,
        )
        .await
        .unwrap();
        hub.sync_writes().await.unwrap();
        store.insert(&[in_hub, lost], false).unwrap();
        assert_eq!(store.not_done().unwrap().len(), 2);
        assert_eq!(store.have().unwrap()["b/1"], 2);
        reconcile(&hub, &mut store).await.unwrap();
        assert!(store.not_done().unwrap().is_empty());
        let texts: Vec<String> = hub
            .history("lobby", None, None, 50)
            .unwrap()
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, vec!["made it", "lost"]);
        // The origin tag is made once per store.
        let origin = store.origin("n").unwrap();
        assert!(origin.starts_with("n/"));
        assert_eq!(store.origin("n").unwrap(), origin);
        hub.shutdown();
    }
}

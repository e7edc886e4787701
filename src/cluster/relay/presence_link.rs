//! The relay driver's side of cluster presence: this node's snapshot and when
//! to send it, and the [`PresenceTable`](super::presence::PresenceTable) of
//! the others, kept in step with the member view and fed to the hub.

use std::time::Duration;

use tokio::time::Instant;

use super::packet::RelayPacket;
use super::parts::MAX_DATAGRAM;
use super::presence::{self, Rejected, SharedPresence, Snapshot};
use super::transport::{live_peers, send};
use crate::chat::hub::{Hub, RemotePresence};
use crate::cluster::{MemberEvent, MemberState, Membership, NodeId};

/// Least time between two presence snapshots sent by this node (a burst of
/// joins makes one snapshot).
pub const PRESENCE_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// After a presence change, the snapshot is sent again this much later, in
/// case the first datagram was lost.
pub const PRESENCE_RESEND: Duration = Duration::from_secs(1);

/// This node's snapshot, when to send it, and the shared table of the others.
pub(super) struct PresenceLink {
    table: SharedPresence,
    /// This node's current snapshot.
    pub(super) mine: Snapshot,
    pub(super) changes: tokio::sync::watch::Receiver<u64>,
    /// When to build and send a new snapshot.
    pub(super) due: Option<Instant>,
    /// When to send the current one again.
    pub(super) resend_due: Option<Instant>,
    last_sent: Option<Instant>,
}

impl PresenceLink {
    pub(super) fn new(hub: &Hub, table: SharedPresence) -> Self {
        let mut changes = hub.presence_changes();
        changes.mark_changed();
        PresenceLink {
            table,
            mine: Snapshot {
                version: 0,
                users: Vec::new(),
            },
            changes,
            due: None,
            resend_due: None,
            last_sent: None,
        }
    }

    /// The hub's presence changed: build a snapshot soon, at most one per
    /// [`PRESENCE_MIN_INTERVAL`].
    pub(super) fn schedule(&mut self) {
        if self.due.is_none() {
            let now = Instant::now();
            let earliest = self
                .last_sent
                .map_or(now, |at| (at + PRESENCE_MIN_INTERVAL).max(now));
            self.due = Some(earliest);
        }
    }

    /// The peer key of the node named `name`, if its presence is held.
    pub(super) fn peer_named(&self, name: &str) -> Option<std::net::SocketAddr> {
        presence::lock(&self.table).peer_named(name)
    }

    /// Builds this node's snapshot and sends it to every live member if it
    /// differs from the last one.
    pub(super) async fn send_if_changed(&mut self, hub: &Hub, membership: &Membership) {
        self.due = None;
        let next = Snapshot::of(self.mine.version + 1, hub.local_presence());
        if next.same_users(&self.mine) {
            return;
        }
        self.mine = next;
        let size = RelayPacket::Presence(self.mine.clone()).encode().len();
        if size > usize::from(super::parts::MAX_PARTS) * (MAX_DATAGRAM - 32) {
            tracing::warn!(
                bytes = size,
                users = self.mine.users.len(),
                "relay: presence snapshot too large for other nodes to accept; they will not see this node's users"
            );
        }
        let now = Instant::now();
        self.last_sent = Some(now);
        self.resend_due = Some(now + PRESENCE_RESEND);
        self.send_all(membership).await;
    }

    /// Sends the current snapshot to every live member.
    pub(super) async fn send_all(&self, membership: &Membership) {
        let packet = RelayPacket::Presence(self.mine.clone());
        for peer in live_peers(membership) {
            send(membership, peer, &packet).await;
        }
    }

    /// Sends the current snapshot to one member.
    pub(super) async fn send_to(&self, membership: &Membership, peer: std::net::SocketAddr) {
        send(membership, peer, &RelayPacket::Presence(self.mine.clone())).await;
    }

    /// A snapshot from a member: applied if the sender is still a live
    /// member in this generation and the snapshot is newer and well-formed.
    pub(super) fn receive(
        &mut self,
        hub: &Hub,
        membership: &Membership,
        from: &NodeId,
        snap: Snapshot,
    ) {
        let live = membership
            .view()
            .members
            .iter()
            .any(|m| m.id == *from && m.state.is_active());
        if !live {
            tracing::debug!(from = ?from, "relay: presence from a node not live; ignored");
            return;
        }
        let applied = presence::lock(&self.table).apply(from.addr, &from.name, from.bump, snap);
        match applied {
            Ok(changes) => self.apply(hub, changes),
            Err(Rejected::Stale) => {}
            Err(e) => tracing::warn!(from = ?from, "relay: {e}; ignored"),
        }
    }

    /// The nicknames of a node that predates presence snapshots.
    pub(super) fn legacy_users(&self, from: &NodeId, nicks: Vec<String>) {
        presence::lock(&self.table).set_legacy_nicks(from.addr, nicks);
    }

    /// A member event: a node down or gone ends its presence, a new life
    /// ends the previous one, and a member new or back is told who is here.
    pub(super) async fn member_event(
        &mut self,
        hub: &Hub,
        membership: &Membership,
        ev: &MemberEvent,
    ) {
        let addr = ev.id.addr;
        match ev.state {
            MemberState::Down | MemberState::Left => {
                let reason = if ev.state == MemberState::Down {
                    "node down"
                } else {
                    "node left"
                };
                let changes = presence::lock(&self.table).end_generation(&addr, ev.id.bump, reason);
                self.apply(hub, changes);
            }
            MemberState::Alive | MemberState::Suspect => {
                // A new life at the address ends the previous one.
                let held = presence::lock(&self.table).version_of(&addr);
                if let Some((generation, _)) = held
                    && generation < ev.id.bump
                {
                    let changes = presence::lock(&self.table).end_generation(
                        &addr,
                        generation,
                        "node restarted",
                    );
                    self.apply(hub, changes);
                }
                // A member new to this node, or back: tell it who is here.
                if ev.previous.is_none_or(|p| !p.is_active()) {
                    self.send_to(membership, addr).await;
                }
            }
        }
    }

    /// Drops the presence of every node the member view no longer holds
    /// live in the same generation (missed or lagged member events).
    pub(super) fn check_view(&mut self, hub: &Hub, membership: &Membership) {
        let view = membership.view();
        let held = presence::lock(&self.table).held();
        for (addr, generation) in held {
            let current = view.members.iter().find(|m| m.id.addr == addr);
            let ok = current.is_some_and(|m| m.id.bump == generation && m.state.is_active());
            if !ok {
                let reason = match current.map(|m| m.state) {
                    Some(MemberState::Left) => "node left",
                    Some(s) if s.is_active() => "node restarted",
                    _ => "node down",
                };
                let changes = presence::lock(&self.table).end_generation(&addr, generation, reason);
                self.apply(hub, changes);
            }
        }
    }

    /// Hands presence changes, and every remote user now known, to the hub.
    fn apply(&self, hub: &Hub, changes: Vec<RemotePresence>) {
        let users = presence::lock(&self.table).users();
        hub.apply_remote_presence(changes, users);
    }
}

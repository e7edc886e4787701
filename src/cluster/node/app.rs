//! The node's own messages beside SWIM, one handler per kind: push-pull
//! state exchange, metadata, the nudge a suspected member gets, a graceful
//! leave, and application payloads passed out to the caller.

use std::net::SocketAddr;

use foca::State;
use tracing::debug;

use super::{Node, Payload, Timer, postcard_len};
use crate::cluster::id::{NodeId, NodeMeta};
use crate::cluster::wire::{self, AppFrame, AppMsg};

impl Node {
    /// An application frame from a member: a handler per message kind.
    pub(super) fn handle_app(&mut self, frame: AppFrame) {
        let AppFrame { from, msg } = frame;
        if self.leaving || from.addr == self.id().addr {
            return;
        }
        match msg {
            AppMsg::PushPull { reply, members } => self.on_push_pull(from, reply, members),
            AppMsg::Meta { meta, want_reply } => self.on_meta(from, meta, want_reply),
            AppMsg::Suspected { incarnation } => self.on_suspected(from, incarnation),
            AppMsg::Leave => self.on_leave(from),
            AppMsg::Payload(data) => {
                if self.is_active_member(&from) {
                    self.io.out.payloads.push(Payload { from, data });
                } else {
                    debug!(from = ?from, "cluster: payload from a non-member; dropped");
                }
            }
        }
    }

    /// A part of a member's full state; answered with ours if it asks.
    fn on_push_pull(&mut self, from: NodeId, reply: bool, members: Vec<foca::Member<NodeId>>) {
        // A member known to be down talks from stale knowledge.
        if let Some(m) = self.view.get(&from.addr)
            && m.id == from
            && !m.state.is_active()
        {
            debug!(from = ?from, "cluster: push-pull from a member known down; ignored");
            return;
        }
        let first_part = members.first().is_some_and(|m| m.id() == &from);
        if let Err(e) = self
            .foca
            .apply_many(members.into_iter(), true, &mut self.io)
        {
            debug!(from = ?from, "cluster: push-pull state: {e}");
        }
        self.after_foca();
        if !reply && first_part {
            self.send_state(from.addr, true);
        }
    }

    /// A member's metadata.
    fn on_meta(&mut self, from: NodeId, meta: NodeMeta, want_reply: bool) {
        // It may arrive before foca has told us about the sender; keep
        // it for when it does, unless the sender is known to be gone.
        if self
            .view
            .get(&from.addr)
            .is_some_and(|m| m.id == from && !m.state.is_active())
        {
            return;
        }
        if self.metas.len() > 2 * self.view.len() + 64 {
            let view = &self.view;
            self.metas
                .retain(|id, _| view.get(&id.addr).is_some_and(|m| &m.id == id));
        }
        self.metas.insert(from.clone(), meta.clone());
        if let Some(m) = self.view.get_mut(&from.addr)
            && m.meta.as_ref() != Some(&meta)
        {
            m.meta = Some(meta);
            self.version += 1;
        }
        if want_reply {
            self.send_meta(from, false);
        }
    }

    /// A member suspects this node: refute it straight to the suspecter.
    fn on_suspected(&mut self, from: NodeId, incarnation: u16) {
        if !self.is_active_member(&from) {
            return;
        }
        let me = self.id().clone();
        let suspicion = foca::Member::new(me, incarnation, State::Suspect);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(suspicion), true, &mut self.io)
        {
            debug!("cluster: applying a suspicion of this node: {e}");
        }
        // Any foca message carries the sender's incarnation; an
        // announce takes the refutation straight to the suspecter.
        if let Err(e) = self.foca.announce(from, &mut self.io) {
            debug!("cluster: refuting: {e}");
        }
        self.after_foca();
    }

    /// A member leaves on purpose.
    fn on_leave(&mut self, from: NodeId) {
        // Foca's own gossip of the departure may have come first:
        // a member already down by that identity is relabelled "left".
        if !self.view.get(&from.addr).is_some_and(|m| m.id == from) {
            return;
        }
        self.left.insert(from.clone());
        // Force a full look: the member may already be down in foca.
        self.snapshot.clear();
        let down = foca::Member::new(from, 0, State::Down);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(down), true, &mut self.io)
        {
            debug!("cluster: applying a leave: {e}");
        }
        self.after_foca();
    }

    /// Tells a member this node suspects so, directly; a live one refutes
    /// right away. Repeated a few times while the suspicion lasts, since the
    /// path to it is evidently lossy.
    pub(super) fn nudge(&mut self, id: NodeId, incarnation: u16, remaining: u8) {
        let frame = AppFrame {
            from: self.id().clone(),
            msg: AppMsg::Suspected { incarnation },
        };
        self.io.send_app(id.addr, &frame);
        if remaining > 0 {
            let every = self.tuning.suspect_timeout / 6;
            let next = Timer::Nudge {
                id,
                incarnation,
                remaining: remaining - 1,
            };
            self.io.out.timers.push((every, next));
        }
    }

    pub(super) fn send_meta(&mut self, to: NodeId, want_reply: bool) {
        let frame = AppFrame {
            from: self.id().clone(),
            msg: AppMsg::Meta {
                meta: self.meta.clone(),
                want_reply,
            },
        };
        self.io.send_app(to.addr, &frame);
        self.meta_sent.insert(to);
    }

    /// Sends this node's full membership state to `to`, in as many datagrams
    /// as it takes; the first member of the first part is this node itself.
    pub(super) fn send_state(&mut self, to: SocketAddr, reply: bool) {
        let me = self.id().clone();
        let budget = self.tuning.max_packet - wire::SEAL_OVERHEAD - 1 - postcard_len(&me) - 16;
        let mut parts: Vec<Vec<foca::Member<NodeId>>> = vec![Vec::new()];
        let mut used = 0;
        let all = std::iter::once(foca::Member::alive(me.clone()))
            .chain(self.foca.iter_membership_state().cloned());
        for m in all {
            let len = postcard_len(&m);
            if used + len > budget && !parts.last().expect("non-empty").is_empty() {
                parts.push(Vec::new());
                used = 0;
            }
            used += len;
            parts.last_mut().expect("non-empty").push(m);
        }
        for members in parts {
            let frame = AppFrame {
                from: me.clone(),
                msg: AppMsg::PushPull { reply, members },
            };
            self.io.send_app(to, &frame);
        }
    }
}

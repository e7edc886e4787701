//! Delivery: each client's bounded outbox, the lagging rule (a client whose
//! queue is full is disconnected, never silently skipped), kicks, and the
//! leave announced when a client goes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{ClientId, DisconnectReason, Event, Hub, Shared, State};
use crate::chat::names::name_key;
use crate::chat::protocol::{PresenceEvent, ServerMsg};

/// How the hub disconnects a client: the reason, then the token its tasks watch.
pub(super) struct Kick {
    pub(super) token: CancellationToken,
    pub(super) reason: OnceLock<DisconnectReason>,
}

impl Kick {
    /// True once the client is disconnected: the reason is set (under the
    /// state lock) just before the token is cancelled. An atomic load, where
    /// `token.is_cancelled()` takes the token's mutex, which the writer thread
    /// and the client's task would contend for on every delivery.
    pub(super) fn is_kicked(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// Backpressure on a client's own requests: its reader waits while the
/// client's queue is over half full (in messages or bytes), and the inbox
/// wakes it once the queue is back under half. So a client that sends faster
/// than it reads its replies is slowed down, never called lagging.
pub(super) struct Drained {
    /// Set by a waiting reader; the inbox checks it (one atomic load) per message.
    wanted: AtomicBool,
    notify: Notify,
    /// Half the queue's limits: the reader goes on when the queue is under both.
    messages: usize,
    bytes: usize,
}

impl Drained {
    /// True if a queue holding `messages` messages and `bytes` bytes leaves
    /// room for the replies to another request.
    pub(super) fn fits(&self, messages: usize, bytes: usize) -> bool {
        messages <= self.messages && bytes <= self.bytes
    }

    /// Called by the inbox after taking a message: wakes a waiting reader if
    /// the queue now fits.
    pub(super) fn taken(&self, messages: usize, bytes: usize) {
        if self.wanted.load(Ordering::Relaxed)
            && self.fits(messages, bytes)
            && self.wanted.swap(false, Ordering::AcqRel)
        {
            self.notify.notify_one();
        }
    }
}

/// The sending side of a client's queue, kept by the hub.
#[derive(Clone)]
pub(super) struct Outbox {
    tx: mpsc::Sender<Arc<Event>>,
    /// Bytes (of JSON) queued; shared with the client's inbox.
    pub(super) bytes: Arc<AtomicUsize>,
    pub(super) kick: Arc<Kick>,
    pub(super) drained: Arc<Drained>,
}

impl Outbox {
    /// A new outbox of at most `messages` messages and `bytes` bytes, and the
    /// receiver of its queue.
    pub(super) fn new(messages: usize, bytes: usize) -> (Outbox, mpsc::Receiver<Arc<Event>>) {
        let messages = messages.max(1);
        let (tx, rx) = mpsc::channel(messages);
        let kick = Arc::new(Kick {
            token: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        let drained = Arc::new(Drained {
            wanted: AtomicBool::new(false),
            notify: Notify::new(),
            messages: messages / 2,
            bytes: bytes / 2,
        });
        let outbox = Outbox {
            tx,
            bytes: Arc::new(AtomicUsize::new(0)),
            kick,
            drained,
        };
        (outbox, rx)
    }

    /// Waits until this queue has room for the replies to another request
    /// (see [`Drained`]), or the client is disconnected.
    pub(super) async fn room_for_replies(&self) {
        let d = &self.drained;
        loop {
            if self.fits() || self.kick.is_kicked() {
                return;
            }
            let woken = d.notify.notified();
            d.wanted.store(true, Ordering::Release);
            // Checked again after asking: the inbox may have drained meanwhile.
            if self.fits() || self.kick.is_kicked() {
                d.wanted.store(false, Ordering::Relaxed);
                return;
            }
            tokio::select! {
                () = woken => {}
                () = self.kick.token.cancelled() => return,
            }
        }
    }

    fn fits(&self) -> bool {
        let queued = self.tx.max_capacity() - self.tx.capacity();
        self.drained
            .fits(queued, self.bytes.load(Ordering::Relaxed))
    }
}

impl Hub {
    /// Disconnects every client with [`DisconnectReason::Shutdown`] and refuses new ones.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutting_down = true;
        for c in st.clients.values() {
            let _ = c.outbox.kick.reason.set(DisconnectReason::Shutdown);
            c.outbox.kick.token.cancel();
        }
    }

    pub(super) fn deliver_locked(&self, st: &mut State, to: ClientId, ev: &Arc<Event>) {
        self.shared.deliver_locked(st, &[to], ev);
    }
}

impl Shared {
    /// Puts `ev` in each recipient's queue; a recipient whose queue is full is
    /// disconnected as lagging (and its departure announced).
    pub(super) fn deliver_locked(&self, st: &mut State, to: &[ClientId], ev: &Arc<Event>) {
        let mut laggards = Vec::new();
        let len = ev.json().len();
        let cfg = &self.config;
        let mut delivered = 0u64;
        for id in to {
            let Some(c) = st.clients.get(id) else {
                continue;
            };
            let ob = &c.outbox;
            if ob.kick.is_kicked() {
                continue;
            }
            let queued = ob.bytes.fetch_add(len, Ordering::Relaxed) + len;
            if queued > cfg.queue_bytes {
                ob.bytes.fetch_sub(len, Ordering::Relaxed);
                laggards.push(*id);
                continue;
            }
            match ob.tx.try_send(ev.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    ob.bytes.fetch_sub(len, Ordering::Relaxed);
                    laggards.push(*id);
                }
                // Its writer has ended (write timeout, broken socket) and the
                // session is on its way out: not a lagging client.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    ob.bytes.fetch_sub(len, Ordering::Relaxed);
                }
            }
        }
        self.stats
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        for id in laggards {
            self.kick_locked(
                st,
                id,
                DisconnectReason::Lagging {
                    messages: cfg.queue_messages,
                    bytes: cfg.queue_bytes,
                },
            );
        }
    }

    fn kick_locked(&self, st: &mut State, id: ClientId, reason: DisconnectReason) {
        let Some(c) = st.clients.get(&id) else { return };
        if c.outbox.kick.token.is_cancelled() {
            return;
        }
        tracing::info!(nick = %c.nick, "chat: disconnecting client: {reason}");
        if matches!(reason, DisconnectReason::Lagging { .. }) {
            self.stats.dropped_lagging.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("netkit_chat_clients_dropped_total", "reason" => "lagging")
                .increment(1);
        }
        let _ = c.outbox.kick.reason.set(reason);
        c.outbox.kick.token.cancel();
        self.remove_locked(st, id);
    }

    /// Removes a client from every room and the nick table, announcing the leave.
    pub(super) fn remove_locked(&self, st: &mut State, id: ClientId) {
        let Some(c) = st.clients.remove(&id) else {
            return;
        };
        st.nicks.remove(&name_key(&c.nick));
        self.presence_changed();
        for room in &c.rooms {
            self.leave_locked(st, id, room, &c.nick);
        }
    }

    /// Takes client `id` (named `nick`) out of `room`, and tells the other
    /// members, unless the room is at or over the presence limit.
    pub(super) fn leave_locked(&self, st: &mut State, id: ClientId, room: &str, nick: &str) {
        if let Some(r) = st.rooms.get_mut(room) {
            r.members.remove(&id);
            r.floors.remove(&id);
        }
        self.left_locked(st, id, room);
        let members = local_members_below(st, room, self.config.presence_limit, 0);
        if members.is_empty() {
            return;
        }
        let ev = Event::new(ServerMsg::Presence {
            room: room.to_string(),
            nick: nick.to_string(),
            event: PresenceEvent::Leave,
            node: None,
            reason: None,
        });
        self.deliver_locked(st, &members, &ev);
    }
}

/// The local members of `room` who get presence events, given that the
/// room has `extra` more members than counted now: none above the presence limit.
pub(super) fn local_members_below(
    st: &State,
    room: &str,
    limit: usize,
    extra: usize,
) -> Vec<ClientId> {
    let Some(r) = st.rooms.get(room) else {
        return Vec::new();
    };
    let total = r.members.len() + st.remote.count(room);
    if total.saturating_sub(extra) >= limit {
        return Vec::new();
    }
    r.members.iter().copied().collect()
}

//! One client's side of the hub: its [`Session`] (the commands it sends,
//! rate-limited) and its [`Inbox`] (what it is sent, in order).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::deliver::{Drained, Kick, Outbox};
use super::remote::check_since;
use super::writer::{Post, WriteCmd};
use super::{ClientId, DisconnectReason, Event, Hub, HubError, member_nicks, truncate};
use crate::chat::auth::AuthMode;
use crate::chat::names::name_key;
use crate::chat::protocol::{ClientMsg, MessageKind, ServerMsg, now_ms, valid_nick, valid_room};

/// What one client does: every request of a connection goes through its session.
/// Dropping the session disconnects the client.
///
/// Requests take effect in the order they are handed in: those the writer
/// thread carries out (join, say, topic) are queued in order, and any other
/// request first waits for them ([`Session::settle`]), so a `who` or a
/// `part` right after a `join` sees the join.
pub struct Session {
    pub(super) hub: Hub,
    pub(super) id: ClientId,
    outbox: Outbox,
    tokens: f64,
    last_refill: Instant,
    /// The client's commands queued for the writer and not yet waited for.
    pending: Mutex<Pending>,
    /// Rate-limit refusals and how they were reported.
    refusals: Refusals,
    /// Who the client is and where from (see `login`).
    pub(super) ident: Identity,
    /// The duplicate-message guard (counts texts said in a room the client is in).
    repeats: Mutex<super::moderation::Repeats>,
}

/// What a session knows of its client's identity.
#[derive(Debug, Default)]
pub(super) struct Identity {
    /// The client's address (for the per-address login limit).
    pub(super) peer: Option<std::net::IpAddr>,
    /// Logged in (by password, session or application token).
    pub(super) logged_in: bool,
    /// The rooms an application token limits the client to.
    pub(super) rooms: Option<BTreeSet<String>>,
}

/// A client's rate-limit refusals: at most one `rate_limited` error a
/// second, the first at once, later ones with the count of refusals since
/// the last error; so a flood of refused requests cannot fill the client's
/// own queue.
#[derive(Default)]
struct Refusals {
    /// When the last `rate_limited` error was sent.
    reported: Option<Instant>,
    /// Refusals since then not yet told.
    unreported: u64,
}

impl Refusals {
    /// True if an error may be sent at `now`.
    fn may_report(&self, now: Instant) -> bool {
        self.reported
            .is_none_or(|at| now.duration_since(at) >= RATE_REPORT_EVERY)
    }
}

/// What a session has queued for the writer since it last waited for it.
#[derive(Default)]
struct Pending {
    /// Completes once the last of them has taken effect (the writer applies in order).
    applied: Option<oneshot::Receiver<()>>,
    /// Whether one is a join (which changes the current room).
    joining: bool,
}

/// How often a spell of refused requests is reported at most.
const RATE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What one client is sent, in order.
pub struct Inbox {
    rx: mpsc::Receiver<Arc<Event>>,
    bytes: Arc<AtomicUsize>,
    kick: Arc<Kick>,
    drained: Arc<Drained>,
    /// Wakes a waiting [`Inbox::recv`] when the client is disconnected. Made
    /// once: a new `cancelled()` per wait took the token's lock three times
    /// per message.
    kicked: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// The next thing an [`Inbox`] yields.
#[derive(Debug)]
pub enum Received {
    /// A message to send to the client.
    Event(Arc<Event>),
    /// The hub disconnected the client; tell it why and close.
    Disconnected(DisconnectReason),
    /// The session is gone.
    Closed,
}

impl Inbox {
    /// The inbox reading `rx`, the queue of `outbox`.
    pub(super) fn new(rx: mpsc::Receiver<Arc<Event>>, outbox: Outbox) -> Inbox {
        Inbox {
            rx,
            bytes: outbox.bytes,
            kicked: Box::pin(outbox.kick.token.clone().cancelled_owned()),
            kick: outbox.kick,
            drained: outbox.drained,
        }
    }

    /// Accounts for `ev` leaving the queue (and wakes a reader waiting for room).
    fn took(&self, ev: &Event) {
        let len = ev.json().len();
        let left = self.bytes.fetch_sub(len, Ordering::Relaxed) - len;
        self.drained.taken(self.rx.len(), left);
    }

    fn disconnected(&self) -> Received {
        Received::Disconnected(
            self.kick
                .reason
                .get()
                .cloned()
                .unwrap_or(DisconnectReason::Shutdown),
        )
    }

    /// Waits for the next message, or for the hub to disconnect the client
    /// (which comes first, even with messages still queued).
    pub async fn recv(&mut self) -> Received {
        std::future::poll_fn(|cx| {
            if self.kick.is_kicked() {
                return Poll::Ready(self.disconnected());
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(ev)) => {
                    self.took(&ev);
                    return Poll::Ready(Received::Event(ev));
                }
                Poll::Ready(None) => return Poll::Ready(Received::Closed),
                Poll::Pending => {}
            }
            match self.kicked.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(self.disconnected()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Bytes (of JSON) queued for this client.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The next queued message, if one is ready and the client is not disconnected.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        if self.kick.is_kicked() {
            return None;
        }
        let ev = self.rx.try_recv().ok()?;
        self.took(&ev);
        Some(ev)
    }
}

impl Session {
    /// The session of the newly registered client `id`, with a full burst of tokens.
    pub(super) fn new(hub: Hub, id: ClientId, outbox: Outbox) -> Session {
        let tokens = hub.shared.config.burst.max(1.0);
        Session {
            hub,
            id,
            outbox,
            tokens,
            last_refill: Instant::now(),
            pending: Mutex::default(),
            refusals: Refusals::default(),
            ident: Identity::default(),
            repeats: Default::default(),
        }
    }

    /// Waits until every request handed in so far has taken effect (and its
    /// replies are queued): call it before closing, so that no reply that was
    /// due is lost.
    pub async fn settle(&self) {
        let pending = std::mem::take(&mut *self.pending());
        if let Some(done) = pending.applied {
            // An error only means the writer has gone (shutdown): nothing to wait for.
            let _ = done.await;
        }
    }

    /// Waits until the client's queue has room for the replies to another
    /// request: an adapter reads the client's next request only then, so a
    /// client that sends faster than it reads is slowed down instead of
    /// being disconnected as lagging.
    pub async fn room_for_replies(&self) {
        self.outbox.room_for_replies().await;
    }

    /// The room the client joined last and is still in, once every join
    /// handed in so far has taken effect (messages queued after one need not
    /// wait: they do not change it).
    pub async fn current_room(&self) -> Option<String> {
        if self.pending().joining {
            self.settle().await;
        }
        self.hub
            .lock()
            .clients
            .get(&self.id)
            .and_then(|c| c.current.clone())
    }

    /// Answers a refused request: rate-limit refusals get at most one error
    /// a second (see [`Session::handle`]), the first at once and later ones
    /// with a count; any other error is sent as is.
    pub fn report(&mut self, e: HubError) {
        if !matches!(e, HubError::RateLimited(_)) {
            self.tell(e.to_msg());
            return;
        }
        let now = Instant::now();
        let r = &mut self.refusals;
        if !r.may_report(now) {
            r.unreported += 1;
            return;
        }
        r.reported = Some(now);
        match std::mem::take(&mut r.unreported) {
            0 => self.tell(e.to_msg()),
            earlier => self.tell_refused(earlier + 1),
        }
    }

    /// Tells the refusals not yet reported, if an error may be sent now.
    fn report_earlier_refusals(&mut self) {
        let now = Instant::now();
        let r = &mut self.refusals;
        if r.unreported > 0 && r.may_report(now) {
            r.reported = Some(now);
            let refused = std::mem::take(&mut r.unreported);
            self.tell_refused(refused);
        }
    }

    /// One `rate_limited` error for `refused` requests refused together.
    fn tell_refused(&self, refused: u64) {
        let rate = self.hub.shared.config.rate;
        self.tell(ServerMsg::error(
            "rate_limited",
            format!("{refused} more message(s) refused: the limit is {rate} per second; slow down"),
        ));
    }

    /// The client's current nickname.
    pub fn nick(&self) -> String {
        self.hub
            .lock()
            .clients
            .get(&self.id)
            .map(|c| c.nick.clone())
            .unwrap_or_default()
    }

    /// The rooms the client is in, sorted.
    pub fn rooms(&self) -> Vec<String> {
        self.hub
            .lock()
            .clients
            .get(&self.id)
            .map(|c| c.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Sends a message to this client only (e.g. an error about its input).
    pub fn tell(&self, msg: ServerMsg) {
        let ev = Event::new(msg);
        let mut st = self.hub.lock();
        self.hub.deliver_locked(&mut st, self.id, &ev);
    }

    /// Carries out one client request, applying the rate limit first. A
    /// refusal is returned; an adapter answers it with [`Session::report`],
    /// which limits the errors a flood of them brings.
    pub async fn handle(&mut self, msg: ClientMsg) -> Result<(), HubError> {
        self.take_token()?;
        self.report_earlier_refusals();
        if msg.is_auth() {
            self.settle().await;
            return self.identify(msg).await;
        }
        if !self.ident.logged_in
            && self.hub.shared.config.auth.mode == AuthMode::Required
            && !matches!(msg, ClientMsg::Nick { .. })
        {
            return Err(HubError::LoginRequired);
        }
        // Messages and topics are checked by the writer, in order with this
        // client's earlier joins; anything else needs them applied first.
        if !matches!(
            msg,
            ClientMsg::Say { .. } | ClientMsg::Me { .. } | ClientMsg::Topic { .. }
        ) {
            self.settle().await;
        }
        match msg {
            m if m.is_moderation() => self.moderate(m).await,
            ClientMsg::Join { room, after, since } => self.resume(&room, after, since).await,
            ClientMsg::Part { room } => self.part(&room),
            ClientMsg::Say { room, text } => self.say(&room, text, MessageKind::Say).await,
            ClientMsg::Me { room, text } => self.say(&room, text, MessageKind::Me).await,
            ClientMsg::Msg { to, text } => self.direct(&to, text),
            ClientMsg::Nick { nick } => self.set_nick(&nick),
            ClientMsg::Topic { room, topic } => self.topic(&room, topic).await,
            ClientMsg::Rooms => {
                let rooms = self.hub.rooms();
                self.tell(ServerMsg::Rooms { rooms });
                Ok(())
            }
            ClientMsg::Who { room } => self.who(&room),
            ClientMsg::FileTicket { room } => self.file_ticket(&room),
            ClientMsg::Register { .. }
            | ClientMsg::Login { .. }
            | ClientMsg::Logout { .. }
            | ClientMsg::Auth { .. } => unreachable!("identify handles these"),
            _ => unreachable!("moderate handles the rest"),
        }
    }

    fn take_token(&mut self) -> Result<(), HubError> {
        let cfg = &self.hub.shared.config;
        if cfg.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let burst = cfg.burst.max(1.0);
        let elapsed = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + elapsed * cfg.rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            metrics::counter!("netkit_chat_rate_limited_total").increment(1);
            Err(HubError::RateLimited(cfg.rate))
        }
    }

    /// Joins `room`; `joined`, then history (the last N, or everything after
    /// `after`), then live messages follow in the inbox.
    pub async fn join(&self, room: &str, after: Option<u64>) -> Result<(), HubError> {
        self.resume(room, after, None).await
    }

    /// Joins `room` resuming by origin vector when `since` is given and
    /// clustering is on (else by `after`, as [`Session::join`]): history is
    /// every message of the room the client has not seen according to
    /// `since` (up to the resume limit), and later messages it has already
    /// seen on another node are not delivered again. At most
    /// [`MAX_SINCE_ORIGINS`](super::MAX_SINCE_ORIGINS) entries, names of at
    /// most [`MAX_ORIGIN_LEN`](super::MAX_ORIGIN_LEN) bytes.
    pub async fn resume(
        &self,
        room: &str,
        after: Option<u64>,
        since: Option<BTreeMap<String, u64>>,
    ) -> Result<(), HubError> {
        if let Some(v) = &since {
            check_since(v)?;
        }
        // Without an origin (clustering off) no message has one: resume by id.
        let since = since.filter(|_| self.hub.shared.origin.get().is_some());
        if !valid_room(room) {
            return Err(HubError::bad_room(room));
        }
        if self.in_room(room) {
            return Err(HubError::AlreadyJoined(room.to_string()));
        }
        self.may_join(room)?;
        {
            let shared = &self.hub.shared;
            let st = self.hub.lock();
            if let Some(e) = shared.join_refusal(&st, self.id, self.ident.peer, room) {
                return Err(e);
            }
        }
        self.write(WriteCmd::Join {
            client: self.id,
            room: room.to_string(),
            after,
            since,
        })
        .await
    }

    /// Leaves `room`.
    pub fn part(&self, room: &str) -> Result<(), HubError> {
        let mut st = self.hub.lock();
        let (nick, was_member) = match st.clients.get_mut(&self.id) {
            Some(c) => {
                let was_member = c.rooms.remove(room);
                if c.current.as_deref() == Some(room) {
                    c.current = c.rooms.last().cloned();
                }
                (c.nick.clone(), was_member)
            }
            None => return Err(HubError::ShuttingDown),
        };
        if !was_member {
            return Err(HubError::NotMember(truncate(room)));
        }
        let shared = &self.hub.shared;
        shared.presence_changed();
        shared.leave_locked(&mut st, self.id, room, &nick);
        let parted = Event::new(ServerMsg::Parted {
            room: room.to_string(),
        });
        shared.deliver_locked(&mut st, &[self.id], &parted);
        Ok(())
    }

    /// Says `text` (or acts it, for [`MessageKind::Me`]) in `room`. The message
    /// is stored, then broadcast to every member, the sender included.
    pub async fn say(&self, room: &str, text: String, kind: MessageKind) -> Result<(), HubError> {
        self.check_text(&text)?;
        // Membership is checked by the writer, in order with this client's
        // earlier joins, so a `say` right after a `join` works.
        let from = {
            let st = self.hub.lock();
            if let Some(e) = self.hub.shared.speak_refusal(&st, self.id, room) {
                return Err(e);
            }
            match st.clients.get(&self.id) {
                Some(c) => {
                    if c.rooms.contains(room) {
                        let max = self.hub.shared.config.moderation.max_repeats;
                        let mut repeats = self.repeats.lock().unwrap_or_else(|e| e.into_inner());
                        repeats.check(&text, max)?;
                    }
                    c.nick.clone()
                }
                None => return Err(HubError::ShuttingDown),
            }
        };
        if let Some(log) = self.hub.shared.room_log.get() {
            return self.say_logged(log, room, from, text, kind).await;
        }
        self.write(WriteCmd::Say(Post {
            client: self.id,
            room: room.to_string(),
            from,
            text,
            kind,
            ts: now_ms(),
            origin: None,
            file: None,
            moderation: None,
        }))
        .await
    }

    /// [`Session::say`] in broker mode: membership is checked here, once
    /// the client's earlier requests have taken effect (so a `say` right
    /// after a `join` works), then the message goes to the log.
    async fn say_logged(
        &self,
        log: &Arc<dyn super::RoomLog>,
        room: &str,
        from: String,
        text: String,
        kind: MessageKind,
    ) -> Result<(), HubError> {
        self.settle().await;
        if !self.in_room(room) {
            return Err(HubError::NotMember(truncate(room)));
        }
        let post = super::LoggedPost {
            room: room.to_string(),
            from,
            text,
            kind,
            ts: now_ms(),
            moderation: None,
            file: None,
        };
        self.hub.say_logged(log, post).await.map(|_| ())
    }

    /// Sends `text` to the user `to` only (and echoes it to the sender).
    pub fn direct(&self, to: &str, text: String) -> Result<(), HubError> {
        self.check_text(&text)?;
        let mut st = self.hub.lock();
        let Some(&target) = st.nicks.get(&name_key(to)) else {
            return self.direct_remote(&mut st, to, text);
        };
        let from = st
            .clients
            .get(&self.id)
            .map(|c| c.nick.clone())
            .unwrap_or_default();
        let to = st
            .clients
            .get(&target)
            .map(|c| c.nick.clone())
            .unwrap_or_default();
        let ev = Event::new(ServerMsg::Direct {
            from,
            to,
            text,
            ts: now_ms(),
        });
        let recipients: Vec<ClientId> = if target == self.id {
            vec![self.id]
        } else {
            vec![target, self.id]
        };
        self.hub.shared.deliver_locked(&mut st, &recipients, &ev);
        Ok(())
    }

    /// Changes the nickname (unique on the server by [`name_key`], and a
    /// registered one only for its owner); everyone
    /// sharing a room with the client, and the client, is told.
    pub fn set_nick(&self, nick: &str) -> Result<(), HubError> {
        if !valid_nick(nick) {
            return Err(HubError::bad_nick(nick));
        }
        let key = name_key(nick);
        let mut st = self.hub.lock();
        if let Some(&owner) = st.nicks.get(&key)
            && owner != self.id
        {
            return Err(HubError::NickTaken(nick.to_string()));
        }
        // In use on another node (as far as this node knows).
        if st.remote.has_nick(nick) && !st.nicks.contains_key(&key) {
            return Err(HubError::NickTaken(nick.to_string()));
        }
        if !st.may_hold(self.id, &key) {
            return Err(HubError::NickRegistered(nick.to_string()));
        }
        if !self.hub.shared.rename_locked(&mut st, self.id, nick) {
            return Err(HubError::ShuttingDown);
        }
        Ok(())
    }

    /// Sets `room`'s topic (stored; announced to its members).
    pub async fn topic(&self, room: &str, topic: String) -> Result<(), HubError> {
        if topic.len() > super::log::MAX_TOPIC {
            return Err(HubError::BadText {
                got: topic.len(),
                max: super::log::MAX_TOPIC,
            });
        }
        if !valid_room(room) {
            return Err(HubError::bad_room(room));
        }
        // Later than the topic it replaces, even if this clock is behind
        // the one that set it: the newest setting wins across a cluster.
        let (by, stamp) = {
            let st = self.hub.lock();
            let before = st.rooms.get(room).map_or(0, |r| r.topic_stamp.ms);
            let by = st.clients.get(&self.id).map(|c| c.nick.clone());
            let stamp = crate::chat::store::TopicStamp {
                ms: now_ms().max(before.saturating_add(1)),
                origin: self.hub.origin().unwrap_or_default().to_string(),
            };
            (by.unwrap_or_default(), stamp)
        };
        self.write(WriteCmd::Topic {
            client: self.id,
            room: room.to_string(),
            topic,
            by,
            stamp,
            newer_only: false,
        })
        .await
    }

    /// Sends the client the member list of `room`.
    pub fn who(&self, room: &str) -> Result<(), HubError> {
        if !valid_room(room) {
            return Err(HubError::bad_room(room));
        }
        let (members, remote) = {
            let st = self.hub.lock();
            member_nicks(&st, room)
        };
        self.tell(ServerMsg::Members {
            room: room.to_string(),
            members,
            remote,
        });
        Ok(())
    }

    /// Refuses an empty text or one over the hub's limit.
    fn check_text(&self, text: &str) -> Result<(), HubError> {
        let max = self.hub.shared.config.max_text;
        if text.is_empty() || text.len() > max {
            return Err(HubError::BadText {
                got: text.len(),
                max,
            });
        }
        Ok(())
    }

    pub(super) fn in_room(&self, room: &str) -> bool {
        self.hub
            .lock()
            .clients
            .get(&self.id)
            .is_some_and(|c| c.rooms.contains(room))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `cmd` for the writer; [`Session::settle`] then waits for it.
    pub(super) async fn write(&self, cmd: WriteCmd) -> Result<(), HubError> {
        let joining = matches!(cmd, WriteCmd::Join { .. });
        let (done, applied) = oneshot::channel();
        self.hub
            .writer
            .send((cmd, Some(done)))
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        // The writer applies in order: the last command's completion covers the earlier ones.
        let mut pending = self.pending();
        pending.applied = Some(applied);
        pending.joining |= joining;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let shared = &self.hub.shared;
        let mut st = shared.lock();
        if st.clients.contains_key(&self.id) {
            shared.remove_locked(&mut st, self.id);
        }
        drop(st);
        let now = shared.stats.clients.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("netkit_chat_clients").set(now as f64);
    }
}

//! The chat hub: rooms, members, nicknames and fan-out, knowing nothing of
//! WebSocket or TCP. An adapter calls [`Hub::connect`] and gets a [`Session`]
//! (what the client does) and an [`Inbox`] (what the client is sent).
//!
//! Concurrency rules:
//! - Room messages, joins and topic changes go through one writer thread that
//!   batches them into a single SQLite transaction, commits, and only then fans
//!   them out. So nobody sees a message a crash could lose, and a join sees
//!   history and live messages with no gap and no duplicate (both are ordered by
//!   the same thread).
//! - Member state sits behind a std `Mutex`, held only for short, non-async
//!   critical sections (never across `.await`).
//! - Every client has a queue bounded in messages and bytes. A client whose
//!   queue is full is disconnected with [`DisconnectReason::Lagging`]; it is never
//!   silently skipped and never slows the room.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::protocol::{ChatMessage, ClientMsg, MessageKind, PresenceEvent, RoomInfo, ServerMsg};
use super::store::{NewMessage, Store, StoreError};

/// Limits and policies of a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most clients connected at once (all transports together).
    pub max_clients: usize,
    /// Most messages waiting in one client's outgoing queue.
    pub queue_messages: usize,
    /// Most bytes (of JSON) waiting in one client's outgoing queue.
    pub queue_bytes: usize,
    /// Longest message text in bytes.
    pub max_text: usize,
    /// Messages replayed to a client joining without a resume id.
    pub history_on_join: usize,
    /// Most messages replayed to a client resuming from an id.
    pub resume_max: usize,
    /// Commands per second per client (0 = unlimited).
    pub rate: f64,
    /// Commands a client may send in a burst above the rate.
    pub burst: f64,
    /// Rooms larger than this get no join/leave events and `joined` lists only
    /// this many members (the rest through `who`): keeps big rooms from
    /// quadratic presence traffic.
    pub presence_limit: usize,
    /// Shortest time between two write batches while commands keep coming
    /// (group commit): a busy room's messages share a transaction and reach
    /// each client together. The first command after a quiet spell waits for
    /// nothing. Zero (the default) starts each batch as soon as it can.
    pub batch_interval: std::time::Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_clients: 10_000,
            queue_messages: 1024,
            queue_bytes: 1 << 20,
            max_text: 4096,
            history_on_join: 50,
            resume_max: 500,
            rate: 20.0,
            burst: 40.0,
            presence_limit: 200,
            batch_interval: std::time::Duration::ZERO,
        }
    }
}

/// A problem with a client's request; sent back as an `error` message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    /// Room name not allowed.
    #[error("invalid room name '{0}': use 1–32 letters, digits, '-' or '_'")]
    BadRoom(String),
    /// Nickname not allowed.
    #[error("invalid nickname '{0}': use 1–24 letters, digits, '-' or '_'")]
    BadNick(String),
    /// Nickname already in use.
    #[error("nickname '{0}' is taken; pick another with /nick")]
    NickTaken(String),
    /// Client is not in the room.
    #[error("you are not in room '{0}'; join it first")]
    NotMember(String),
    /// Client is already in the room.
    #[error("you are already in room '{0}'")]
    AlreadyJoined(String),
    /// No such user for a direct message.
    #[error("no user named '{0}' is connected; /who lists a room's members")]
    NoSuchUser(String),
    /// Text empty or too long.
    #[error("message text must be 1 to {max} bytes (got {got})")]
    BadText {
        /// Length received.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// Sending too fast.
    #[error("too many messages: the limit is {0} per second; slow down")]
    RateLimited(f64),
    /// The hub is at its connection cap.
    #[error("server full: {0} clients already connected; try again later")]
    Full(usize),
    /// The hub is shutting down.
    #[error("server shutting down")]
    ShuttingDown,
    /// Storing the message failed; it was not sent to anyone.
    #[error("could not store the message, so it was not sent: {0}")]
    Store(String),
}

impl HubError {
    /// The machine-readable `code` of the `error` message.
    pub fn code(&self) -> &'static str {
        match self {
            HubError::BadRoom(_) => "bad_room",
            HubError::BadNick(_) => "bad_nick",
            HubError::NickTaken(_) => "nick_taken",
            HubError::NotMember(_) => "not_member",
            HubError::AlreadyJoined(_) => "already_joined",
            HubError::NoSuchUser(_) => "no_such_user",
            HubError::BadText { .. } => "bad_text",
            HubError::RateLimited(_) => "rate_limited",
            HubError::Full(_) => "server_full",
            HubError::ShuttingDown => "shutting_down",
            HubError::Store(_) => "store_failed",
        }
    }

    /// This error as a message for the client.
    pub fn to_msg(&self) -> ServerMsg {
        ServerMsg::error(self.code(), self.to_string())
    }
}

/// Why the hub disconnected a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The outgoing queue overflowed: the client reads too slowly.
    Lagging {
        /// Queue limit in messages.
        messages: usize,
        /// Queue limit in bytes.
        bytes: usize,
    },
    /// The server is shutting down.
    Shutdown,
}

impl DisconnectReason {
    /// Short machine-readable name (metrics label, error code).
    pub fn code(&self) -> &'static str {
        match self {
            DisconnectReason::Lagging { .. } => "lagging",
            DisconnectReason::Shutdown => "shutting_down",
        }
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::Lagging { messages, bytes } => write!(
                f,
                "too slow: outgoing queue over {messages} messages or {bytes} bytes"
            ),
            DisconnectReason::Shutdown => f.write_str("server shutting down"),
        }
    }
}

/// One outgoing message, serialized once and shared by every recipient.
#[derive(Debug)]
pub struct Event {
    /// The message.
    pub msg: ServerMsg,
    /// Its JSON form (what WebSocket clients get).
    pub json: Bytes,
}

impl Event {
    /// Wraps and serializes a message.
    pub fn new(msg: ServerMsg) -> Arc<Event> {
        let json = Bytes::from(msg.to_json());
        Arc::new(Event { msg, json })
    }
}

/// Counters of a hub, readable while it runs.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Clients connected now.
    pub clients: AtomicUsize,
    /// Clients connected since start.
    pub connections: AtomicU64,
    /// Room messages stored and broadcast.
    pub messages: AtomicU64,
    /// Messages put in client queues.
    pub deliveries: AtomicU64,
    /// Clients disconnected for lagging.
    pub dropped_lagging: AtomicU64,
    /// Write batches committed.
    pub batches: AtomicU64,
}

type ClientId = u64;

/// The author of messages applied from another node ([`Hub::apply_remote`]);
/// no client has this id (they count from 1).
const REMOTE: ClientId = 0;

/// Capacity of the [`Hub::stored_local`] broadcast.
const STORED_LOCAL_CAPACITY: usize = 8192;

struct Kick {
    token: CancellationToken,
    reason: OnceLock<DisconnectReason>,
}

impl Kick {
    /// True once the client is disconnected: the reason is set (under the
    /// state lock) just before the token is cancelled. An atomic load, where
    /// `token.is_cancelled()` takes the token's mutex, which the writer thread
    /// and the client's task would contend for on every delivery.
    fn is_kicked(&self) -> bool {
        self.reason.get().is_some()
    }
}

#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Arc<Event>>,
    bytes: Arc<AtomicUsize>,
    kick: Arc<Kick>,
}

struct Client {
    nick: String,
    outbox: Outbox,
    rooms: BTreeSet<String>,
}

#[derive(Default)]
struct Room {
    members: BTreeSet<ClientId>,
    topic: String,
    last_id: u64,
}

#[derive(Default)]
struct State {
    clients: HashMap<ClientId, Client>,
    nicks: HashMap<String, ClientId>,
    rooms: HashMap<String, Room>,
    shutting_down: bool,
}

struct Shared {
    config: HubConfig,
    state: Mutex<State>,
    stats: HubStats,
    next_client: AtomicU64,
    reader: Mutex<Store>,
    /// Messages posted on this node, sent once stored (for the cluster relay).
    stored_local: tokio::sync::broadcast::Sender<ChatMessage>,
}

enum WriteCmd {
    /// Notified once every command queued before it is committed ([`Hub::sync_writes`]).
    Sync(Arc<tokio::sync::Notify>),
    Say {
        client: ClientId,
        room: String,
        from: String,
        text: String,
        kind: MessageKind,
        ts: i64,
    },
    Join {
        client: ClientId,
        room: String,
        after: Option<u64>,
    },
    Topic {
        client: ClientId,
        room: String,
        topic: String,
    },
}

/// A cheap-to-clone handle to a running hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
    writer: mpsc::Sender<WriteCmd>,
}

/// The hub's writer thread; join it after the last [`Hub`] clone is dropped to
/// be sure the last batch is committed.
pub struct HubWriter(std::thread::JoinHandle<()>);

impl HubWriter {
    /// Waits (blocking) for the writer thread to finish.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// True if `name` is a valid room name: 1–32 of `[A-Za-z0-9_-]`.
pub fn valid_room(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// True if `nick` is a valid nickname: 1–24 of `[A-Za-z0-9_-]`.
pub fn valid_nick(nick: &str) -> bool {
    (1..=24).contains(&nick.len())
        && nick
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const WRITE_QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;

impl Hub {
    /// Opens the history in `data_dir` and starts the writer thread.
    pub fn open(data_dir: &Path, config: HubConfig) -> Result<(Hub, HubWriter), StoreError> {
        let writer_store = Store::open_in(data_dir)?;
        writer_store.disable_autocheckpoint()?;
        let reader = Store::open_in(data_dir)?;
        let checkpointer = Store::open_in(data_dir)?;
        let mut state = State::default();
        for r in writer_store.rooms()? {
            state.rooms.insert(
                r.name,
                Room {
                    members: BTreeSet::new(),
                    topic: r.topic,
                    last_id: r.last_id,
                },
            );
        }
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            stats: HubStats::default(),
            next_client: AtomicU64::new(1),
            reader: Mutex::new(reader),
            stored_local: tokio::sync::broadcast::channel(STORED_LOCAL_CAPACITY).0,
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let s = shared.clone();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("chat-writer".into())
            .spawn(move || {
                writer_loop(s, writer_store, rx);
                drop(stop_tx);
            })
            .expect("cannot spawn the chat writer thread");
        // Checkpoints (and their fsyncs) happen here, off the writer's path,
        // every second until the writer ends.
        std::thread::Builder::new()
            .name("chat-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(std::time::Duration::from_secs(1))
                {
                    if let Err(e) = checkpointer.checkpoint() {
                        tracing::warn!("chat: checkpoint failed: {e}");
                    }
                }
                let _ = checkpointer.checkpoint();
            })
            .expect("cannot spawn the chat checkpoint thread");
        Ok((Hub { shared, writer: tx }, HubWriter(handle)))
    }

    /// The hub's limits.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// The hub's counters.
    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// Registers a client, with the nickname it asks for if that is valid and
    /// free, else a guest name (and an error saying why). It is sent `welcome` first.
    pub fn connect(&self, wanted: Option<&str>) -> Result<(Session, Inbox), HubError> {
        let cfg = &self.shared.config;
        let (tx, rx) = mpsc::channel(cfg.queue_messages.max(1));
        let kick = Arc::new(Kick {
            token: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        let outbox = Outbox {
            tx,
            bytes: Arc::new(AtomicUsize::new(0)),
            kick: kick.clone(),
        };
        let id;
        let nick;
        let refusal;
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(HubError::ShuttingDown);
            }
            if st.clients.len() >= cfg.max_clients {
                return Err(HubError::Full(cfg.max_clients));
            }
            id = self.shared.next_client.fetch_add(1, Ordering::Relaxed);
            let mut refused = None;
            match wanted {
                Some(w) if !valid_nick(w) => refused = Some(HubError::BadNick(truncate(w))),
                Some(w) if st.nicks.contains_key(&w.to_ascii_lowercase()) => {
                    refused = Some(HubError::NickTaken(w.to_string()))
                }
                _ => {}
            }
            nick = match (wanted, &refused) {
                (Some(w), None) => w.to_string(),
                _ => {
                    let mut n = id;
                    loop {
                        let candidate = format!("guest-{n}");
                        if !st.nicks.contains_key(&candidate.to_ascii_lowercase()) {
                            break candidate;
                        }
                        n += 1_000_000;
                    }
                }
            };
            refusal = refused;
            st.nicks.insert(nick.to_ascii_lowercase(), id);
            st.clients.insert(
                id,
                Client {
                    nick: nick.clone(),
                    outbox: outbox.clone(),
                    rooms: BTreeSet::new(),
                },
            );
            let welcome = Event::new(ServerMsg::Welcome { nick: nick.clone() });
            self.deliver_locked(&mut st, id, &welcome);
            if let Some(e) = &refusal {
                self.deliver_locked(&mut st, id, &Event::new(e.to_msg()));
            }
        }
        let stats = &self.shared.stats;
        let now = stats.clients.fetch_add(1, Ordering::Relaxed) + 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("netkit_chat_clients").set(now as f64);
        metrics::counter!("netkit_chat_connections_total").increment(1);
        let cfg = &self.shared.config;
        let session = Session {
            hub: self.clone(),
            id,
            tokens: cfg.burst.max(1.0),
            last_refill: Instant::now(),
        };
        let inbox = Inbox {
            rx,
            bytes: outbox.bytes,
            kick,
        };
        Ok((session, inbox))
    }

    /// Queues a message posted on another node for storage in `room` (created
    /// if new) and delivery to the room's local members, in the order of the
    /// calls; [`Hub::sync_writes`] waits for it to be committed.
    /// For the cluster relay; such messages are not sent to [`Hub::stored_local`].
    pub async fn apply_remote(
        &self,
        room: String,
        from: String,
        text: String,
        kind: MessageKind,
        ts: i64,
    ) -> Result<(), HubError> {
        if !valid_room(&room) {
            return Err(HubError::BadRoom(truncate(&room)));
        }
        self.writer
            .send(WriteCmd::Say {
                client: REMOTE,
                room,
                from,
                text,
                kind,
                ts,
            })
            .await
            .map_err(|_| HubError::ShuttingDown)
    }

    /// Waits until every write queued before this call (messages from
    /// [`Hub::apply_remote`] included) has been committed or has failed.
    pub async fn sync_writes(&self) -> Result<(), HubError> {
        let done = Arc::new(tokio::sync::Notify::new());
        self.writer
            .send(WriteCmd::Sync(done.clone()))
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        done.notified().await;
        Ok(())
    }

    /// Every message posted on this node from now on, once it is stored (in
    /// storage order). A subscriber that falls more than 8192 messages behind
    /// gets `Lagged` and has missed those.
    pub fn stored_local(&self) -> tokio::sync::broadcast::Receiver<ChatMessage> {
        self.shared.stored_local.subscribe()
    }

    /// Nicknames of every connected client, sorted.
    pub fn users(&self) -> Vec<String> {
        let st = self.lock();
        let mut v: Vec<String> = st.clients.values().map(|c| c.nick.clone()).collect();
        v.sort();
        v
    }

    /// Every room with its member count, topic and newest id, sorted by name.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let st = self.lock();
        let mut v: Vec<RoomInfo> = st
            .rooms
            .iter()
            .map(|(name, r)| RoomInfo {
                name: name.clone(),
                members: r.members.len(),
                topic: r.topic.clone(),
                last_id: r.last_id,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stored messages of `room`, oldest first. With `after` alone it pages
    /// forward (the oldest `limit` after it); otherwise it returns the newest
    /// `limit` below `before` (exclusive) and above `after`. Blocking: call it
    /// from `spawn_blocking`.
    pub fn history(
        &self,
        room: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let store = self.shared.reader.lock().unwrap_or_else(|e| e.into_inner());
        let upto = before.map(|b| b.saturating_sub(1)).unwrap_or(u64::MAX);
        match (after, before) {
            (Some(a), None) => store.earliest(room, a, upto, limit),
            (a, _) => store.latest(room, a.unwrap_or(0), upto, limit),
        }
    }

    /// Disconnects every client with [`DisconnectReason::Shutdown`] and refuses new ones.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutting_down = true;
        for c in st.clients.values() {
            let _ = c.outbox.kick.reason.set(DisconnectReason::Shutdown);
            c.outbox.kick.token.cancel();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn deliver_locked(&self, st: &mut State, to: ClientId, ev: &Arc<Event>) {
        self.shared.deliver_locked(st, &[to], ev);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `ev` in each recipient's queue; a recipient whose queue is full is
    /// disconnected as lagging (and its departure announced).
    fn deliver_locked(&self, st: &mut State, to: &[ClientId], ev: &Arc<Event>) {
        let mut laggards = Vec::new();
        let len = ev.json.len();
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
            let ok = queued <= cfg.queue_bytes && ob.tx.try_send(ev.clone()).is_ok();
            if ok {
                delivered += 1;
            } else {
                ob.bytes.fetch_sub(len, Ordering::Relaxed);
                laggards.push(*id);
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
    fn remove_locked(&self, st: &mut State, id: ClientId) {
        let Some(c) = st.clients.remove(&id) else {
            return;
        };
        st.nicks.remove(&c.nick.to_ascii_lowercase());
        for room in &c.rooms {
            let members: Vec<ClientId> = match st.rooms.get_mut(room) {
                Some(r) => {
                    r.members.remove(&id);
                    if r.members.len() >= self.config.presence_limit {
                        continue;
                    }
                    r.members.iter().copied().collect()
                }
                None => continue,
            };
            let ev = Event::new(ServerMsg::Presence {
                room: room.clone(),
                nick: c.nick.clone(),
                event: PresenceEvent::Leave,
            });
            self.deliver_locked(st, &members, &ev);
        }
    }
}

/// What one client does: every request of a connection goes through its session.
/// Dropping the session disconnects the client.
pub struct Session {
    hub: Hub,
    id: ClientId,
    tokens: f64,
    last_refill: Instant,
}

/// What one client is sent, in order.
pub struct Inbox {
    rx: mpsc::Receiver<Arc<Event>>,
    bytes: Arc<AtomicUsize>,
    kick: Arc<Kick>,
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
    /// Waits for the next message, or for the hub to disconnect the client.
    pub async fn recv(&mut self) -> Received {
        tokio::select! {
            biased;
            _ = self.kick.token.cancelled() => Received::Disconnected(
                self.kick.reason.get().cloned().unwrap_or(DisconnectReason::Shutdown)),
            ev = self.rx.recv() => match ev {
                Some(ev) => {
                    self.bytes.fetch_sub(ev.json.len(), Ordering::Relaxed);
                    Received::Event(ev)
                }
                None => Received::Closed,
            },
        }
    }

    /// The next queued message, if one is ready and the client is not disconnected.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        if self.kick.is_kicked() {
            return None;
        }
        let ev = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(ev.json.len(), Ordering::Relaxed);
        Some(ev)
    }
}

impl Session {
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

    /// Carries out one client request, applying the rate limit first.
    pub async fn handle(&mut self, msg: ClientMsg) -> Result<(), HubError> {
        self.take_token()?;
        match msg {
            ClientMsg::Join { room, after } => self.join(&room, after).await,
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
        if !valid_room(room) {
            return Err(HubError::BadRoom(truncate(room)));
        }
        if self.in_room(room) {
            return Err(HubError::AlreadyJoined(room.to_string()));
        }
        self.write(WriteCmd::Join {
            client: self.id,
            room: room.to_string(),
            after,
        })
        .await
    }

    /// Leaves `room`.
    pub fn part(&self, room: &str) -> Result<(), HubError> {
        let mut st = self.hub.lock();
        let (nick, was_member) = match st.clients.get_mut(&self.id) {
            Some(c) => (c.nick.clone(), c.rooms.remove(room)),
            None => return Err(HubError::ShuttingDown),
        };
        if !was_member {
            return Err(HubError::NotMember(truncate(room)));
        }
        let limit = self.hub.shared.config.presence_limit;
        let members: Vec<ClientId> = match st.rooms.get_mut(room) {
            Some(r) => {
                r.members.remove(&self.id);
                if r.members.len() < limit {
                    r.members.iter().copied().collect()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        let shared = &self.hub.shared;
        let ev = Event::new(ServerMsg::Presence {
            room: room.to_string(),
            nick,
            event: PresenceEvent::Leave,
        });
        shared.deliver_locked(&mut st, &members, &ev);
        let parted = Event::new(ServerMsg::Parted {
            room: room.to_string(),
        });
        shared.deliver_locked(&mut st, &[self.id], &parted);
        Ok(())
    }

    /// Says `text` (or acts it, for [`MessageKind::Me`]) in `room`. The message
    /// is stored, then broadcast to every member, the sender included.
    pub async fn say(&self, room: &str, text: String, kind: MessageKind) -> Result<(), HubError> {
        let max = self.hub.shared.config.max_text;
        if text.is_empty() || text.len() > max {
            return Err(HubError::BadText {
                got: text.len(),
                max,
            });
        }
        // Membership is checked by the writer, in order with this client's
        // earlier joins, so a `say` right after a `join` works.
        let from = {
            let st = self.hub.lock();
            match st.clients.get(&self.id) {
                Some(c) => c.nick.clone(),
                None => return Err(HubError::ShuttingDown),
            }
        };
        self.write(WriteCmd::Say {
            client: self.id,
            room: room.to_string(),
            from,
            text,
            kind,
            ts: now_ms(),
        })
        .await
    }

    /// Sends `text` to the user `to` only (and echoes it to the sender).
    pub fn direct(&self, to: &str, text: String) -> Result<(), HubError> {
        let max = self.hub.shared.config.max_text;
        if text.is_empty() || text.len() > max {
            return Err(HubError::BadText {
                got: text.len(),
                max,
            });
        }
        let mut st = self.hub.lock();
        let Some(&target) = st.nicks.get(&to.to_ascii_lowercase()) else {
            return Err(HubError::NoSuchUser(truncate(to)));
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

    /// Changes the nickname (unique on the server, case-insensitively); everyone
    /// sharing a room with the client, and the client, is told.
    pub fn set_nick(&self, nick: &str) -> Result<(), HubError> {
        if !valid_nick(nick) {
            return Err(HubError::BadNick(truncate(nick)));
        }
        let key = nick.to_ascii_lowercase();
        let mut st = self.hub.lock();
        if let Some(&owner) = st.nicks.get(&key)
            && owner != self.id
        {
            return Err(HubError::NickTaken(nick.to_string()));
        }
        let Some(c) = st.clients.get_mut(&self.id) else {
            return Err(HubError::ShuttingDown);
        };
        let old = std::mem::replace(&mut c.nick, nick.to_string());
        let rooms = c.rooms.clone();
        st.nicks.remove(&old.to_ascii_lowercase());
        st.nicks.insert(key, self.id);
        let mut recipients: BTreeSet<ClientId> = BTreeSet::from([self.id]);
        for room in &rooms {
            if let Some(r) = st.rooms.get(room) {
                recipients.extend(r.members.iter().copied());
            }
        }
        let recipients: Vec<ClientId> = recipients.into_iter().collect();
        let ev = Event::new(ServerMsg::Nick {
            old,
            new: nick.to_string(),
        });
        self.hub.shared.deliver_locked(&mut st, &recipients, &ev);
        Ok(())
    }

    /// Sets `room`'s topic (stored; announced to its members).
    pub async fn topic(&self, room: &str, topic: String) -> Result<(), HubError> {
        if topic.len() > 200 {
            return Err(HubError::BadText {
                got: topic.len(),
                max: 200,
            });
        }
        if !valid_room(room) {
            return Err(HubError::BadRoom(truncate(room)));
        }
        self.write(WriteCmd::Topic {
            client: self.id,
            room: room.to_string(),
            topic,
        })
        .await
    }

    /// Sends the client the member list of `room`.
    pub fn who(&self, room: &str) -> Result<(), HubError> {
        if !valid_room(room) {
            return Err(HubError::BadRoom(truncate(room)));
        }
        let members = {
            let st = self.hub.lock();
            member_nicks(&st, room)
        };
        self.tell(ServerMsg::Members {
            room: room.to_string(),
            members,
        });
        Ok(())
    }

    fn in_room(&self, room: &str) -> bool {
        self.hub
            .lock()
            .clients
            .get(&self.id)
            .is_some_and(|c| c.rooms.contains(room))
    }

    async fn write(&self, cmd: WriteCmd) -> Result<(), HubError> {
        self.hub
            .writer
            .send(cmd)
            .await
            .map_err(|_| HubError::ShuttingDown)
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

/// At most `max` member nicks of `room` (unsorted; for big rooms).
fn member_nicks_upto(st: &State, room: &str, max: usize) -> Vec<String> {
    st.rooms
        .get(room)
        .map(|r| {
            r.members
                .iter()
                .filter_map(|id| st.clients.get(id).map(|c| c.nick.clone()))
                .take(max)
                .collect()
        })
        .unwrap_or_default()
}

fn member_nicks(st: &State, room: &str) -> Vec<String> {
    let mut v: Vec<String> = st
        .rooms
        .get(room)
        .map(|r| {
            r.members
                .iter()
                .filter_map(|id| st.clients.get(id).map(|c| c.nick.clone()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Cuts untrusted input echoed in an error to a readable length.
fn truncate(s: &str) -> String {
    if s.len() <= 40 {
        return s.to_string();
    }
    let mut end = 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A join whose history has been read, waiting to be applied in order.
struct PreparedJoin {
    history: Vec<ChatMessage>,
    truncated: bool,
    last_id: u64,
}

/// The writer thread: takes commands in batches, assigns ids, commits the batch
/// in one transaction, then applies it (fan-out, joins, topics) in order.
fn writer_loop(shared: Arc<Shared>, mut store: Store, mut rx: mpsc::Receiver<WriteCmd>) {
    let mut last_ids: HashMap<String, u64> = shared
        .lock()
        .rooms
        .iter()
        .map(|(k, r)| (k.clone(), r.last_id))
        .collect();
    let mut batch: Vec<WriteCmd> = Vec::with_capacity(MAX_BATCH);
    let interval = shared.config.batch_interval;
    let mut last_batch: Option<std::time::Instant> = None;
    while let Some(first) = rx.blocking_recv() {
        // Group commit: at most one batch per `interval` while commands keep
        // coming, so that each client is woken, and written to, once per batch
        // rather than once per message.
        if let Some(at) = last_batch {
            let due = at + interval;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        last_batch = Some(std::time::Instant::now());
        batch.clear();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        process_batch(&shared, &mut store, &mut last_ids, &batch);
    }
    tracing::debug!("chat: writer thread stopped");
}

fn process_batch(
    shared: &Shared,
    store: &mut Store,
    last_ids: &mut HashMap<String, u64>,
    batch: &[WriteCmd],
) {
    let started = std::time::Instant::now();
    // Phase 1: check membership (in order: a join earlier in the batch counts),
    // assign ids (tentatively) and write everything in one transaction.
    let mut allowed: Vec<bool> = Vec::with_capacity(batch.len());
    {
        let st = shared.lock();
        let mut joining: HashSet<(ClientId, &str)> = HashSet::new();
        for cmd in batch {
            allowed.push(match cmd {
                WriteCmd::Say { client: REMOTE, .. } => true,
                WriteCmd::Say { client, room, .. } | WriteCmd::Topic { client, room, .. } => {
                    joining.contains(&(*client, room.as_str()))
                        || st
                            .clients
                            .get(client)
                            .is_some_and(|c| c.rooms.contains(room))
                }
                WriteCmd::Join { client, room, .. } => {
                    joining.insert((*client, room.as_str()));
                    true
                }
                WriteCmd::Sync(_) => true,
            });
        }
    }
    let mut next = last_ids.clone();
    let mut ids: Vec<u64> = Vec::with_capacity(batch.len());
    let mut new_rooms: Vec<&str> = Vec::new();
    let mut messages: Vec<NewMessage<'_>> = Vec::new();
    let mut topics: Vec<(&str, &str)> = Vec::new();
    for (cmd, &ok) in batch.iter().zip(&allowed) {
        if !ok {
            ids.push(0);
            continue;
        }
        match cmd {
            WriteCmd::Say {
                client,
                room,
                from,
                text,
                kind,
                ts,
            } => {
                if *client == REMOTE && !last_ids.contains_key(room) {
                    new_rooms.push(room);
                }
                let id = next.entry(room.clone()).or_insert(0);
                *id += 1;
                ids.push(*id);
                messages.push(NewMessage {
                    room,
                    id: *id,
                    from,
                    text,
                    ts: *ts,
                    kind: *kind,
                });
            }
            WriteCmd::Sync(_) => ids.push(0),
            WriteCmd::Join { room, .. } => {
                ids.push(*next.entry(room.clone()).or_insert(0));
                new_rooms.push(room);
            }
            WriteCmd::Topic { room, topic, .. } => {
                ids.push(0);
                topics.push((room, topic));
            }
        }
    }
    let committed = store.write_batch(&new_rooms, &messages, &topics, now_ms());
    let failure = match committed {
        Ok(()) => {
            *last_ids = next;
            None
        }
        Err(e) => {
            tracing::error!(
                "chat: cannot store a batch of {} messages: {e}",
                messages.len()
            );
            Some(e.to_string())
        }
    };
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    metrics::histogram!("netkit_chat_batch_seconds").record(started.elapsed().as_secs_f64());

    // Read the history each join needs, as of its place in the batch, before
    // taking the member lock.
    let cfg = &shared.config;
    let mut joins: Vec<Option<PreparedJoin>> = Vec::with_capacity(batch.len());
    for (cmd, &upto) in batch.iter().zip(&ids) {
        let WriteCmd::Join { room, after, .. } = cmd else {
            joins.push(None);
            continue;
        };
        // On a failed commit the batch's messages do not exist.
        let upto = if failure.is_some() {
            last_ids.get(room).copied().unwrap_or(0)
        } else {
            upto
        };
        let (since, limit) = match after {
            Some(a) => (*a, cfg.resume_max),
            None => (0, cfg.history_on_join),
        };
        let history = store.latest(room, since, upto, limit).unwrap_or_else(|e| {
            tracing::error!("chat: cannot read history of {room}: {e}");
            Vec::new()
        });
        let truncated = after.is_some()
            && history
                .first()
                .map_or(upto > since, |m| m.id > since.saturating_add(1));
        joins.push(Some(PreparedJoin {
            history,
            truncated,
            last_id: upto,
        }));
    }

    // Phase 2: apply in order under the member lock.
    let mut st = shared.lock();
    let mut stored = 0u64;
    for (((cmd, &id), join), &ok) in batch.iter().zip(&ids).zip(joins).zip(&allowed) {
        if !ok {
            let (WriteCmd::Say { client, room, .. } | WriteCmd::Topic { client, room, .. }) = cmd
            else {
                continue;
            };
            let ev = Event::new(HubError::NotMember(truncate(room)).to_msg());
            shared.deliver_locked(&mut st, &[*client], &ev);
            continue;
        }
        match cmd {
            WriteCmd::Say {
                client,
                room,
                from,
                text,
                kind,
                ts,
            } => {
                if let Some(err) = &failure {
                    let ev = Event::new(HubError::Store(err.clone()).to_msg());
                    shared.deliver_locked(&mut st, &[*client], &ev);
                    continue;
                }
                stored += 1;
                let msg = ChatMessage {
                    room: room.clone(),
                    id,
                    from: from.clone(),
                    text: text.clone(),
                    ts: *ts,
                    kind: *kind,
                };
                if *client == REMOTE {
                    st.rooms.entry(room.clone()).or_default();
                } else {
                    let _ = shared.stored_local.send(msg.clone());
                }
                let ev = Event::new(ServerMsg::Message(msg));
                let members: Vec<ClientId> = match st.rooms.get_mut(room) {
                    Some(r) => {
                        r.last_id = id;
                        r.members.iter().copied().collect()
                    }
                    None => continue,
                };
                shared.deliver_locked(&mut st, &members, &ev);
            }
            WriteCmd::Sync(done) => done.notify_one(),
            WriteCmd::Join { client, room, .. } => {
                let Some(join) = join else { continue };
                apply_join(shared, &mut st, *client, room, join);
            }
            WriteCmd::Topic {
                client,
                room,
                topic,
            } => {
                if let Some(err) = &failure {
                    let ev = Event::new(HubError::Store(err.clone()).to_msg());
                    shared.deliver_locked(&mut st, &[*client], &ev);
                    continue;
                }
                let by = st
                    .clients
                    .get(client)
                    .map(|c| c.nick.clone())
                    .unwrap_or_default();
                let r = st.rooms.entry(room.clone()).or_default();
                r.topic = topic.clone();
                let members: Vec<ClientId> = r.members.iter().copied().collect();
                let ev = Event::new(ServerMsg::Topic {
                    room: room.clone(),
                    topic: topic.clone(),
                    by,
                });
                shared.deliver_locked(&mut st, &members, &ev);
            }
        }
    }
    drop(st);
    shared.stats.messages.fetch_add(stored, Ordering::Relaxed);
    metrics::counter!("netkit_chat_messages_total").increment(stored);
}

fn apply_join(shared: &Shared, st: &mut State, client: ClientId, room: &str, join: PreparedJoin) {
    let nick = match st.clients.get_mut(&client) {
        Some(c) if !c.rooms.contains(room) => {
            c.rooms.insert(room.to_string());
            c.nick.clone()
        }
        _ => return, // gone, or a duplicate join in the same batch
    };
    let limit = shared.config.presence_limit;
    let r = st.rooms.entry(room.to_string()).or_default();
    let others: Vec<ClientId> = if r.members.len() < limit {
        r.members.iter().copied().collect()
    } else {
        Vec::new()
    };
    r.members.insert(client);
    let topic = r.topic.clone();
    let member_count = r.members.len();
    let presence = Event::new(ServerMsg::Presence {
        room: room.to_string(),
        nick,
        event: PresenceEvent::Join,
    });
    shared.deliver_locked(st, &others, &presence);
    let mut members = member_nicks_upto(st, room, limit);
    members.sort();
    let joined = Event::new(ServerMsg::Joined {
        room: room.to_string(),
        topic,
        member_count,
        members,
        last_id: join.last_id,
        history: join.history.len(),
        truncated: join.truncated,
    });
    shared.deliver_locked(st, &[client], &joined);
    for m in join.history {
        let ev = Event::new(ServerMsg::Message(m));
        shared.deliver_locked(st, &[client], &ev);
    }
}

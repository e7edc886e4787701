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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::frame::{frame_header_len, text_frame};
use super::protocol::{
    ChatMessage, ClientMsg, MessageKind, PresenceEvent, RemoteMember, RoomInfo, ServerMsg, now_ms,
    valid_nick, valid_room,
};
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
    /// A `join` whose `since` vector is out of bounds.
    #[error("bad 'since': {0}")]
    BadSince(String),
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
            HubError::BadSince(_) => "bad_message",
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
    /// Its JSON as a complete WebSocket text frame (server frames are not
    /// masked, so every WebSocket client is sent these same bytes).
    pub frame: Bytes,
}

impl Event {
    /// Wraps and serializes a message.
    pub fn new(msg: ServerMsg) -> Arc<Event> {
        let frame = text_frame(msg.to_json().as_bytes());
        Arc::new(Event { msg, frame })
    }

    /// The JSON form (the frame's payload); its length is what a client's
    /// queue is charged.
    pub fn json(&self) -> &[u8] {
        &self.frame[frame_header_len(&self.frame)..]
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
    /// Members who resumed by `since` from a node ahead of this one: per
    /// origin, the origin id up to which they have already seen messages
    /// this node has not applied yet; those are not delivered to them again.
    floors: HashMap<ClientId, HashMap<String, u64>>,
}

/// Most entries in a `join`'s `since` vector.
pub const MAX_SINCE_ORIGINS: usize = 256;
/// Longest origin name in a `since` vector, in bytes.
pub const MAX_ORIGIN_LEN: usize = 128;

#[derive(Default)]
struct State {
    clients: HashMap<ClientId, Client>,
    nicks: HashMap<String, ClientId>,
    rooms: HashMap<String, Room>,
    shutting_down: bool,
    /// Users connected to other cluster nodes (fed by the cluster relay).
    remote: Remote,
}

/// What this node knows of the users connected to other nodes.
#[derive(Default)]
struct Remote {
    /// Room name → its members on other nodes.
    rooms: HashMap<String, BTreeSet<RemoteMember>>,
    /// Lowercased nick → the remote users carrying it (usually one).
    users: HashMap<String, Vec<RemoteMember>>,
}

impl Remote {
    fn count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, BTreeSet::len)
    }

    fn has_nick(&self, nick: &str) -> bool {
        self.users.contains_key(&nick.to_ascii_lowercase())
    }
}

/// A change of presence on another node, for [`Hub::apply_remote_presence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePresence {
    /// `member` joined `room`.
    Join {
        /// Room name.
        room: String,
        /// Who, and on which node.
        member: RemoteMember,
    },
    /// `member` left `room`; `reason` is set when it did not leave itself.
    Leave {
        /// Room name.
        room: String,
        /// Who, and on which node.
        member: RemoteMember,
        /// E.g. `node down`.
        reason: Option<String>,
    },
    /// A user of `node` changed nick from `old` to `new`.
    Nick {
        /// The node it is connected to.
        node: String,
        /// Old nickname.
        old: String,
        /// New nickname.
        new: String,
    },
}

/// One connected client as the cluster presence snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUser {
    /// The hub's id of the client (stable for its connection).
    pub id: u64,
    /// Its nickname.
    pub nick: String,
    /// The rooms it is in, sorted.
    pub rooms: Vec<String>,
}

/// A direct message to a user of another node, for the cluster relay to carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingDirect {
    /// Sender nick (on this node).
    pub from: String,
    /// Recipient and its node.
    pub to: RemoteMember,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
}

/// Capacity of the queue of direct messages to other nodes.
const OUTGOING_DIRECTS: usize = 1024;

struct Shared {
    config: HubConfig,
    state: Mutex<State>,
    stats: HubStats,
    next_client: AtomicU64,
    reader: Mutex<Store>,
    /// Messages posted on this node, sent once stored (for the cluster relay).
    stored_local: tokio::sync::broadcast::Sender<ChatMessage>,
    /// Bumped whenever a local client connects, leaves, joins, parts or
    /// renames (for the cluster presence snapshot).
    presence: tokio::sync::watch::Sender<u64>,
    /// Direct messages to users of other nodes; the receiver is taken by the relay.
    directs: mpsc::Sender<OutgoingDirect>,
    directs_rx: Mutex<Option<mpsc::Receiver<OutgoingDirect>>>,
    /// This node's cluster origin (`name/TAG`), set once when clustering is
    /// on: local messages are stored and sent with it.
    origin: OnceLock<String>,
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
        /// For [`REMOTE`] messages: origin and origin id, when known.
        origin: Option<(String, u64)>,
    },
    Join {
        client: ClientId,
        room: String,
        after: Option<u64>,
        since: Option<BTreeMap<String, u64>>,
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
                    floors: HashMap::new(),
                },
            );
        }
        let (directs_tx, directs_rx) = mpsc::channel(OUTGOING_DIRECTS);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            stats: HubStats::default(),
            next_client: AtomicU64::new(1),
            reader: Mutex::new(reader),
            stored_local: tokio::sync::broadcast::channel(STORED_LOCAL_CAPACITY).0,
            presence: tokio::sync::watch::channel(0).0,
            directs: directs_tx,
            directs_rx: Mutex::new(Some(directs_rx)),
            origin: OnceLock::new(),
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

    /// Sets this node's cluster origin (once; later calls with another
    /// value are ignored and return false). From then on, local messages are
    /// stored and sent with `origin` and their room id as `origin_id`, and
    /// `join` honours `since`. Call it before clients connect.
    pub fn set_origin(&self, origin: String) -> bool {
        let set = self.shared.origin.get_or_init(|| origin.clone());
        *set == origin
    }

    /// This node's cluster origin, if clustering set one.
    pub fn origin(&self) -> Option<&str> {
        self.shared.origin.get().map(String::as_str)
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
                Some(w)
                    if st.nicks.contains_key(&w.to_ascii_lowercase()) || st.remote.has_nick(w) =>
                {
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
                        if !st.nicks.contains_key(&candidate.to_ascii_lowercase())
                            && !st.remote.has_nick(&candidate)
                        {
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
            self.shared.presence_changed();
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
            kicked: Box::pin(kick.token.clone().cancelled_owned()),
            kick,
        };
        Ok((session, inbox))
    }

    /// Queues a message posted on another node for storage in `room` (created
    /// if new) and delivery to the room's local members, in the order of the
    /// calls; [`Hub::sync_writes`] waits for it to be committed. `origin` is
    /// the node it was posted on and its id there, when known (stored with it
    /// and sent to clients, for resume by `since`).
    /// For the cluster relay; such messages are not sent to [`Hub::stored_local`].
    pub async fn apply_remote(
        &self,
        room: String,
        from: String,
        text: String,
        kind: MessageKind,
        ts: i64,
        origin: Option<(String, u64)>,
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
                origin: origin.filter(|(o, n)| !o.is_empty() && *n > 0),
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
            .map(|(name, r)| {
                let remote = st.remote.count(name);
                RoomInfo {
                    name: name.clone(),
                    members: r.members.len() + remote,
                    topic: r.topic.clone(),
                    last_id: r.last_id,
                    remote,
                }
            })
            .collect();
        // Rooms that so far exist only on other nodes, with members there.
        for (name, members) in &st.remote.rooms {
            if !members.is_empty() && !st.rooms.contains_key(name) {
                v.push(RoomInfo {
                    name: name.clone(),
                    members: members.len(),
                    topic: String::new(),
                    last_id: 0,
                    remote: members.len(),
                });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// This node's connected clients with their rooms, for the cluster
    /// presence snapshot, sorted by id.
    pub fn local_presence(&self) -> Vec<LocalUser> {
        let st = self.lock();
        let mut v: Vec<LocalUser> = st
            .clients
            .iter()
            .filter(|(_, c)| !c.outbox.kick.token.is_cancelled())
            .map(|(&id, c)| LocalUser {
                id,
                nick: c.nick.clone(),
                rooms: c.rooms.iter().cloned().collect(),
            })
            .collect();
        v.sort_by_key(|u| u.id);
        v
    }

    /// A watch bumped whenever [`Hub::local_presence`] may have changed.
    pub fn presence_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.presence.subscribe()
    }

    /// Applies presence changes heard from other nodes, in order: updates the
    /// member lists and tells the local members of each room (as for local
    /// joins, leaves and renames, with the member's node). `users` is every
    /// user connected to another node now (nicks in use elsewhere are refused
    /// here).
    pub fn apply_remote_presence(&self, changes: Vec<RemotePresence>, users: Vec<RemoteMember>) {
        let shared = &self.shared;
        let limit = shared.config.presence_limit;
        let mut st = self.lock();
        st.remote.users.clear();
        for u in users {
            st.remote
                .users
                .entry(u.nick.to_ascii_lowercase())
                .or_default()
                .push(u);
        }
        for change in changes {
            match change {
                RemotePresence::Join { room, member } => {
                    if !st
                        .remote
                        .rooms
                        .entry(room.clone())
                        .or_default()
                        .insert(member.clone())
                    {
                        continue;
                    }
                    let locals = local_members_below(&st, &room, limit, 1);
                    let ev = Event::new(ServerMsg::Presence {
                        room,
                        nick: member.nick,
                        event: PresenceEvent::Join,
                        node: Some(member.node),
                        reason: None,
                    });
                    shared.deliver_locked(&mut st, &locals, &ev);
                }
                RemotePresence::Leave {
                    room,
                    member,
                    reason,
                } => {
                    let Some(set) = st.remote.rooms.get_mut(&room) else {
                        continue;
                    };
                    if !set.remove(&member) {
                        continue;
                    }
                    if set.is_empty() {
                        st.remote.rooms.remove(&room);
                    }
                    let locals = local_members_below(&st, &room, limit, 0);
                    let ev = Event::new(ServerMsg::Presence {
                        room,
                        nick: member.nick,
                        event: PresenceEvent::Leave,
                        node: Some(member.node),
                        reason,
                    });
                    shared.deliver_locked(&mut st, &locals, &ev);
                }
                RemotePresence::Nick { node, old, new } => {
                    let old_m = RemoteMember {
                        nick: old.clone(),
                        node: node.clone(),
                    };
                    let new_m = RemoteMember {
                        nick: new.clone(),
                        node: node.clone(),
                    };
                    let mut recipients: BTreeSet<ClientId> = BTreeSet::new();
                    let State { remote, rooms, .. } = &mut *st;
                    for (room, set) in remote.rooms.iter_mut() {
                        if set.remove(&old_m) {
                            set.insert(new_m.clone());
                            if let Some(r) = rooms.get(room) {
                                recipients.extend(r.members.iter().copied());
                            }
                        }
                    }
                    let recipients: Vec<ClientId> = recipients.into_iter().collect();
                    let ev = Event::new(ServerMsg::Nick {
                        old,
                        new,
                        node: Some(node),
                    });
                    shared.deliver_locked(&mut st, &recipients, &ev);
                }
            }
        }
    }

    /// The receiver of direct messages addressed to users of other nodes;
    /// `None` after the first call (the relay takes it).
    pub fn take_outgoing_directs(&self) -> Option<mpsc::Receiver<OutgoingDirect>> {
        self.shared
            .directs_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Delivers a direct message sent by `from` (a user of node `node`) to
    /// the local user `to`. Returns false if no such user is connected here.
    pub fn deliver_remote_direct(
        &self,
        from: RemoteMember,
        to: &str,
        text: String,
        ts: i64,
    ) -> bool {
        if !valid_nick(to) || !valid_nick(&from.nick) || text.is_empty() {
            return false;
        }
        let mut st = self.lock();
        let Some(&target) = st.nicks.get(&to.to_ascii_lowercase()) else {
            return false;
        };
        // A remote sender whose nick is also in use here is shown as nick@node.
        let from = if st.nicks.contains_key(&from.nick.to_ascii_lowercase()) {
            from.display()
        } else {
            from.nick
        };
        let to = st
            .clients
            .get(&target)
            .map(|c| c.nick.clone())
            .unwrap_or_default();
        let ev = Event::new(ServerMsg::Direct { from, to, text, ts });
        self.shared.deliver_locked(&mut st, &[target], &ev);
        true
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

    /// Tells the cluster presence that the local clients changed.
    fn presence_changed(&self) {
        self.presence.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Puts `ev` in each recipient's queue; a recipient whose queue is full is
    /// disconnected as lagging (and its departure announced).
    fn deliver_locked(&self, st: &mut State, to: &[ClientId], ev: &Arc<Event>) {
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
    fn remove_locked(&self, st: &mut State, id: ClientId) {
        let Some(c) = st.clients.remove(&id) else {
            return;
        };
        st.nicks.remove(&c.nick.to_ascii_lowercase());
        self.presence_changed();
        for room in &c.rooms {
            let remote = st.remote.count(room);
            let members: Vec<ClientId> = match st.rooms.get_mut(room) {
                Some(r) => {
                    r.members.remove(&id);
                    r.floors.remove(&id);
                    if r.members.len() + remote >= self.config.presence_limit {
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
                node: None,
                reason: None,
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
                    self.bytes.fetch_sub(ev.json().len(), Ordering::Relaxed);
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
        self.bytes.fetch_sub(ev.json().len(), Ordering::Relaxed);
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
    /// [`MAX_SINCE_ORIGINS`] entries, names of at most [`MAX_ORIGIN_LEN`] bytes.
    pub async fn resume(
        &self,
        room: &str,
        after: Option<u64>,
        since: Option<BTreeMap<String, u64>>,
    ) -> Result<(), HubError> {
        if let Some(v) = &since {
            if v.len() > MAX_SINCE_ORIGINS {
                return Err(HubError::BadSince(format!(
                    "{} origins; at most {MAX_SINCE_ORIGINS}",
                    v.len()
                )));
            }
            if let Some(o) = v.keys().find(|o| o.is_empty() || o.len() > MAX_ORIGIN_LEN) {
                return Err(HubError::BadSince(format!(
                    "origin '{}' must be 1 to {MAX_ORIGIN_LEN} bytes",
                    truncate(o)
                )));
            }
        }
        // Without an origin (clustering off) no message has one: resume by id.
        let since = since.filter(|_| self.hub.shared.origin.get().is_some());
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
            since,
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
        let remote = st.remote.count(room);
        let members: Vec<ClientId> = match st.rooms.get_mut(room) {
            Some(r) => {
                r.members.remove(&self.id);
                r.floors.remove(&self.id);
                if r.members.len() + remote < limit {
                    r.members.iter().copied().collect()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        let shared = &self.hub.shared;
        shared.presence_changed();
        let ev = Event::new(ServerMsg::Presence {
            room: room.to_string(),
            nick,
            event: PresenceEvent::Leave,
            node: None,
            reason: None,
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
            origin: None,
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

    /// A direct message to a user of another node (`nick`, or `nick@node`
    /// to pick one among users of the same nick): handed to the cluster
    /// relay and echoed to the sender.
    fn direct_remote(&self, st: &mut State, to: &str, text: String) -> Result<(), HubError> {
        let (nick, node) = match to.split_once('@') {
            Some((n, node)) => (n, Some(node)),
            None => (to, None),
        };
        let target = st
            .remote
            .users
            .get(&nick.to_ascii_lowercase())
            .and_then(|us| us.iter().find(|u| node.is_none_or(|n| u.node == n)))
            .cloned();
        let Some(target) = target else {
            return Err(HubError::NoSuchUser(truncate(to)));
        };
        let from = st
            .clients
            .get(&self.id)
            .map(|c| c.nick.clone())
            .unwrap_or_default();
        let ts = now_ms();
        let shown = if node.is_some() {
            target.display()
        } else {
            target.nick.clone()
        };
        let out = OutgoingDirect {
            from: from.clone(),
            to: target,
            text: text.clone(),
            ts,
        };
        if self.hub.shared.directs.try_send(out).is_err() {
            // No relay (clustering off) or its queue is full.
            return Err(HubError::NoSuchUser(truncate(to)));
        }
        let ev = Event::new(ServerMsg::Direct {
            from,
            to: shown,
            text,
            ts,
        });
        self.hub.shared.deliver_locked(st, &[self.id], &ev);
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
        // In use on another node (as far as this node knows).
        if st.remote.has_nick(nick) && !st.nicks.contains_key(&key) {
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
            node: None,
        });
        self.hub.shared.presence_changed();
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

/// At most `max` member nicks of `room`, local ones first, sorted, and which
/// of them are on other nodes.
fn member_nicks_upto(st: &State, room: &str, max: usize) -> (Vec<String>, Vec<RemoteMember>) {
    let mut v: Vec<String> = st
        .rooms
        .get(room)
        .map(|r| {
            r.members
                .iter()
                .filter_map(|id| st.clients.get(id).map(|c| c.nick.clone()))
                .take(max)
                .collect()
        })
        .unwrap_or_default();
    let remote: Vec<RemoteMember> = st
        .remote
        .rooms
        .get(room)
        .map(|set| {
            set.iter()
                .take(max.saturating_sub(v.len()))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    v.extend(remote.iter().map(|m| m.nick.clone()));
    v.sort();
    (v, remote)
}

/// Every member nick of `room` (on every node), sorted, and which are remote.
fn member_nicks(st: &State, room: &str) -> (Vec<String>, Vec<RemoteMember>) {
    member_nicks_upto(st, room, usize::MAX)
}

/// The local members of `room` who get presence events, given that the
/// room has `extra` more members than counted now: none above the presence limit.
fn local_members_below(st: &State, room: &str, limit: usize, extra: usize) -> Vec<ClientId> {
    let Some(r) = st.rooms.get(room) else {
        return Vec::new();
    };
    let total = r.members.len() + st.remote.count(room);
    if total.saturating_sub(extra) >= limit {
        return Vec::new();
    }
    r.members.iter().copied().collect()
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
    /// `since` entries this node is behind on (see [`Room::floors`]).
    behind: Vec<(String, u64)>,
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
                origin,
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
                    origin: message_origin(shared, *client, origin, *id),
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
        let WriteCmd::Join {
            room, after, since, ..
        } = cmd
        else {
            joins.push(None);
            continue;
        };
        // On a failed commit the batch's messages do not exist.
        let upto = if failure.is_some() {
            last_ids.get(room).copied().unwrap_or(0)
        } else {
            upto
        };
        if let Some(seen) = since {
            let found = store
                .since(room, seen, upto, cfg.resume_max)
                .unwrap_or_else(|e| {
                    tracing::error!("chat: cannot read history of {room}: {e}");
                    Default::default()
                });
            joins.push(Some(PreparedJoin {
                history: found.messages,
                truncated: found.truncated,
                last_id: upto,
                behind: found.behind,
            }));
            continue;
        }
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
            behind: Vec::new(),
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
                origin,
            } => {
                if let Some(err) = &failure {
                    let ev = Event::new(HubError::Store(err.clone()).to_msg());
                    shared.deliver_locked(&mut st, &[*client], &ev);
                    continue;
                }
                stored += 1;
                let origin = message_origin(shared, *client, origin, id);
                let msg = ChatMessage {
                    room: room.clone(),
                    id,
                    from: from.clone(),
                    text: text.clone(),
                    ts: *ts,
                    kind: *kind,
                    origin: origin.map(|o| o.0.into()),
                    origin_id: origin.map_or(0, |o| o.1),
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
                        if r.floors.is_empty() {
                            r.members.iter().copied().collect()
                        } else {
                            members_past_floors(r, origin)
                        }
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

/// The origin a message is stored and sent with: for one applied from
/// another node, what the relay gave; for a local one, this node's origin
/// (if clustering is on) and its room id.
fn message_origin<'a>(
    shared: &'a Shared,
    client: ClientId,
    remote: &'a Option<(String, u64)>,
    id: u64,
) -> Option<(&'a str, u64)> {
    if client == REMOTE {
        remote.as_ref().map(|(o, n)| (o.as_str(), *n))
    } else {
        shared.origin.get().map(|o| (o.as_str(), id))
    }
}

/// The members of `r` a message from `origin` goes to: all but those who
/// already saw it on another node (see [`Room::floors`]). A floor is dropped
/// once this node reaches it.
fn members_past_floors(r: &mut Room, origin: Option<(&str, u64)>) -> Vec<ClientId> {
    let Some((o, n)) = origin else {
        return r.members.iter().copied().collect();
    };
    let mut skip = Vec::new();
    r.floors.retain(|&client, floors| {
        if let Some(&floor) = floors.get(o) {
            if n <= floor {
                skip.push(client);
            }
            if n >= floor {
                floors.remove(o);
            }
        }
        !floors.is_empty()
    });
    r.members
        .iter()
        .copied()
        .filter(|c| !skip.contains(c))
        .collect()
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
    let remote = st.remote.count(room);
    let r = st.rooms.entry(room.to_string()).or_default();
    let others: Vec<ClientId> = if r.members.len() + remote < limit {
        r.members.iter().copied().collect()
    } else {
        Vec::new()
    };
    r.members.insert(client);
    if join.behind.is_empty() {
        r.floors.remove(&client);
    } else {
        r.floors.insert(client, join.behind.into_iter().collect());
    }
    let topic = r.topic.clone();
    let member_count = r.members.len() + remote;
    shared.presence_changed();
    let presence = Event::new(ServerMsg::Presence {
        room: room.to_string(),
        nick,
        event: PresenceEvent::Join,
        node: None,
        reason: None,
    });
    shared.deliver_locked(st, &others, &presence);
    let (members, remote) = member_nicks_upto(st, room, limit);
    let joined = Event::new(ServerMsg::Joined {
        room: room.to_string(),
        topic,
        member_count,
        members,
        remote,
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

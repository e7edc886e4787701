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
//!   silently skipped and never slows the room. A client's own requests are
//!   held back instead ([`Session::room_for_replies`]): a client that sends
//!   faster than it reads is slowed, not called lagging.
//! - A client's requests take effect in the order it sent them
//!   ([`Session::settle`]); the hub keeps its current room.
//!
//! Files: this one holds the [`Hub`] handle, its configuration, errors and
//! queries; `session` what one client does, `deliver` the per-client queues
//! and kicks, `writer` the writer thread, `remote` what a cluster adds
//! (members, messages and direct messages from other nodes), and `files`
//! the upload tickets and file messages.

mod abuse_limits;
mod account_log;
mod deliver;
mod error;
mod files;
mod history;
mod joins;
mod log;
mod login;
mod moderation;
mod moderation_change;
mod moderation_cmds;
mod moderation_sync;
mod origin;
mod remote;
mod session;
mod writer;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::accounts::Accounts;
use super::auth::{AuthConfig, AuthMode, LoginLimiter};
use super::frame::{frame_header_len, text_frame};
use super::moderation::ModerationConfig;
use super::names::name_key;
use super::protocol::{RemoteMember, RoomInfo, ServerMsg, valid_nick};
use super::store::{Store, StoreError};
use deliver::Outbox;
use remote::{OUTGOING_DIRECTS, Remote};
use writer::Queued;

pub use account_log::{AccountLog, ClaimError};
pub use error::{DisconnectReason, HubError};
pub use files::{TICKET_LIFETIME, TicketError, Uploader, plausible_file};
pub use history::{HistoryVersion, RECHECK};
pub use log::{LoggedPost, RoomLog, TopicChange};
pub use remote::{LocalUser, MAX_ORIGIN_LEN, MAX_SINCE_ORIGINS, OutgoingDirect, RemotePresence};
pub use session::{Inbox, Received, Session};
pub use writer::HubWriter;

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
    /// Accounts, application tokens and the login limit.
    pub auth: AuthConfig,
    /// Server admins and the abuse limits (off by default).
    pub moderation: ModerationConfig,
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
            auth: AuthConfig::default(),
            moderation: ModerationConfig::default(),
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

struct Client {
    nick: String,
    outbox: Outbox,
    rooms: BTreeSet<String>,
    /// The room joined last that the client is still in (where the line
    /// protocol's plain text goes): kept here, applied in order with the
    /// joins, so no adapter keeps a copy that could disagree.
    current: Option<String>,
    /// The name key the client is logged in as (by password, session or
    /// application token); it may hold that nick even when it is registered.
    login: Option<String>,
    /// The address it connects from, when the adapter knows it (for
    /// address bans).
    peer: Option<std::net::IpAddr>,
}

#[derive(Default)]
struct Room {
    members: BTreeSet<ClientId>,
    topic: String,
    /// Who set the topic, and when and where (the later one wins across a
    /// gossip cluster).
    topic_by: String,
    topic_stamp: crate::chat::store::TopicStamp,
    last_id: u64,
    /// Members who resumed by `since` from a node ahead of this one: per
    /// origin, the origin id up to which they have already seen messages
    /// this node has not applied yet; those are not delivered to them again.
    floors: HashMap<ClientId, HashMap<String, u64>>,
    /// Operators, voice, mutes, bans and modes ([`moderation`]).
    rules: moderation::Rules,
}

#[derive(Default)]
struct State {
    clients: HashMap<ClientId, Client>,
    nicks: HashMap<String, ClientId>,
    rooms: HashMap<String, Room>,
    shutting_down: bool,
    /// Users connected to other cluster nodes (fed by the cluster relay).
    remote: Remote,
    /// Name keys of the registered nicks.
    registered: HashSet<String>,
    /// Each room's name key and name: a new room may not look like an old one.
    room_keys: HashMap<String, String>,
}

impl State {
    /// The room `name`, created (and its name key recorded) if new.
    fn room_mut(&mut self, name: &str) -> &mut Room {
        if !self.rooms.contains_key(name) {
            self.room_keys
                .entry(name_key(name))
                .or_insert_with(|| name.to_string());
        }
        self.rooms.entry(name.to_string()).or_default()
    }

    /// True if the client `id` may hold a nick with name key `key`: it is
    /// not registered, or the client is logged in as it.
    fn may_hold(&self, id: ClientId, key: &str) -> bool {
        !self.registered.contains(key)
            || self
                .clients
                .get(&id)
                .is_some_and(|c| c.login.as_deref() == Some(key))
    }
}

struct Shared {
    config: HubConfig,
    state: Mutex<State>,
    stats: HubStats,
    next_client: AtomicU64,
    reader: Mutex<Store>,
    /// A connection only for `PRAGMA data_version` ([`Hub::history_version_now`]):
    /// never held for a page, so asking it does not wait behind the reader.
    versions: Mutex<history::VersionProbe>,
    /// The newest log sequence of messages posted on this node, set after
    /// each commit (for the cluster relay, which reads them from the store).
    local_seq: tokio::sync::watch::Sender<u64>,
    /// Bumped whenever a local client connects, leaves, joins, parts or
    /// renames (for the cluster presence snapshot).
    presence: tokio::sync::watch::Sender<u64>,
    /// Direct messages to users of other nodes; the receiver is taken by the relay.
    directs: mpsc::Sender<OutgoingDirect>,
    directs_rx: Mutex<Option<mpsc::Receiver<OutgoingDirect>>>,
    /// This node's cluster origin (`name/TAG`), set once when clustering is
    /// on: local messages are stored and sent with it.
    origin: OnceLock<String>,
    /// The external message log room messages go through (broker mode).
    room_log: OnceLock<Arc<dyn log::RoomLog>>,
    /// The runtime the room log was set from (the writer thread has none).
    log_rt: OnceLock<tokio::runtime::Handle>,
    /// The log registrations are claimed in (broker mode).
    account_log: OnceLock<Arc<dyn account_log::AccountLog>>,
    /// Bumped whenever a nick becomes registered here.
    accounts_changed: tokio::sync::watch::Sender<u64>,
    /// Bumped whenever a session from another hub is applied here.
    sessions_changed: tokio::sync::watch::Sender<u64>,
    /// The newest sequence of that log applied here.
    logged: tokio::sync::watch::Sender<u64>,
    /// Topics set here, for the broker to carry to other hubs (once taken).
    topics_out: OnceLock<mpsc::Sender<log::TopicChange>>,
    /// The random key upload tickets are signed with ([`files`]).
    ticket_key: [u8; 32],
    /// Registered nicks (with `--chat-auth accounts` or `required`).
    accounts: Option<Arc<Accounts>>,
    /// Password logins per account and per address.
    limiter: LoginLimiter,
    /// Password hashes computed at once (each takes 19 MiB and a core).
    login_slots: tokio::sync::Semaphore,
    /// The writer's queue, for changes the hub makes itself (an operator it
    /// chooses); weak, so that the writer still ends when the last handle goes.
    writer: OnceLock<mpsc::WeakSender<Queued>>,
    /// Guest nicks per address.
    guests: moderation::GuestLimiter,
}

/// A cheap-to-clone handle to a running hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Queued>,
}

impl Hub {
    /// Opens the history in `data_dir` and starts the writer thread.
    /// A relay store left by an older version is moved into the history first
    /// ([`Store::import_relay_store`]).
    pub fn open(data_dir: &Path, config: HubConfig) -> Result<(Hub, HubWriter), StoreError> {
        let mut writer_store = Store::open_in(data_dir)?;
        if let Some(r) = writer_store.import_relay_store(data_dir)? {
            tracing::info!(
                keyed = r.keyed,
                legacy = r.legacy,
                added = r.added,
                present = r.present,
                skipped = r.skipped,
                "chat: the relay store of an older version is now part of the history; renamed to relay.sqlite3.migrated"
            );
        }
        writer_store.disable_autocheckpoint()?;
        let reader = Store::open_in(data_dir)?;
        let versions = Store::open_in(data_dir)?;
        let checkpointer = Store::open_in(data_dir)?;
        let mut state = State::default();
        let accounts = match config.auth.mode {
            AuthMode::Open => None,
            _ => Some(Arc::new(Accounts::open_in(
                data_dir,
                config.auth.session_ttl,
            )?)),
        };
        if let Some(a) = &accounts {
            state.registered = a.registered_keys()?.into_iter().collect();
        }
        let mut rules = writer_store.room_rules()?;
        for r in writer_store.rooms()? {
            state
                .room_keys
                .entry(name_key(&r.name))
                .or_insert_with(|| r.name.clone());
            let room_rules = rules.remove(&r.name).unwrap_or_default();
            state.rooms.insert(
                r.name,
                Room {
                    members: BTreeSet::new(),
                    topic: r.topic,
                    topic_by: r.topic_by,
                    topic_stamp: r.topic_stamp,
                    last_id: r.last_id,
                    floors: HashMap::new(),
                    rules: moderation::Rules::from_stored(room_rules),
                },
            );
        }
        let (directs_tx, directs_rx) = mpsc::channel(OUTGOING_DIRECTS);
        let limiter = LoginLimiter::new(config.auth.logins_per_minute);
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        let guests = moderation::GuestLimiter::new(config.moderation.guests_per_minute);
        let shared = Arc::new(Shared {
            guests,
            writer: OnceLock::new(),
            config,
            accounts,
            limiter,
            login_slots: tokio::sync::Semaphore::new(slots),
            state: Mutex::new(state),
            stats: HubStats::default(),
            next_client: AtomicU64::new(1),
            reader: Mutex::new(reader),
            versions: Mutex::new(history::VersionProbe::new(versions)),
            local_seq: tokio::sync::watch::channel(0).0,
            presence: tokio::sync::watch::channel(0).0,
            directs: directs_tx,
            directs_rx: Mutex::new(Some(directs_rx)),
            origin: OnceLock::new(),
            room_log: OnceLock::new(),
            log_rt: OnceLock::new(),
            account_log: OnceLock::new(),
            accounts_changed: tokio::sync::watch::channel(0).0,
            sessions_changed: tokio::sync::watch::channel(0).0,
            logged: tokio::sync::watch::channel(0).0,
            topics_out: OnceLock::new(),
            ticket_key: rand::random(),
        });
        let (writer, handle) = writer::start(shared.clone(), writer_store, checkpointer);
        let _ = shared.writer.set(writer.downgrade());
        Ok((Hub { shared, writer }, handle))
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
        self.connect_from(wanted, None)
    }

    /// [`Hub::connect`] for a client at address `peer` (per-address limits:
    /// guest nicks per minute, logins, address bans).
    pub fn connect_from(
        &self,
        wanted: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(Session, Inbox), HubError> {
        let cfg = &self.shared.config;
        let (outbox, rx) = Outbox::new(cfg.queue_messages, cfg.queue_bytes);
        let id = {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(HubError::ShuttingDown);
            }
            if st.clients.len() >= cfg.max_clients {
                return Err(HubError::Full(cfg.max_clients));
            }
            let id = self.shared.next_client.fetch_add(1, Ordering::Relaxed);
            let (nick, refusal) = pick_nick(&st, id, wanted);
            if wanted.is_none() || refusal.is_some() {
                self.shared.guests.guest(peer)?;
            }
            st.nicks.insert(name_key(&nick), id);
            st.clients.insert(
                id,
                Client {
                    nick: nick.clone(),
                    outbox: outbox.clone(),
                    rooms: BTreeSet::new(),
                    current: None,
                    login: None,
                    peer,
                },
            );
            let welcome = Event::new(ServerMsg::Welcome { nick });
            self.deliver_locked(&mut st, id, &welcome);
            if let Some(e) = &refusal {
                self.deliver_locked(&mut st, id, &Event::new(e.to_msg()));
            }
            self.shared.presence_changed();
            id
        };
        let stats = &self.shared.stats;
        let now = stats.clients.fetch_add(1, Ordering::Relaxed) + 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("netkit_chat_clients").set(now as f64);
        metrics::counter!("netkit_chat_connections_total").increment(1);
        let mut session = Session::new(self.clone(), id, outbox.clone());
        if let Some(ip) = peer {
            session.set_peer(ip);
        }
        Ok((session, Inbox::new(rx, outbox)))
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
                    invite_only: r.rules.invite_only,
                    moderated: r.rules.moderated,
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
                    invite_only: false,
                    moderated: false,
                });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store connection readers share (locked: callers block on SQLite).
    fn reader(&self) -> MutexGuard<'_, Store> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the relay that this node's log goes up to sequence `seq`.
    fn local_log_reaches(&self, seq: u64) {
        self.local_seq.send_if_modified(|v| {
            let newer = *v < seq;
            *v = (*v).max(seq);
            newer
        });
    }

    /// Moves [`Shared::logged`] to the newest external-log entry of a
    /// committed batch (stored now, or stored before and dropped as a duplicate).
    fn logged_reaches(&self, batch: &[writer::WriteCmd]) {
        let newest = batch
            .iter()
            .filter_map(|cmd| match cmd {
                writer::WriteCmd::Say(writer::Post {
                    origin: Some(o), ..
                }) if o.keep_id => Some(o.seq),
                _ => None,
            })
            .max();
        if let Some(seq) = newest {
            self.logged.send_if_modified(|v| {
                let newer = *v < seq;
                *v = (*v).max(seq);
                newer
            });
        }
    }

    /// Tells the cluster presence that the local clients changed.
    fn presence_changed(&self) {
        self.presence.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// The nick a connecting client gets: `wanted` if it is valid and free (on
/// this node and, as far as it knows, on others), else a free guest name,
/// with the reason `wanted` was refused.
fn pick_nick(st: &State, id: ClientId, wanted: Option<&str>) -> (String, Option<HubError>) {
    let refusal = match wanted {
        Some(w) if !valid_nick(w) => Some(HubError::bad_nick(w)),
        Some(w) if st.nicks.contains_key(&name_key(w)) || st.remote.has_nick(w) => {
            Some(HubError::NickTaken(w.to_string()))
        }
        Some(w) if st.registered.contains(&name_key(w)) => {
            Some(HubError::NickRegistered(w.to_string()))
        }
        _ => None,
    };
    if let (Some(w), None) = (wanted, &refusal) {
        return (w.to_string(), None);
    }
    (guest_nick(st, id), refusal)
}

/// A free guest name for client `id`: `guest-ID`, or another if that is
/// in use or registered.
fn guest_nick(st: &State, id: ClientId) -> String {
    let mut n = id;
    loop {
        let candidate = format!("guest-{n}");
        let key = name_key(&candidate);
        if !st.nicks.contains_key(&key)
            && !st.registered.contains(&key)
            && !st.remote.has_nick(&candidate)
        {
            return candidate;
        }
        n += 1_000_000;
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

//! What the hub knows of other cluster nodes, without knowing how they are
//! reached: messages posted elsewhere ([`Hub::apply_remote`]), members and
//! renames there ([`Hub::apply_remote_presence`]), direct messages both ways,
//! this node's own presence and how far its log goes ([`Hub::local_seq`]) for
//! the relay, and the per-origin floors of clients resuming by `since`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::deliver::local_members_below;
use super::origin::{REMOTE, RemoteOrigin};
use super::writer::{Post, WriteCmd};
use super::{ClientId, Event, Hub, HubError, Session, Shared, State, truncate};
use crate::chat::names::name_key;
use crate::chat::protocol::{
    PresenceEvent, RemoteMember, ServerMsg, now_ms, valid_nick, valid_room,
};
use crate::chat::store::LogMessage;

/// Capacity of the queue of direct messages to other nodes.
pub(super) const OUTGOING_DIRECTS: usize = 1024;

/// Most entries in a `join`'s `since` vector.
pub const MAX_SINCE_ORIGINS: usize = 256;

/// Longest origin name in a `since` vector, in bytes.
pub const MAX_ORIGIN_LEN: usize = 128;

/// What this node knows of the users connected to other nodes.
#[derive(Default)]
pub(super) struct Remote {
    /// Room name → its members on other nodes.
    pub(super) rooms: HashMap<String, BTreeSet<RemoteMember>>,
    /// Lowercased nick → the remote users carrying it (usually one).
    pub(super) users: HashMap<String, Vec<RemoteMember>>,
}

impl Remote {
    pub(super) fn count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, BTreeSet::len)
    }

    pub(super) fn has_nick(&self, nick: &str) -> bool {
        self.users.contains_key(&name_key(nick))
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

impl Hub {
    /// Sets this node's cluster origin (once; later calls with another
    /// value are ignored and return false). From then on, local messages are
    /// stored and sent with `origin` and their room id as `origin_id`, and
    /// `join` honours `since`. Call it before clients connect.
    pub fn set_origin(&self, origin: String) -> bool {
        let set = self.shared.origin.get_or_init(|| origin.clone());
        if *set != origin {
            return false;
        }
        let last = self.shared.reader().last_seq(set).unwrap_or_else(|e| {
            tracing::warn!("chat: {e}");
            0
        });
        self.shared.local_log_reaches(last);
        true
    }

    /// This node's cluster origin, if clustering set one.
    pub fn origin(&self) -> Option<&str> {
        self.shared.origin.get().map(String::as_str)
    }

    /// Queues a message posted on another node for storage in its room
    /// (created if new) and delivery to the room's local members, in the
    /// order of the calls; [`Hub::sync_writes`] waits for it to be committed.
    /// It is stored with its origin and sequence (its key in the cluster
    /// log): if a message with that key is stored already, this one is
    /// dropped in the same transaction and nobody sees it twice. Its origin
    /// id (when known) is sent to clients, for resume by `since`.
    /// For the cluster relay; such messages do not move [`Hub::local_seq`].
    pub async fn apply_remote(&self, m: LogMessage) -> Result<(), HubError> {
        if !valid_room(&m.room) {
            return Err(HubError::bad_room(&m.room));
        }
        let origin = (!m.origin.is_empty() && m.seq > 0).then_some(RemoteOrigin {
            name: m.origin,
            seq: m.seq,
            id: m.origin_id,
            keep_id: false,
        });
        self.writer
            .send((
                WriteCmd::Say(Post {
                    client: REMOTE,
                    room: m.room,
                    from: m.from,
                    text: m.text,
                    kind: m.kind,
                    ts: m.ts,
                    origin,
                    file: carried_file(m.file.as_deref()),
                    moderation: m.moderation,
                }),
                None,
            ))
            .await
            .map_err(|_| HubError::ShuttingDown)
    }

    /// Waits until every write queued before this call (messages from
    /// [`Hub::apply_remote`] included) has been committed or has failed.
    pub async fn sync_writes(&self) -> Result<(), HubError> {
        let done = Arc::new(tokio::sync::Notify::new());
        self.writer
            .send((WriteCmd::Sync(done.clone()), None))
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        done.notified().await;
        Ok(())
    }

    /// The newest sequence number of this node's origin in its log (as of
    /// [`Hub::set_origin`], then bumped after each commit of messages posted
    /// here; 0 without an origin). The relay reads the messages themselves from the store
    /// ([`crate::chat::store::Store::log_after`]), so it may fall behind by
    /// any number and still send every one.
    pub fn local_seq(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.local_seq.subscribe()
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
        let mut st = self.lock();
        // Rebuilt on every change: a nick already held keeps its key (the
        // look-alike key is Unicode work, and a snapshot repeats hundreds).
        let old = std::mem::take(&mut st.remote.users);
        let mut keys: HashMap<&str, &str> = HashMap::with_capacity(old.len());
        for (key, members) in &old {
            for m in members {
                keys.insert(&m.nick, key);
            }
        }
        let mut by_key: HashMap<String, Vec<RemoteMember>> = HashMap::with_capacity(users.len());
        for u in users {
            let key = keys
                .get(u.nick.as_str())
                .map_or_else(|| name_key(&u.nick), |k| (*k).to_string());
            by_key.entry(key).or_default().push(u);
        }
        drop(keys);
        st.remote.users = by_key;
        for change in changes {
            match change {
                RemotePresence::Join { room, member } => remote_join(shared, &mut st, room, member),
                RemotePresence::Leave {
                    room,
                    member,
                    reason,
                } => remote_leave(shared, &mut st, room, member, reason),
                RemotePresence::Nick { node, old, new } => {
                    remote_nick(shared, &mut st, node, old, new)
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
        let Some(&target) = st.nicks.get(&name_key(to)) else {
            return false;
        };
        // A remote sender whose nick is also in use here is shown as nick@node.
        let from = if st.nicks.contains_key(&name_key(&from.nick)) {
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
}

/// `member` of another node joined `room`: tell the local members (unless
/// the room is over the presence limit, or the join was known already).
fn remote_join(shared: &Shared, st: &mut State, room: String, member: RemoteMember) {
    if !st
        .remote
        .rooms
        .entry(room.clone())
        .or_default()
        .insert(member.clone())
    {
        return;
    }
    let locals = local_members_below(st, &room, shared.config.presence_limit, 1);
    let ev = Event::new(ServerMsg::Presence {
        room,
        nick: member.nick,
        event: PresenceEvent::Join,
        node: Some(member.node),
        reason: None,
    });
    shared.deliver_locked(st, &locals, &ev);
}

/// `member` of another node left `room`, for `reason` when it did not leave
/// itself: tell the local members (as for a join).
fn remote_leave(
    shared: &Shared,
    st: &mut State,
    room: String,
    member: RemoteMember,
    reason: Option<String>,
) {
    let Some(set) = st.remote.rooms.get_mut(&room) else {
        return;
    };
    if !set.remove(&member) {
        return;
    }
    if set.is_empty() {
        st.remote.rooms.remove(&room);
    }
    let locals = local_members_below(st, &room, shared.config.presence_limit, 0);
    let ev = Event::new(ServerMsg::Presence {
        room,
        nick: member.nick,
        event: PresenceEvent::Leave,
        node: Some(member.node),
        reason,
    });
    shared.deliver_locked(st, &locals, &ev);
}

/// A user of `node` renamed from `old` to `new`: update every room it is in
/// and tell the local members of those rooms.
fn remote_nick(shared: &Shared, st: &mut State, node: String, old: String, new: String) {
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
    shared.deliver_locked(st, &recipients, &ev);
}

impl Session {
    /// A direct message to a user of another node (`nick`, or `nick@node`
    /// to pick one among users of the same nick): handed to the cluster
    /// relay and echoed to the sender.
    pub(super) fn direct_remote(
        &self,
        st: &mut State,
        to: &str,
        text: String,
    ) -> Result<(), HubError> {
        let (nick, node) = match to.split_once('@') {
            Some((n, node)) => (n, Some(node)),
            None => (to, None),
        };
        let target = st
            .remote
            .users
            .get(&name_key(nick))
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
}

/// Checks a `join`'s `since` vector: at most [`MAX_SINCE_ORIGINS`] entries,
/// origin names of 1 to [`MAX_ORIGIN_LEN`] bytes.
pub(super) fn check_since(since: &BTreeMap<String, u64>) -> Result<(), HubError> {
    if since.len() > MAX_SINCE_ORIGINS {
        return Err(HubError::BadSince(format!(
            "{} origins; at most {MAX_SINCE_ORIGINS}",
            since.len()
        )));
    }
    if let Some(o) = since
        .keys()
        .find(|o| o.is_empty() || o.len() > MAX_ORIGIN_LEN)
    {
        return Err(HubError::BadSince(format!(
            "origin '{}' must be 1 to {MAX_ORIGIN_LEN} bytes",
            truncate(o)
        )));
    }
    Ok(())
}

/// The file of a file message relayed from another node (its JSON), if it
/// reads as one a hub could have posted; anything else leaves a text message.
fn carried_file(json: Option<&str>) -> Option<Box<super::files::FileShare>> {
    let file: crate::chat::protocol::FileRef = serde_json::from_str(json?).ok()?;
    if !super::plausible_file(&file) {
        tracing::warn!("cluster: a relayed file message's file is malformed; shown as text");
        return None;
    }
    Some(Box::new(super::files::FileShare::carried(file)))
}

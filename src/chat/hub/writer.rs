//! The writer thread: takes room messages, joins and topics in batches, and
//! for each batch checks membership in order, writes it in one transaction
//! (room ids, and in a cluster this node's log sequence, assigned as each
//! message is stored; a message from another node already stored dies
//! there), then applies it (fan-out, joins with their history, topics) and
//! tells the relay how far this node's log goes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::joins::{PreparedJoin, apply_join, prepare_joins};
use super::moderation::ModWrite;
use super::moderation_sync;
use super::origin::{REMOTE, RemoteOrigin, members_past_floors, message_origin};
use super::{ClientId, Event, HubError, Shared, State, truncate};
use crate::chat::protocol::{ChatMessage, MessageKind, ServerMsg, now_ms};
use crate::chat::store::{Batch, NewMessage, Origin, Store, StoreError, TopicStamp};

const WRITE_QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;

/// A room message waiting to be stored: from a local client, or posted on
/// another node (then its client is [`REMOTE`]).
pub(super) struct Post {
    pub(super) client: ClientId,
    pub(super) room: String,
    pub(super) from: String,
    pub(super) text: String,
    pub(super) kind: MessageKind,
    pub(super) ts: i64,
    /// For [`REMOTE`] messages: where it comes from in the cluster log.
    pub(super) origin: Option<RemoteOrigin>,
    /// For a file message: the file, and who waits to hear how it went.
    pub(super) file: Option<Box<super::files::FileShare>>,
    /// For a moderation notice: the change it records, as JSON
    /// ([`super::moderation_sync::ModAction`]); applied here too when the
    /// notice comes from another hub.
    pub(super) moderation: Option<String>,
}

/// A command for the writer thread.
pub(super) enum WriteCmd {
    /// Notified once every command queued before it is committed ([`super::Hub::sync_writes`]).
    Sync(Arc<tokio::sync::Notify>),
    /// Store a room message and send it to the room.
    Say(Post),
    /// Join a room, with history after `after` or what `since` has not seen.
    Join {
        client: ClientId,
        room: String,
        after: Option<u64>,
        since: Option<BTreeMap<String, u64>>,
    },
    /// Set a room's topic.
    Topic {
        client: ClientId,
        room: String,
        topic: String,
        /// Who set it.
        by: String,
        /// When and where it was set.
        stamp: TopicStamp,
        /// A topic from another node of a gossip cluster: it replaces only
        /// a topic with an older stamp (else nothing is stored or shown).
        newer_only: bool,
    },
    /// A moderation change and its notice ([`super::moderation`]).
    Moderate(Box<super::moderation::ModWrite>),
}

/// A command as queued for the writer, with (for a local client's command)
/// the sender whose drop, once the command's batch is applied, tells the
/// client that the command has taken effect ([`super::Session::settle`]).
pub(super) type Queued = (WriteCmd, Option<oneshot::Sender<()>>);

/// The hub's writer thread; join it after the last [`Hub`](super::Hub) clone is dropped to
/// be sure the last batch is committed.
pub struct HubWriter(std::thread::JoinHandle<()>);

impl HubWriter {
    /// Waits (blocking) for the writer thread to finish.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

/// Starts the writer thread on `store`, and a thread that checkpoints the
/// database with `checkpointer` every second until the writer ends.
pub(super) fn start(
    shared: Arc<Shared>,
    store: Store,
    checkpointer: Store,
) -> (mpsc::Sender<Queued>, HubWriter) {
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("chat-writer".into())
        .spawn(move || {
            writer_loop(shared, store, rx);
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
    (tx, HubWriter(handle))
}

/// What the writer keeps between batches: each room's newest id, and the
/// newest sequence of this node's origin in the log (read from the store at
/// the first local message once clustering has set the origin).
#[derive(Clone, Default)]
struct Heads {
    ids: HashMap<String, u64>,
    local_seq: Option<u64>,
}

/// A batch after its commit: per command whether it was allowed and its id
/// (a message's id, 0 for a duplicate from another node; for a join the
/// room's newest id as of its place in the batch; else 0), and the commit's
/// error if it failed.
pub(super) struct Outcome {
    allowed: Vec<bool>,
    /// By place in the batch: the id each command got (0: none).
    pub(super) ids: Vec<u64>,
    /// Why the batch's commit failed, if it did.
    pub(super) failure: Option<String>,
    /// By place in the batch: the moderation changes that notices from
    /// other hubs carried, stored with them, to apply after theirs.
    changes: HashMap<usize, ModWrite>,
}

/// The writer thread: takes commands in batches, assigns ids, commits the batch
/// in one transaction, then applies it (fan-out, joins, topics) in order.
fn writer_loop(shared: Arc<Shared>, mut store: Store, mut rx: mpsc::Receiver<Queued>) {
    let mut heads = Heads {
        ids: shared
            .lock()
            .rooms
            .iter()
            .map(|(k, r)| (k.clone(), r.last_id))
            .collect(),
        local_seq: None,
    };
    let mut batch: Vec<WriteCmd> = Vec::with_capacity(MAX_BATCH);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let interval = shared.config.batch_interval;
    let mut last_batch: Option<std::time::Instant> = None;
    let mut slow = SlowBatches::default();
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
        let mut next = Some(first);
        while let Some((cmd, done)) = next {
            batch.push(cmd);
            waiting.extend(done);
            next = if batch.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let started = std::time::Instant::now();
        process_batch(&shared, &mut store, &mut heads, &batch);
        slow.note(started.elapsed(), batch.len());
        batch.clear();
        // Each waiting client is told its command took effect (a sender
        // dropped unsent means the writer stopped first).
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
    tracing::debug!("chat: writer thread stopped");
}

/// A batch that takes longer than this to store and deliver is logged: every
/// message in it, and everything queued behind it, reached its room that late.
const SLOW_BATCH: std::time::Duration = std::time::Duration::from_secs(1);
/// At most one such warning in this long; the others are counted in it.
const SLOW_BATCH_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Warns of batches slower than [`SLOW_BATCH`] (a disk that stalls on a
/// commit or a checkpoint, or a starved machine), at most once per
/// [`SLOW_BATCH_LOG_EVERY`].
#[derive(Default)]
struct SlowBatches {
    last_warned: Option<std::time::Instant>,
    /// Slow batches since the last warning, and the slowest of them.
    unreported: u32,
    worst: std::time::Duration,
}

impl SlowBatches {
    fn note(&mut self, took: std::time::Duration, writes: usize) {
        if took < SLOW_BATCH {
            return;
        }
        self.unreported += 1;
        self.worst = self.worst.max(took);
        if self
            .last_warned
            .is_some_and(|at| at.elapsed() < SLOW_BATCH_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            "chat: a batch of {writes} writes took {took:.1?} to store and deliver \
             ({} slow batches since the last warning, the slowest {:.1?}): \
             messages reached their rooms that late; a disk that stalls or a machine \
             short of CPU",
            self.unreported,
            self.worst
        );
        self.last_warned = Some(std::time::Instant::now());
        self.unreported = 0;
        self.worst = std::time::Duration::ZERO;
    }
}

/// One batch: check, commit, tell the relay (through [`Shared::local_seq`])
/// how far this node's log now goes, read the joins' history, apply.
fn process_batch(shared: &Shared, store: &mut Store, heads: &mut Heads, batch: &[WriteCmd]) {
    let started = std::time::Instant::now();
    let allowed = check_members(shared, batch);
    let mut outcome = commit(shared, store, heads, batch, allowed, started);
    if let Some(seq) = heads.local_seq {
        shared.local_log_reaches(seq);
    }
    let joins = prepare_joins(shared, store, &heads.ids, batch, &outcome);
    apply(shared, batch, &mut outcome, joins);
}

/// Per command, whether it may go ahead: a message or a topic needs its
/// client in the room, counting joins earlier in the batch; messages from
/// other nodes always may.
fn check_members(shared: &Shared, batch: &[WriteCmd]) -> Vec<bool> {
    let st = shared.lock();
    let mut joining: HashSet<(ClientId, &str)> = HashSet::new();
    batch
        .iter()
        .map(|cmd| match cmd {
            WriteCmd::Say(Post { client: REMOTE, .. }) | WriteCmd::Topic { client: REMOTE, .. } => {
                true
            }
            WriteCmd::Say(Post { client, room, .. }) | WriteCmd::Topic { client, room, .. } => {
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
            WriteCmd::Sync(_) | WriteCmd::Moderate(_) => true,
        })
        .collect()
}

/// Writes a batch in one transaction; on success its ids and sequence
/// become the writer's heads.
fn commit(
    shared: &Shared,
    store: &mut Store,
    heads: &mut Heads,
    batch: &[WriteCmd],
    allowed: Vec<bool>,
    started: std::time::Instant,
) -> Outcome {
    let mut next = heads.clone();
    let mut ids = Vec::with_capacity(batch.len());
    let mut changes = HashMap::new();
    let mut out = (&mut ids, &mut changes);
    let written = load_local_seq(shared, store, &mut next)
        .and_then(|()| write(shared, store, batch, &allowed, &mut next, &mut out));
    let failure = match written {
        Ok(()) => {
            *heads = next;
            None
        }
        Err(e) => {
            tracing::error!(
                "chat: cannot store a batch of {} commands: {e}",
                batch.len()
            );
            ids.resize(batch.len(), 0);
            changes.clear();
            Some(e.to_string())
        }
    };
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    metrics::histogram!("netkit_chat_batch_seconds").record(started.elapsed().as_secs_f64());
    Outcome {
        allowed,
        ids,
        failure,
        changes,
    }
}

/// Reads this node's newest log sequence once clustering has set its origin.
fn load_local_seq(shared: &Shared, store: &Store, heads: &mut Heads) -> Result<(), StoreError> {
    if let (Some(me), None) = (shared.origin.get(), heads.local_seq) {
        heads.local_seq = Some(store.last_seq(me)?);
    }
    Ok(())
}

/// The batch's transaction: each allowed command in order, its id pushed to
/// `out.0`, and the moderation changes of other hubs' notices to `out.1`.
fn write(
    shared: &Shared,
    store: &mut Store,
    batch: &[WriteCmd],
    allowed: &[bool],
    next: &mut Heads,
    out: &mut (&mut Vec<u64>, &mut HashMap<usize, ModWrite>),
) -> Result<(), StoreError> {
    let now = now_ms();
    let tx = store.batch()?;
    // Gossip: hubs see changes in different orders, so the latest wins;
    // a broker's log has one order, which every hub follows.
    let lww = shared.room_log.get().is_none();
    for (i, (cmd, &ok)) in batch.iter().zip(allowed).enumerate() {
        let id = match cmd {
            _ if !ok => 0,
            WriteCmd::Say(post) => {
                let id = write_say(&tx, shared, post, next, now)?;
                if id != 0
                    && post.client == REMOTE
                    && let Some(m) = moderation_sync::remote_change(&tx, post, lww)?
                {
                    out.1.insert(i, m);
                }
                id
            }
            WriteCmd::Join { room, .. } => {
                tx.create_room(room, now)?;
                *next.ids.entry(room.clone()).or_insert(0)
            }
            // 1: stored; 0: an older topic from another node, dropped.
            WriteCmd::Topic {
                room,
                topic,
                by,
                stamp,
                newer_only,
                ..
            } => u64::from(tx.set_topic(room, topic, by, stamp, *newer_only, now)?),
            WriteCmd::Moderate(m) => {
                super::moderation::store_change(&tx, m)?;
                moderation_sync::stamp_local(&tx, m, shared.origin.get().map(String::as_str))?;
                match m.notice() {
                    Some(n) => write_say(&tx, shared, n, next, now)?,
                    None => 0,
                }
            }
            WriteCmd::Sync(_) => 0,
        };
        out.0.push(id);
    }
    tx.commit()
}

/// Stores one message with the next id of its room (and, for a local one in
/// a cluster, the next sequence of this node's log); returns its id, or 0
/// for a message of another node that is stored already.
fn write_say(
    tx: &Batch<'_>,
    shared: &Shared,
    post: &Post,
    next: &mut Heads,
    now: i64,
) -> Result<u64, StoreError> {
    if post.client == REMOTE && !next.ids.contains_key(&post.room) {
        tx.create_room(&post.room, now)?;
    }
    let id = match &post.origin {
        Some(r) if r.keep_id => r.id,
        _ => next.ids.get(&post.room).copied().unwrap_or(0) + 1,
    };
    let local_seq = next.local_seq.unwrap_or(0) + 1;
    let origin = match (&post.origin, shared.origin.get()) {
        (Some(r), _) => Some(Origin {
            name: &r.name,
            seq: r.seq,
            id: r.id,
        }),
        (None, Some(me)) if post.client != REMOTE => Some(Origin {
            name: me,
            seq: local_seq,
            id,
        }),
        _ => None,
    };
    let stored = tx.insert(&NewMessage {
        room: &post.room,
        id,
        from: &post.from,
        text: &post.text,
        ts: post.ts,
        kind: post.kind,
        origin,
        file: post.file.as_ref().map(|f| &f.file),
        moderation: post.moderation.as_deref(),
    })?;
    if !stored {
        return Ok(0);
    }
    let head = next.ids.entry(post.room.clone()).or_insert(0);
    *head = (*head).max(id);
    if post.client != REMOTE && origin.is_some() {
        next.local_seq = Some(local_seq);
    }
    Ok(id)
}

/// Applies a committed (or failed) batch in order under the member lock:
/// messages fan out, joins take effect, topics change; a refused command or
/// one the failure lost is answered with an error.
fn apply(
    shared: &Shared,
    batch: &[WriteCmd],
    outcome: &mut Outcome,
    joins: Vec<Option<PreparedJoin>>,
) {
    let mut st = shared.lock();
    let mut stored = 0u64;
    let mut changes = std::mem::take(&mut outcome.changes);
    let steps = batch
        .iter()
        .zip(&outcome.ids)
        .zip(joins)
        .zip(&outcome.allowed)
        .enumerate();
    for (i, (((cmd, &id), join), &ok)) in steps {
        if let Some((client, e)) = refusal(cmd, ok, outcome.failure.as_deref()) {
            if let WriteCmd::Say(Post { file: Some(f), .. }) = cmd {
                f.answer(Err(e.clone()));
            }
            shared.deliver_locked(&mut st, &[client], &Event::new(e.to_msg()));
            continue;
        }
        match cmd {
            // Stored already (from another node): nobody is told twice.
            WriteCmd::Say(_) if id == 0 => {}
            WriteCmd::Say(post) => {
                stored += 1;
                apply_say(shared, &mut st, post, id);
                if let Some(m) = changes.remove(&i) {
                    super::moderation::apply_change(shared, &mut st, &m);
                }
            }
            WriteCmd::Sync(done) => done.notify_one(),
            WriteCmd::Join { client, room, .. } => {
                if let Some(join) = join {
                    apply_join(shared, &mut st, *client, room, join);
                }
            }
            WriteCmd::Topic { .. } if id == 0 => {}
            WriteCmd::Topic {
                client,
                room,
                topic,
                by,
                stamp,
                ..
            } => apply_topic(shared, &mut st, *client, room, topic, by, stamp),
            WriteCmd::Moderate(m) => {
                if let Some(n) = m.notice() {
                    apply_say(shared, &mut st, n, id);
                }
                super::moderation::apply_change(shared, &mut st, m);
            }
        }
    }
    drop(st);
    if outcome.failure.is_none() {
        shared.logged_reaches(batch);
    }
    shared.stats.messages.fetch_add(stored, Ordering::Relaxed);
    metrics::counter!("netkit_chat_messages_total").increment(stored);
}

/// The error a message or a topic gets instead of taking effect: it was not
/// allowed (the client is not in the room), or the failed commit lost it.
fn refusal(cmd: &WriteCmd, allowed: bool, failure: Option<&str>) -> Option<(ClientId, HubError)> {
    if let WriteCmd::Moderate(m) = cmd {
        return failure.map(|err| (m.client(), HubError::Store(err.to_string())));
    }
    let (WriteCmd::Say(Post { client, room, .. }) | WriteCmd::Topic { client, room, .. }) = cmd
    else {
        return None;
    };
    if !allowed {
        return Some((*client, HubError::NotMember(truncate(room))));
    }
    failure.map(|err| (*client, HubError::Store(err.to_string())))
}

/// Sends a stored message (`id` in its room) to the room's members.
fn apply_say(shared: &Shared, st: &mut State, post: &Post, id: u64) {
    let origin = message_origin(shared, post.client, &post.origin, id);
    let msg = ChatMessage {
        room: post.room.clone(),
        id,
        from: post.from.clone(),
        text: post.text.clone(),
        ts: post.ts,
        kind: post.kind,
        origin: origin.map(|o| o.0.into()),
        origin_id: origin.map_or(0, |o| o.1),
        file: post.file.as_ref().map(|f| Box::new(f.file.clone())),
    };
    if post.client == REMOTE {
        st.room_mut(&post.room);
    }
    let ev = Event::new(ServerMsg::Message(msg));
    if let Some(f) = &post.file {
        f.answer(Ok(id));
    }
    let members: Vec<ClientId> = match st.rooms.get_mut(&post.room) {
        Some(r) => {
            r.last_id = id;
            if r.floors.is_empty() {
                r.members.iter().copied().collect()
            } else {
                members_past_floors(r, origin)
            }
        }
        None => return,
    };
    shared.deliver_locked(st, &members, &ev);
}

/// Sets a stored topic and tells the room's members who set it; a local
/// one is also handed to whatever carries topics to the other hubs.
fn apply_topic(
    shared: &Shared,
    st: &mut State,
    client: ClientId,
    room: &str,
    topic: &str,
    by: &str,
    stamp: &TopicStamp,
) {
    if client != REMOTE {
        shared.topic_set_here(room, topic, by, stamp);
    }
    let r = st.room_mut(room);
    r.topic = topic.to_string();
    r.topic_by = by.to_string();
    r.topic_stamp = stamp.clone();
    let members: Vec<ClientId> = r.members.iter().copied().collect();
    let ev = Event::new(ServerMsg::Topic {
        room: room.to_string(),
        topic: topic.to_string(),
        by: by.to_string(),
    });
    shared.deliver_locked(st, &members, &ev);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slow_batches_are_warned_of_once_per_interval_and_counted_meanwhile() {
        let mut slow = SlowBatches::default();
        slow.note(Duration::from_millis(999), 10);
        assert!(
            slow.last_warned.is_none(),
            "a batch under a second is not slow"
        );
        slow.note(Duration::from_millis(1500), 10);
        assert!(
            slow.last_warned.is_some(),
            "the first slow batch is warned of"
        );
        assert_eq!(slow.unreported, 0);
        slow.note(Duration::from_secs(3), 10);
        slow.note(Duration::from_secs(2), 10);
        assert_eq!(slow.unreported, 2, "counted until the next warning");
        assert_eq!(slow.worst, Duration::from_secs(3));
        slow.last_warned = Some(std::time::Instant::now() - SLOW_BATCH_LOG_EVERY);
        slow.note(Duration::from_secs(1), 10);
        assert_eq!(slow.unreported, 0, "the next warning reports them");
        assert_eq!(slow.worst, Duration::ZERO);
    }
}

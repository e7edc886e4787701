//! The writer thread: takes room messages, joins and topics in batches, and
//! for each batch plans (membership in order, ids), commits (one
//! transaction), then applies (fan-out, joins with their history, topics).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::origin::{REMOTE, members_past_floors, message_origin};
use super::{ClientId, Event, HubConfig, HubError, Shared, State, member_nicks_upto, truncate};
use crate::chat::protocol::{ChatMessage, MessageKind, PresenceEvent, ServerMsg, now_ms};
use crate::chat::store::{NewMessage, Store};

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
    /// For [`REMOTE`] messages: origin and origin id, when known.
    pub(super) origin: Option<(String, u64)>,
    /// For a file message: the file, and who waits to hear how it went.
    pub(super) file: Option<Box<super::files::FileShare>>,
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
    },
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

/// A join whose history has been read, waiting to be applied in order.
struct PreparedJoin {
    history: Vec<ChatMessage>,
    truncated: bool,
    last_id: u64,
    /// `since` entries this node is behind on (see [`Room::floors`]).
    behind: Vec<(String, u64)>,
}

/// A batch as planned, before the commit.
struct Plan<'a> {
    /// Per command: whether it may go ahead.
    allowed: Vec<bool>,
    /// Per command: a message's id, for a join the room's newest id as of
    /// its place in the batch, else 0.
    ids: Vec<u64>,
    /// Each room's newest id once the batch is stored.
    next: HashMap<String, u64>,
    new_rooms: Vec<&'a str>,
    messages: Vec<NewMessage<'a>>,
    topics: Vec<(&'a str, &'a str)>,
}

/// A batch after its commit: what [`Plan`] decided, and the commit's error if it failed.
struct Outcome {
    allowed: Vec<bool>,
    ids: Vec<u64>,
    failure: Option<String>,
}

/// The writer thread: takes commands in batches, assigns ids, commits the batch
/// in one transaction, then applies it (fan-out, joins, topics) in order.
fn writer_loop(shared: Arc<Shared>, mut store: Store, mut rx: mpsc::Receiver<Queued>) {
    let mut last_ids: HashMap<String, u64> = shared
        .lock()
        .rooms
        .iter()
        .map(|(k, r)| (k.clone(), r.last_id))
        .collect();
    let mut batch: Vec<WriteCmd> = Vec::with_capacity(MAX_BATCH);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
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
        process_batch(&shared, &mut store, &mut last_ids, &batch);
        batch.clear();
        // Dropping the senders tells each waiting client its command took effect.
        waiting.clear();
    }
    tracing::debug!("chat: writer thread stopped");
}

/// One batch: plan, commit, read the joins' history, apply.
fn process_batch(
    shared: &Shared,
    store: &mut Store,
    last_ids: &mut HashMap<String, u64>,
    batch: &[WriteCmd],
) {
    let started = std::time::Instant::now();
    let plan = plan(shared, last_ids, batch);
    let outcome = commit(shared, store, last_ids, plan, started);
    let joins = prepare_joins(&shared.config, store, last_ids, batch, &outcome);
    apply(shared, batch, &outcome, joins);
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
            WriteCmd::Say(Post { client: REMOTE, .. }) => true,
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
            WriteCmd::Sync(_) => true,
        })
        .collect()
}

/// Plans a batch: checks membership in order and assigns ids (tentatively:
/// they hold once the batch is committed).
fn plan<'a>(
    shared: &'a Shared,
    last_ids: &HashMap<String, u64>,
    batch: &'a [WriteCmd],
) -> Plan<'a> {
    let allowed = check_members(shared, batch);
    let mut plan = Plan {
        allowed: Vec::new(),
        ids: Vec::with_capacity(batch.len()),
        next: last_ids.clone(),
        new_rooms: Vec::new(),
        messages: Vec::new(),
        topics: Vec::new(),
    };
    for (cmd, &ok) in batch.iter().zip(&allowed) {
        if !ok {
            plan.ids.push(0);
            continue;
        }
        match cmd {
            WriteCmd::Say(post) => {
                if post.client == REMOTE && !last_ids.contains_key(&post.room) {
                    plan.new_rooms.push(&post.room);
                }
                let id = plan.next.entry(post.room.clone()).or_insert(0);
                *id += 1;
                let id = *id;
                plan.ids.push(id);
                plan.messages.push(NewMessage {
                    room: &post.room,
                    id,
                    from: &post.from,
                    text: &post.text,
                    ts: post.ts,
                    kind: post.kind,
                    origin: message_origin(shared, post.client, &post.origin, id),
                    file: post.file.as_ref().map(|f| &f.file),
                });
            }
            WriteCmd::Sync(_) => plan.ids.push(0),
            WriteCmd::Join { room, .. } => {
                plan.ids.push(*plan.next.entry(room.clone()).or_insert(0));
                plan.new_rooms.push(room);
            }
            WriteCmd::Topic { room, topic, .. } => {
                plan.ids.push(0);
                plan.topics.push((room, topic));
            }
        }
    }
    plan.allowed = allowed;
    plan
}

/// Writes a planned batch in one transaction; on success the planned ids
/// become the rooms' last ids.
fn commit(
    shared: &Shared,
    store: &mut Store,
    last_ids: &mut HashMap<String, u64>,
    plan: Plan<'_>,
    started: std::time::Instant,
) -> Outcome {
    let committed = store.write_batch(&plan.new_rooms, &plan.messages, &plan.topics, now_ms());
    let failure = match committed {
        Ok(()) => {
            *last_ids = plan.next;
            None
        }
        Err(e) => {
            tracing::error!(
                "chat: cannot store a batch of {} messages: {e}",
                plan.messages.len()
            );
            Some(e.to_string())
        }
    };
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    metrics::histogram!("netkit_chat_batch_seconds").record(started.elapsed().as_secs_f64());
    Outcome {
        allowed: plan.allowed,
        ids: plan.ids,
        failure,
    }
}

/// Reads the history each join of the batch needs, as of its place in the
/// batch, before the member lock is taken.
fn prepare_joins(
    config: &HubConfig,
    store: &Store,
    last_ids: &HashMap<String, u64>,
    batch: &[WriteCmd],
    outcome: &Outcome,
) -> Vec<Option<PreparedJoin>> {
    batch
        .iter()
        .zip(&outcome.ids)
        .map(|(cmd, &upto)| {
            let WriteCmd::Join {
                room, after, since, ..
            } = cmd
            else {
                return None;
            };
            // On a failed commit the batch's messages do not exist.
            let upto = if outcome.failure.is_some() {
                last_ids.get(room).copied().unwrap_or(0)
            } else {
                upto
            };
            Some(prepare_join(
                config,
                store,
                room,
                *after,
                since.as_ref(),
                upto,
            ))
        })
        .collect()
}

/// The history of one join up to id `upto`: what `since` has not seen, or
/// everything after `after` (up to the resume limit), or the last few.
fn prepare_join(
    cfg: &HubConfig,
    store: &Store,
    room: &str,
    after: Option<u64>,
    since: Option<&BTreeMap<String, u64>>,
    upto: u64,
) -> PreparedJoin {
    if let Some(seen) = since {
        let found = store
            .since(room, seen, upto, cfg.resume_max)
            .unwrap_or_else(|e| {
                tracing::error!("chat: cannot read history of {room}: {e}");
                Default::default()
            });
        return PreparedJoin {
            history: found.messages,
            truncated: found.truncated,
            last_id: upto,
            behind: found.behind,
        };
    }
    let (since, limit) = match after {
        Some(a) => (a, cfg.resume_max),
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
    PreparedJoin {
        history,
        truncated,
        last_id: upto,
        behind: Vec::new(),
    }
}

/// Applies a committed (or failed) batch in order under the member lock:
/// messages fan out, joins take effect, topics change; a refused command or
/// one the failure lost is answered with an error.
fn apply(shared: &Shared, batch: &[WriteCmd], outcome: &Outcome, joins: Vec<Option<PreparedJoin>>) {
    let mut st = shared.lock();
    let mut stored = 0u64;
    let steps = batch
        .iter()
        .zip(&outcome.ids)
        .zip(joins)
        .zip(&outcome.allowed);
    for (((cmd, &id), join), &ok) in steps {
        if let Some((client, e)) = refusal(cmd, ok, outcome.failure.as_deref()) {
            if let WriteCmd::Say(Post { file: Some(f), .. }) = cmd {
                f.answer(Err(e.clone()));
            }
            shared.deliver_locked(&mut st, &[client], &Event::new(e.to_msg()));
            continue;
        }
        match cmd {
            WriteCmd::Say(post) => {
                stored += 1;
                apply_say(shared, &mut st, post, id);
            }
            WriteCmd::Sync(done) => done.notify_one(),
            WriteCmd::Join { client, room, .. } => {
                if let Some(join) = join {
                    apply_join(shared, &mut st, *client, room, join);
                }
            }
            WriteCmd::Topic {
                client,
                room,
                topic,
            } => apply_topic(shared, &mut st, *client, room, topic),
        }
    }
    drop(st);
    shared.stats.messages.fetch_add(stored, Ordering::Relaxed);
    metrics::counter!("netkit_chat_messages_total").increment(stored);
}

/// The error a message or a topic gets instead of taking effect: it was not
/// allowed (the client is not in the room), or the failed commit lost it.
fn refusal(cmd: &WriteCmd, allowed: bool, failure: Option<&str>) -> Option<(ClientId, HubError)> {
    let (WriteCmd::Say(Post { client, room, .. }) | WriteCmd::Topic { client, room, .. }) = cmd
    else {
        return None;
    };
    if !allowed {
        return Some((*client, HubError::NotMember(truncate(room))));
    }
    failure.map(|err| (*client, HubError::Store(err.to_string())))
}

/// Sends a stored message (`id` in its room) to the room's members, and a
/// local one to the relay too.
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
    } else {
        let _ = shared.stored_local.send(msg.clone());
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

/// Sets a stored topic and tells the room's members who set it.
fn apply_topic(shared: &Shared, st: &mut State, client: ClientId, room: &str, topic: &str) {
    let by = st
        .clients
        .get(&client)
        .map(|c| c.nick.clone())
        .unwrap_or_default();
    let r = st.room_mut(room);
    r.topic = topic.to_string();
    let members: Vec<ClientId> = r.members.iter().copied().collect();
    let ev = Event::new(ServerMsg::Topic {
        room: room.to_string(),
        topic: topic.to_string(),
        by,
    });
    shared.deliver_locked(st, &members, &ev);
}

fn apply_join(shared: &Shared, st: &mut State, client: ClientId, room: &str, join: PreparedJoin) {
    let nick = match st.clients.get_mut(&client) {
        Some(c) if !c.rooms.contains(room) => {
            c.rooms.insert(room.to_string());
            c.current = Some(room.to_string());
            c.nick.clone()
        }
        _ => return, // gone, or a duplicate join in the same batch
    };
    let limit = shared.config.presence_limit;
    let remote = st.remote.count(room);
    let r = st.room_mut(room);
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

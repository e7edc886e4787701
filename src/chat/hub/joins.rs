//! Joins in the writer: the history each join of a batch needs, read as of
//! its place in the batch before the member lock is taken
//! ([`prepare_joins`]), then applied in order: the member added, the room
//! told, the joiner given `joined` and its history ([`apply_join`]).

use std::collections::{BTreeMap, HashMap};

use super::writer::{Outcome, WriteCmd};
use super::{ClientId, Event, HubConfig, Shared, State, member_nicks_upto};
use crate::chat::protocol::{ChatMessage, PresenceEvent, ServerMsg};
use crate::chat::store::Store;

/// A join whose history has been read, waiting to be applied in order.
pub(super) struct PreparedJoin {
    history: Vec<ChatMessage>,
    truncated: bool,
    last_id: u64,
    /// `since` entries this node is behind on (see [`Room::floors`]).
    behind: Vec<(String, u64)>,
}

/// Reads the history each join of the batch needs, as of its place in the
/// batch, before the member lock is taken.
pub(super) fn prepare_joins(
    shared: &Shared,
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
                &shared.config,
                shared.room_log.get().is_some(),
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
    logged: bool,
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
    // Broker mode: a position this store does not hold (trimmed from the
    // log, or from another log) gets the newest page, as a first join does.
    let gone = logged && after.is_some_and(|a| !logged_holds(store, room, a));
    let (since, limit) = match after {
        Some(a) if !gone => (a, cfg.resume_max),
        _ => (0, cfg.history_on_join),
    };
    let history = store.latest(room, since, upto, limit).unwrap_or_else(|e| {
        tracing::error!("chat: cannot read history of {room}: {e}");
        Vec::new()
    });
    let truncated = match after {
        Some(_) if gone => true,
        Some(_) if logged => first_held(store, room, since, upto) != history.first().map(|m| m.id),
        Some(_) => history
            .first()
            .map_or(upto > since, |m| m.id > since.saturating_add(1)),
        None => false,
    };
    PreparedJoin {
        history,
        truncated,
        last_id: upto,
        behind: Vec::new(),
    }
}

/// The id of the first message of `room` after `after` up to `upto`, if any.
fn first_held(store: &Store, room: &str, after: u64, upto: u64) -> Option<u64> {
    store
        .earliest(room, after, upto, 1)
        .map(|v| v.first().map(|m| m.id))
        .unwrap_or_else(|e| {
            tracing::error!("chat: cannot read history of {room}: {e}");
            None
        })
}

/// Whether the store holds message `id` of `room` (0, the start, always),
/// in broker mode, where ids are the log's sequence and so have gaps within
/// a room; a resume from a held id misses messages only if more follow it
/// than the history holds.
fn logged_holds(store: &Store, room: &str, id: u64) -> bool {
    id == 0 || first_held(store, room, id - 1, id).is_some()
}

pub(super) fn apply_join(
    shared: &Shared,
    st: &mut State,
    client: ClientId,
    room: &str,
    join: PreparedJoin,
) {
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
    shared.auto_op_locked(st, client, room);
    let modes = shared.modes_locked(st, room);
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
        ops: modes.ops,
        voiced: modes.voiced,
        moderated: modes.moderated,
        invite_only: modes.invite_only,
    });
    shared.deliver_locked(st, &[client], &joined);
    for m in join.history {
        let ev = Event::new(ServerMsg::Message(m));
        shared.deliver_locked(st, &[client], &ev);
    }
}

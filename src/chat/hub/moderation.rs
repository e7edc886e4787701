//! Room moderation: operators, voice, mutes, bans, kicks and the `+m` / `+i`
//! modes, server admins. A request is checked under the member lock
//! ([`super::moderation_cmds`]), then goes through the writer like a message:
//! the change and its notice (a stored message of kind `notice`) are
//! committed together, then applied ([`super::moderation_change`]). The abuse
//! limits (guest nicks per address, repeated text) are in [`super::abuse_limits`].
//!
//! Who holds a role: a logged-in client by its account (stored, survives
//! restarts and nick changes); a guest by its connection (gone when it
//! leaves the room, since a guest's nick proves nothing). Bans are by
//! account or by the nick's look-alike key, optionally with the address.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;

use super::writer::WriteCmd;
use super::{ClientId, Event, HubError, Shared, State};
use crate::chat::names::name_key;
use crate::chat::protocol::{ServerMsg, now_ms};
use crate::chat::store::{Role, StoredRules};

pub(super) use super::abuse_limits::{GuestLimiter, Repeats};
use super::moderation_change::{Change, HUB};
pub(super) use super::moderation_change::{ModWrite, apply_change, store_change};

/// Who holds a role, a mute or an invitation in a room.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Holder {
    /// A registered account (name key): stored.
    Account(String),
    /// A guest's connection: lasts while it stays in the room.
    Client(ClientId),
}

/// A ban in force in a room.
#[derive(Debug, Clone)]
pub(super) struct Ban {
    pub(super) addr: Option<IpAddr>,
    pub(super) until: Option<i64>,
    pub(super) reason: String,
}

impl Ban {
    pub(super) fn active(&self, now: i64) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

/// A room's moderation state.
#[derive(Debug, Default)]
pub(super) struct Rules {
    pub(super) ops: BTreeSet<Holder>,
    pub(super) voices: BTreeSet<Holder>,
    /// Muted holders and until when (`None`: until unmuted).
    pub(super) mutes: HashMap<Holder, Option<i64>>,
    /// Bans by name key.
    pub(super) bans: HashMap<String, Ban>,
    /// Invited holders (accounts stored, guests in memory only).
    pub(super) invites: HashSet<Holder>,
    pub(super) moderated: bool,
    pub(super) invite_only: bool,
}

impl Rules {
    /// The rules as stored.
    pub(super) fn from_stored(s: StoredRules) -> Rules {
        let acc = |k: String| Holder::Account(k);
        Rules {
            ops: s.ops.into_iter().map(acc).collect(),
            voices: s.voices.into_iter().map(acc).collect(),
            mutes: s.mutes.into_iter().map(|(k, u)| (acc(k), u)).collect(),
            bans: s
                .bans
                .into_iter()
                .map(|b| {
                    let ban = Ban {
                        addr: b.addr.and_then(|a| a.parse().ok()),
                        until: b.until_ms,
                        reason: b.reason,
                    };
                    (b.key, ban)
                })
                .collect(),
            invites: s.invites.into_iter().map(acc).collect(),
            moderated: s.moderated,
            invite_only: s.invite_only,
        }
    }
}

/// True if `set` holds client `id` (by account or connection).
pub(super) fn holds(set: &BTreeSet<Holder>, st: &State, id: ClientId) -> bool {
    set.contains(&Holder::Client(id)) || set.contains(&holder(st, id))
}

/// How client `id` is known to the rules: its account, else its connection.
pub(super) fn holder(st: &State, id: ClientId) -> Holder {
    match st.clients.get(&id).and_then(|c| c.login.clone()) {
        Some(key) => Holder::Account(key),
        None => Holder::Client(id),
    }
}

impl Shared {
    /// True if client `id` is logged in to an account named in `--chat-admins`.
    pub(super) fn is_admin(&self, st: &State, id: ClientId) -> bool {
        let admins = &self.config.moderation.admins;
        st.clients
            .get(&id)
            .and_then(|c| c.login.as_ref())
            .is_some_and(|k| admins.contains(k))
    }

    /// True if client `id` may moderate `room` (an operator there, or an admin).
    pub(super) fn is_op(&self, st: &State, id: ClientId, room: &str) -> bool {
        self.is_admin(st, id)
            || st
                .rooms
                .get(room)
                .is_some_and(|r| holds(&r.rules.ops, st, id))
    }

    /// Why client `id` may not speak in `room`, if it may not.
    pub(super) fn speak_refusal(&self, st: &State, id: ClientId, room: &str) -> Option<HubError> {
        let r = st.rooms.get(room)?;
        let now = now_ms();
        let muted = [Holder::Client(id), holder(st, id)].iter().any(|h| {
            r.rules
                .mutes
                .get(h)
                .is_some_and(|u| u.is_none_or(|u| u > now))
        });
        if muted {
            return Some(HubError::Muted(room.to_string()));
        }
        if r.rules.moderated && !holds(&r.rules.voices, st, id) && !self.is_op(st, id, room) {
            return Some(HubError::Moderated(room.to_string()));
        }
        None
    }

    /// Why client `id` (from `peer`) may not join `room`, if it may not:
    /// banned (by account, nick key or address), or the room is invite-only.
    pub(super) fn join_refusal(
        &self,
        st: &State,
        id: ClientId,
        peer: Option<IpAddr>,
        room: &str,
    ) -> Option<HubError> {
        let r = st.rooms.get(room)?;
        if self.is_admin(st, id) {
            return None;
        }
        let c = st.clients.get(&id)?;
        let now = now_ms();
        let keys = [c.login.clone(), Some(name_key(&c.nick))];
        let by_key = keys
            .iter()
            .flatten()
            .filter_map(|k| r.rules.bans.get(k))
            .find(|b| b.active(now));
        let ban = by_key.or_else(|| {
            r.rules
                .bans
                .values()
                .find(|b| b.active(now) && b.addr.is_some() && b.addr == peer)
        });
        if let Some(b) = ban {
            return Some(HubError::Banned(room.to_string(), ban_terms(b)));
        }
        let h = holder(st, id);
        if r.rules.invite_only
            && !holds(&r.rules.ops, st, id)
            && !r.rules.invites.contains(&h)
            && !r.rules.invites.contains(&Holder::Client(id))
        {
            return Some(HubError::InviteOnly(room.to_string()));
        }
        None
    }

    /// Client `id` is joining `room`: in a room with no operator at all
    /// (the first member of a new room) it becomes the operator, which its
    /// `joined` shows (other members, if any, are sent the modes).
    pub(super) fn auto_op_locked(&self, st: &mut State, id: ClientId, room: &str) {
        let h = holder(st, id);
        let Some(r) = st.rooms.get_mut(room) else {
            return;
        };
        if !r.rules.ops.is_empty() {
            return;
        }
        r.rules.ops.insert(h.clone());
        let others = r.members.len() > 1;
        self.record(st, room, id, h, "the first to join");
        if others {
            self.send_modes(st, room);
        }
    }

    /// The operators and voiced members present in `room`, and its modes.
    pub(super) fn modes_locked(&self, st: &State, room: &str) -> Modes {
        let Some(r) = st.rooms.get(room) else {
            return Modes::default();
        };
        let nicks = |set: &BTreeSet<Holder>| -> Vec<String> {
            let mut v: Vec<String> = r
                .members
                .iter()
                .filter(|&&m| holds(set, st, m))
                .filter_map(|m| st.clients.get(m).map(|c| c.nick.clone()))
                .collect();
            v.sort();
            v
        };
        Modes {
            ops: nicks(&r.rules.ops),
            voiced: nicks(&r.rules.voices),
            moderated: r.rules.moderated,
            invite_only: r.rules.invite_only,
        }
    }

    /// After client `id` left `room`: what its connection held there goes,
    /// and if that leaves the room with members but no operator (no guest
    /// operator present, no operator account), the member connected
    /// longest becomes operator.
    pub(super) fn left_locked(&self, st: &mut State, id: ClientId, room: &str) {
        let Some(r) = st.rooms.get_mut(room) else {
            return;
        };
        let me = Holder::Client(id);
        let was_op = r.rules.ops.remove(&me);
        r.rules.voices.remove(&me);
        r.rules.mutes.remove(&me);
        r.rules.invites.remove(&me);
        if !was_op || !r.rules.ops.is_empty() {
            return;
        }
        let Some(&next) = r.members.iter().next() else {
            return;
        };
        let h = holder(st, next);
        if let Some(r) = st.rooms.get_mut(room) {
            r.rules.ops.insert(h.clone());
        }
        self.record(st, room, next, h, "the last operator left");
        let text = format!("you are now the operator of #{room} (the last operator left)");
        self.deliver_locked(st, &[next], &Event::new(ServerMsg::Info { text }));
        self.send_modes(st, room);
    }

    /// Stores an operator the hub chose itself (client `id`, already in
    /// force in memory), if it is an account, with a notice saying `why`
    /// that carries the change to the other hubs of a cluster (in broker
    /// mode through the log, like any notice). A guest's operator status
    /// is its connection's and stays on this hub, without a notice.
    ///
    /// Two hubs that each pick their own first member of a new room at the
    /// same time both keep theirs: each learns the other's choice, and the
    /// room ends with both accounts as operators on every hub.
    pub(super) fn record(&self, st: &State, room: &str, id: ClientId, h: Holder, why: &str) {
        if !matches!(h, Holder::Account(_)) {
            return;
        }
        let nick = st
            .clients
            .get(&id)
            .map(|c| c.nick.clone())
            .unwrap_or_default();
        let change = Change::Role {
            role: Role::Op,
            holder: h,
            on: true,
        };
        let text = format!("{nick} is now the operator of #{room} ({why})");
        let mut post = super::moderation_change::notice(HUB, room, &nick, text);
        post.moderation = super::moderation_sync::ModAction::of(&change).map(|a| a.to_json());
        // Broker mode: room ids are the log's, so the notice is appended
        // to the log (and comes back to every hub, this one included).
        let log = self.room_log.get().cloned();
        let (notice, logged) = match log {
            Some(_) => (None, Some(super::moderation_change::logged_notice(post))),
            None => (Some(post), None),
        };
        let m = ModWrite {
            client: HUB,
            room: room.to_string(),
            change,
            notice,
            in_force: true,
            remote: false,
        };
        let sent = self
            .writer
            .get()
            .and_then(|w| w.upgrade())
            .is_some_and(|w| w.try_send((WriteCmd::Moderate(Box::new(m)), None)).is_ok());
        if !sent {
            tracing::warn!(%room, "chat: the writer queue is full; the new operator is not stored");
            return;
        }
        if let (Some(log), Some(post)) = (log, logged) {
            let room = room.to_string();
            let rt = tokio::runtime::Handle::try_current().ok();
            let Some(rt) = rt.or_else(|| self.log_rt.get().cloned()) else {
                tracing::warn!(%room, "chat: no runtime to append the new operator to the log");
                return;
            };
            rt.spawn(async move {
                if let Err(e) = log.append(post).await {
                    tracing::warn!(%room, "chat: the new operator is not in the log: {e}");
                }
            });
        }
    }

    /// Sends `room`'s modes to every member.
    pub(super) fn send_modes(&self, st: &mut State, room: &str) {
        let Some(r) = st.rooms.get(room) else { return };
        let members: Vec<ClientId> = r.members.iter().copied().collect();
        let m = self.modes_locked(st, room);
        let ev = Event::new(ServerMsg::Modes {
            room: room.to_string(),
            ops: m.ops,
            voiced: m.voiced,
            moderated: m.moderated,
            invite_only: m.invite_only,
        });
        self.deliver_locked(st, &members, &ev);
    }
}

/// A room's operators and voiced members present, and its modes.
#[derive(Debug, Default)]
pub(super) struct Modes {
    pub(super) ops: Vec<String>,
    pub(super) voiced: Vec<String>,
    pub(super) moderated: bool,
    pub(super) invite_only: bool,
}
/// How a ban reads to the banned: until when and why.
pub(super) fn ban_terms(b: &Ban) -> String {
    let until = match b.until {
        Some(u) => format!(
            "for {} more",
            humantime::format_duration(std::time::Duration::from_secs(
                ((u - now_ms()).max(0) / 1000) as u64
            ))
        ),
        None => "until lifted".to_string(),
    };
    if b.reason.is_empty() {
        until
    } else {
        format!("{until}: {}", b.reason)
    }
}

//! Moderation changes in the writer: a change and its notice are stored in
//! one transaction ([`store_change`]), then applied to the members
//! ([`apply_change`]).

use super::moderation::*;
use super::writer::Post;
use super::{ClientId, Event, Shared, State};
use crate::chat::protocol::{MessageKind, ServerMsg, now_ms};
use crate::chat::store::{Batch, Role, StoreError, StoredBan};

/// The author of the notices of changes the hub makes itself.
pub(super) const HUB: ClientId = ClientId::MAX;

/// A notice message from `by` (`client`) in `room`.
pub(super) fn notice(client: ClientId, room: &str, by: &str, text: String) -> Post {
    Post {
        client,
        room: room.to_string(),
        from: by.to_string(),
        text,
        kind: MessageKind::Notice,
        ts: now_ms(),
        origin: None,
        file: None,
        moderation: None,
    }
}

/// A notice as appended to the room log in broker mode (the log gives it
/// its id; notices share no file).
pub(super) fn logged_notice(n: Post) -> super::LoggedPost {
    super::LoggedPost {
        room: n.room,
        from: n.from,
        text: n.text,
        kind: n.kind,
        ts: n.ts,
        moderation: n.moderation,
        file: None,
    }
}

/// A moderation change for the writer: stored with its notice in one
/// transaction, then applied and announced.
pub(super) struct ModWrite {
    /// Who asked (told if storing fails), or [`HUB`].
    pub(super) client: ClientId,
    pub(super) room: String,
    pub(super) change: Change,
    /// The notice (none for an operator the hub chose).
    pub(super) notice: Option<Post>,
    /// Already applied in memory (an operator the hub chose): only stored.
    pub(super) in_force: bool,
    /// Made on another hub ([`super::moderation_sync`]): kicks and bans
    /// put out the local members they cover.
    pub(super) remote: bool,
}

/// What a moderation request changes.
#[derive(Debug)]
pub(super) enum Change {
    Role {
        role: Role,
        holder: Holder,
        on: bool,
    },
    Mute {
        holder: Holder,
        until: Option<Option<i64>>,
    },
    /// A kick of a member here (`target`), or by name key of a member of
    /// another hub (applied there).
    Kick {
        target: Option<ClientId>,
        key: String,
        reason: String,
    },
    Ban {
        key: String,
        ban: Ban,
        by: String,
        kick: Option<ClientId>,
    },
    Unban {
        key: String,
    },
    Mode {
        moderated: bool,
        invite_only: bool,
    },
    Invite {
        holder: Holder,
        target: Option<ClientId>,
    },
    Close {
        reason: String,
    },
}

impl ModWrite {
    /// The client the request came from (told if it fails).
    pub(super) fn client(&self) -> ClientId {
        self.client
    }

    /// The notice message, if any.
    pub(super) fn notice(&self) -> Option<&Post> {
        self.notice.as_ref()
    }
}

/// Stores a change (the writer then stores its notice).
pub(super) fn store_change(tx: &Batch<'_>, m: &ModWrite) -> Result<(), StoreError> {
    let room = m.room.as_str();
    match &m.change {
        Change::Role {
            role,
            holder: Holder::Account(key),
            on,
        } => tx.set_role(room, key, *role, *on),
        Change::Mute {
            holder: Holder::Account(key),
            until,
        } => tx.set_mute(room, key, *until),
        Change::Ban { key, ban, by, .. } => tx.set_ban(
            room,
            &StoredBan {
                key: key.clone(),
                addr: ban.addr.map(|a| a.to_string()),
                until_ms: ban.until,
                reason: ban.reason.clone(),
                by: by.clone(),
            },
        ),
        Change::Unban { key } => tx.remove_ban(room, key),
        Change::Invite {
            holder: Holder::Account(key),
            ..
        } => tx.add_invite(room, key),
        Change::Mode {
            moderated,
            invite_only,
        } => tx.set_modes(room, *moderated, *invite_only),
        Change::Close { .. } => {
            tx.clear_ops(room)?;
            tx.clear_invites(room)?;
            let moderated = false;
            tx.set_modes(room, moderated, true)
        }
        // Guests' roles, mutes and invitations, and kicks are not stored.
        Change::Role { .. } | Change::Mute { .. } | Change::Invite { .. } | Change::Kick { .. } => {
            Ok(())
        }
    }
}

/// Applies a committed change: the rules change, the notice (already
/// delivered by the writer) is followed by the kicks, and the members get
/// the new modes.
pub(super) fn apply_change(shared: &Shared, st: &mut State, m: &ModWrite) {
    let room = m.room.as_str();
    let mut out: Vec<(ClientId, String)> = Vec::new();
    let mut put_out = None;
    if let Some(r) = st.rooms.get_mut(room)
        && !m.in_force
    {
        let rules = &mut r.rules;
        match &m.change {
            Change::Role { role, holder, on } => {
                let set = match role {
                    Role::Op => &mut rules.ops,
                    Role::Voice => &mut rules.voices,
                };
                if *on {
                    set.insert(holder.clone());
                } else {
                    set.remove(holder);
                }
            }
            Change::Mute { holder, until } => match until {
                Some(u) => drop(rules.mutes.insert(holder.clone(), *u)),
                None => drop(rules.mutes.remove(holder)),
            },
            Change::Kick { .. } | Change::Ban { .. } => put_out = kick_or_ban(m, rules),
            Change::Unban { key } => drop(rules.bans.remove(key)),
            Change::Mode {
                moderated,
                invite_only,
            } => {
                rules.moderated = *moderated;
                rules.invite_only = *invite_only;
            }
            Change::Invite { holder, target } => {
                rules.invites.insert(holder.clone());
                if let Some(t) = target {
                    let text = format!(
                        "{} invited you to #{room}; /join {room}",
                        m.notice
                            .as_ref()
                            .map(|n| n.from.as_str())
                            .unwrap_or_default()
                    );
                    let ev = Event::new(ServerMsg::Info { text });
                    shared.deliver_locked(st, &[*t], &ev);
                }
            }
            Change::Close { reason } => {
                rules.ops.clear();
                rules.invites.clear();
                rules.moderated = false;
                rules.invite_only = true;
                for &id in &r.members {
                    out.push((id, format!("#{room} was closed by an admin{reason}")));
                }
            }
        }
    }
    match put_out {
        Some(PutOut::Client(id, why)) => out.push((id, why)),
        Some(PutOut::Covered(key, addr, why)) => {
            let ids = super::moderation_sync::covered_members(shared, st, room, &key, addr);
            out.extend(ids.into_iter().map(|id| (id, why.clone())));
        }
        None => {}
    }
    for (id, why) in out {
        shared.put_out_locked(st, id, room, why);
    }
    shared.send_modes(st, room);
}

/// Who a kick or a ban puts out, and why.
enum PutOut {
    /// Its target, a client of this hub.
    Client(ClientId, String),
    /// The local members a name key (and address) covers: a change from
    /// another hub, or a kick of a member of another hub.
    Covered(String, Option<std::net::IpAddr>, String),
}

/// A kick or ban: the ban goes into `rules`, it is counted (where it was
/// made), and whom it puts out.
fn kick_or_ban(m: &ModWrite, rules: &mut Rules) -> Option<PutOut> {
    let room = m.room.as_str();
    match &m.change {
        Change::Kick {
            target,
            key,
            reason,
        } => {
            if !m.remote {
                metrics::counter!("netkit_chat_kicks_total").increment(1);
            }
            let why = format!("you were kicked from #{room}{reason}");
            Some(match target {
                Some(t) => PutOut::Client(*t, why),
                None => PutOut::Covered(key.clone(), None, why),
            })
        }
        Change::Ban { key, ban, kick, .. } => {
            if !m.remote {
                metrics::counter!("netkit_chat_bans_total").increment(1);
            }
            rules.bans.insert(key.clone(), ban.clone());
            let why = format!("you are banned from #{room} {}", ban_terms(ban));
            match kick {
                Some(t) => Some(PutOut::Client(*t, why)),
                None if m.remote && ban.active(now_ms()) => {
                    Some(PutOut::Covered(key.clone(), ban.addr, why))
                }
                None => None,
            }
        }
        _ => None,
    }
}

impl Shared {
    /// Takes client `id` out of `room` (a kick, a ban, a closed room): the
    /// room is told it left, and it gets `parted` and an error saying why.
    pub(super) fn put_out_locked(&self, st: &mut State, id: ClientId, room: &str, why: String) {
        let Some(c) = st.clients.get_mut(&id) else {
            return;
        };
        if !c.rooms.remove(room) {
            return;
        }
        if c.current.as_deref() == Some(room) {
            c.current = c.rooms.last().cloned();
        }
        let nick = c.nick.clone();
        self.presence_changed();
        self.leave_locked(st, id, room, &nick);
        let parted = Event::new(ServerMsg::Parted {
            room: room.to_string(),
        });
        self.deliver_locked(st, &[id], &parted);
        self.deliver_locked(st, &[id], &Event::new(ServerMsg::error("kicked", why)));
    }
}

//! Moderation across the cluster: the change a notice records
//! ([`ModAction`]) travels with the notice in the message log, as JSON, and
//! every hub that stores the notice applies the change to its own rules in
//! the same transaction ([`remote_change`]).

use serde::{Deserialize, Serialize};

use super::moderation::{Ban, Holder};
use super::moderation_change::{Change, HUB, ModWrite};
use super::writer::Post;
use super::{ClientId, State};
use crate::chat::names::name_key;
use crate::chat::protocol::now_ms;
use crate::chat::store::{Batch, Role, StoreError};

/// How old a kick may be and still remove members of a hub that learns of
/// it: a hub catching up after an outage does not kick users who joined
/// again since (bans, being rules, apply whatever their age).
const KICK_FRESH_MS: i64 = 60_000;

/// A moderation change as other hubs apply it: names by account or nick
/// key, never by a hub's connection ids. Guests' roles, mutes and
/// invitations (held by a connection) do not cross hubs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModAction {
    /// An account given (`on`) or denied a role.
    Role {
        /// The account's name key.
        key: String,
        /// Operator or voice.
        role: Role,
        /// Given or taken.
        on: bool,
    },
    /// An account muted (`on`, until `until` or lifted) or unmuted.
    Mute {
        /// The account's name key.
        key: String,
        /// Muted or unmuted.
        on: bool,
        /// When the mute ends (ms since the epoch); `None`: until lifted.
        until: Option<i64>,
    },
    /// Members by this account or nick key are put out of the room.
    Kick {
        /// The account's or nick's name key.
        key: String,
        /// ` (why)`, or empty.
        reason: String,
    },
    /// A ban; members it covers are put out.
    Ban {
        /// The account's or nick's name key.
        key: String,
        /// The banned address, if the ban covers it.
        addr: Option<String>,
        /// When it ends (ms since the epoch); `None`: until lifted.
        until: Option<i64>,
        /// Why.
        reason: String,
        /// Who banned.
        by: String,
    },
    /// A ban lifted.
    Unban {
        /// The name key.
        key: String,
    },
    /// The room's modes.
    Mode {
        /// `+m`.
        moderated: bool,
        /// `+i`.
        invite_only: bool,
    },
    /// An account invited.
    Invite {
        /// The account's name key.
        key: String,
    },
    /// The room closed by an admin: its members are put out.
    Close {
        /// ` (why)`, or empty.
        reason: String,
    },
}

impl ModAction {
    /// The change as other hubs apply it; `None` for what does not cross
    /// hubs (a guest's role, mute or invitation).
    pub(super) fn of(change: &Change) -> Option<ModAction> {
        Some(match change {
            Change::Role {
                role,
                holder: Holder::Account(key),
                on,
            } => ModAction::Role {
                key: key.clone(),
                role: *role,
                on: *on,
            },
            Change::Mute {
                holder: Holder::Account(key),
                until,
            } => ModAction::Mute {
                key: key.clone(),
                on: until.is_some(),
                until: until.flatten(),
            },
            Change::Kick { key, reason, .. } => ModAction::Kick {
                key: key.clone(),
                reason: reason.clone(),
            },
            Change::Ban { key, ban, by, .. } => ModAction::Ban {
                key: key.clone(),
                addr: ban.addr.map(|a| a.to_string()),
                until: ban.until,
                reason: ban.reason.clone(),
                by: by.clone(),
            },
            Change::Unban { key } => ModAction::Unban { key: key.clone() },
            Change::Mode {
                moderated,
                invite_only,
            } => ModAction::Mode {
                moderated: *moderated,
                invite_only: *invite_only,
            },
            Change::Invite {
                holder: Holder::Account(key),
                ..
            } => ModAction::Invite { key: key.clone() },
            Change::Close { reason } => ModAction::Close {
                reason: reason.clone(),
            },
            Change::Role { .. } | Change::Mute { .. } | Change::Invite { .. } => return None,
        })
    }

    /// The JSON a notice carries.
    pub(super) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a moderation change always serializes")
    }

    /// The rule this change sets, for last-writer-wins between hubs
    /// (a ban and its lifting are one rule); `None` for a kick, which sets none.
    fn rule(&self) -> Option<String> {
        Some(match self {
            ModAction::Role { key, role, .. } => format!("role:{}:{key}", role_name(*role)),
            ModAction::Mute { key, .. } => format!("mute:{key}"),
            ModAction::Ban { key, .. } | ModAction::Unban { key } => format!("ban:{key}"),
            ModAction::Mode { .. } | ModAction::Close { .. } => "mode".to_string(),
            ModAction::Invite { key } => format!("invite:{key}"),
            ModAction::Kick { .. } => return None,
        })
    }

    /// The change this hub applies.
    fn into_change(self) -> Change {
        let acc = Holder::Account;
        match self {
            ModAction::Role { key, role, on } => Change::Role {
                role,
                holder: acc(key),
                on,
            },
            ModAction::Mute { key, on, until } => Change::Mute {
                holder: acc(key),
                until: on.then_some(until),
            },
            ModAction::Kick { key, reason } => Change::Kick {
                target: None,
                key,
                reason,
            },
            ModAction::Ban {
                key,
                addr,
                until,
                reason,
                by,
            } => Change::Ban {
                key,
                ban: Ban {
                    addr: addr.and_then(|a| a.parse().ok()),
                    until,
                    reason,
                },
                by,
                kick: None,
            },
            ModAction::Unban { key } => Change::Unban { key },
            ModAction::Mode {
                moderated,
                invite_only,
            } => Change::Mode {
                moderated,
                invite_only,
            },
            ModAction::Invite { key } => Change::Invite {
                holder: acc(key),
                target: None,
            },
            ModAction::Close { reason } => Change::Close { reason },
        }
    }

    /// True if the names in it are well formed (bounded, non-empty keys).
    fn well_formed(&self) -> bool {
        let ok = |k: &str| !k.is_empty() && k.len() <= 256;
        match self {
            ModAction::Role { key, .. }
            | ModAction::Mute { key, .. }
            | ModAction::Unban { key }
            | ModAction::Invite { key } => ok(key),
            ModAction::Kick { key, reason } => ok(key) && reason.len() <= 1024,
            ModAction::Ban {
                key, reason, by, ..
            } => ok(key) && reason.len() <= 1024 && by.len() <= 256,
            ModAction::Mode { .. } | ModAction::Close { .. } => true,
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Op => "op",
        Role::Voice => "voice",
    }
}

/// Records a local change's time in the last-writer-wins clock of its rule
/// (so a change from another hub that is older does not undo it).
pub(super) fn stamp_local(
    tx: &Batch<'_>,
    m: &ModWrite,
    origin: Option<&str>,
) -> Result<(), StoreError> {
    let (Some(notice), Some(action)) = (m.notice(), ModAction::of(&m.change)) else {
        return Ok(());
    };
    if let Some(rule) = action.rule() {
        tx.newer_rule(&m.room, &rule, notice.ts, origin.unwrap_or_default())?;
    }
    Ok(())
}

/// The change a notice from another hub carries, stored in the notice's
/// transaction, for [`super::moderation::apply_change`] once committed;
/// `None` if it carries none, or one this hub skips: malformed (logged),
/// older than the rule's last change (`lww`, in gossip, where hubs see
/// changes in different orders; in broker mode the log's order is the
/// same on every hub and decides), or a kick too old to act on.
pub(super) fn remote_change(
    tx: &Batch<'_>,
    post: &Post,
    lww: bool,
) -> Result<Option<ModWrite>, StoreError> {
    let Some(json) = post.moderation.as_deref() else {
        return Ok(None);
    };
    let action = match serde_json::from_str::<ModAction>(json) {
        Ok(a) if a.well_formed() => a,
        Ok(_) | Err(_) => {
            tracing::warn!(room = %post.room, "chat: skipping a malformed moderation change from another hub");
            return Ok(None);
        }
    };
    let origin = post.origin.as_ref().map_or("", |o| o.name.as_str());
    let fresh = match action.rule() {
        Some(rule) if lww => tx.newer_rule(&post.room, &rule, post.ts, origin)?,
        Some(_) => true,
        None => now_ms().saturating_sub(post.ts) <= KICK_FRESH_MS,
    };
    if !fresh {
        return Ok(None);
    }
    let m = ModWrite {
        client: HUB,
        room: post.room.clone(),
        change: action.into_change(),
        notice: None,
        in_force: false,
        remote: true,
    };
    super::moderation::store_change(tx, &m)?;
    Ok(Some(m))
}

/// The local members of `room` a kick or ban by `key` (and `addr`) from
/// another hub puts out: logged in as `key` or using a nick of that key,
/// or at the banned address; never a server admin.
pub(super) fn covered_members(
    shared: &super::Shared,
    st: &State,
    room: &str,
    key: &str,
    addr: Option<std::net::IpAddr>,
) -> Vec<ClientId> {
    let Some(r) = st.rooms.get(room) else {
        return Vec::new();
    };
    r.members
        .iter()
        .copied()
        .filter(|id| !shared.is_admin(st, *id))
        .filter(|id| {
            st.clients.get(id).is_some_and(|c| {
                c.login.as_deref() == Some(key)
                    || name_key(&c.nick) == key
                    || (addr.is_some() && c.peer == addr)
            })
        })
        .collect()
}

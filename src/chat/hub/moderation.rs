//! Room moderation: operators, voice, mutes, bans, kicks and the `+m` / `+i`
//! modes, server admins, and the abuse limits (guest nicks per address,
//! repeated text). A request is checked here under the member lock, then
//! goes through the writer like a message: the change and its notice (a
//! stored message of kind `notice`) are committed together, then applied.
//!
//! Who holds a role: a logged-in client by its account (stored, survives
//! restarts and nick changes); a guest by its connection (gone when it
//! leaves the room, since a guest's nick proves nothing). Bans are by
//! account or by the nick's look-alike key, optionally with the address.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

use super::session::Session;
use super::writer::{Post, WriteCmd};
use super::{ClientId, Event, HubError, Shared, State};
use crate::chat::names::name_key;
use crate::chat::protocol::{ClientMsg, MessageKind, ServerMsg, now_ms, valid_room};
use crate::chat::store::{Batch, Role, StoreError, StoredBan, StoredRules};

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
    addr: Option<IpAddr>,
    until: Option<i64>,
    reason: String,
}

impl Ban {
    fn active(&self, now: i64) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

/// A room's moderation state.
#[derive(Debug, Default)]
pub(super) struct Rules {
    ops: BTreeSet<Holder>,
    voices: BTreeSet<Holder>,
    /// Muted holders and until when (`None`: until unmuted).
    mutes: HashMap<Holder, Option<i64>>,
    /// Bans by name key.
    bans: HashMap<String, Ban>,
    /// Invited holders (kept in memory only).
    invites: HashSet<Holder>,
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
            invites: HashSet::new(),
            moderated: s.moderated,
            invite_only: s.invite_only,
        }
    }
}

/// True if `set` holds client `id` (by account or connection).
fn holds(set: &BTreeSet<Holder>, st: &State, id: ClientId) -> bool {
    set.contains(&Holder::Client(id)) || set.contains(&holder(st, id))
}

/// How client `id` is known to the rules: its account, else its connection.
fn holder(st: &State, id: ClientId) -> Holder {
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
    fn is_op(&self, st: &State, id: ClientId, room: &str) -> bool {
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
        self.record(room, h);
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
        self.record(room, h);
        let text = format!("you are now the operator of #{room} (the last operator left)");
        self.deliver_locked(st, &[next], &Event::new(ServerMsg::Info { text }));
        self.send_modes(st, room);
    }

    /// Stores an operator the hub chose itself (already in force in
    /// memory), if it is an account. No notice: nobody acted; members learn
    /// it from `joined` or `modes`.
    fn record(&self, room: &str, h: Holder) {
        if !matches!(h, Holder::Account(_)) {
            return;
        }
        let m = ModWrite {
            client: HUB,
            room: room.to_string(),
            change: Change::Role {
                role: Role::Op,
                holder: h,
                on: true,
            },
            notice: None,
            in_force: true,
        };
        let sent = self
            .writer
            .get()
            .and_then(|w| w.upgrade())
            .is_some_and(|w| w.try_send((WriteCmd::Moderate(Box::new(m)), None)).is_ok());
        if !sent {
            tracing::warn!(%room, "chat: the writer queue is full; the new operator is not stored");
        }
    }

    /// Sends `room`'s modes to every member.
    fn send_modes(&self, st: &mut State, room: &str) {
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
fn ban_terms(b: &Ban) -> String {
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

/// The author of the notices of changes the hub makes itself.
const HUB: ClientId = ClientId::MAX;

/// A notice message from `by` (`client`) in `room`.
fn notice(client: ClientId, room: &str, by: &str, text: String) -> Post {
    Post {
        client,
        room: room.to_string(),
        from: by.to_string(),
        text,
        kind: MessageKind::Notice,
        ts: now_ms(),
        origin: None,
        file: None,
    }
}

/// A moderation change for the writer: stored with its notice in one
/// transaction, then applied and announced.
pub(super) struct ModWrite {
    /// Who asked (told if storing fails), or [`HUB`].
    client: ClientId,
    room: String,
    change: Change,
    /// The notice (none for an operator the hub chose).
    notice: Option<Post>,
    /// Already applied in memory (an operator the hub chose): only stored.
    in_force: bool,
}

/// What a moderation request changes.
#[derive(Debug)]
enum Change {
    Role {
        role: Role,
        holder: Holder,
        on: bool,
    },
    Mute {
        holder: Holder,
        until: Option<Option<i64>>,
    },
    Kick {
        target: ClientId,
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
        Change::Mode {
            moderated,
            invite_only,
        } => tx.set_modes(room, *moderated, *invite_only),
        Change::Close { .. } => {
            tx.clear_ops(room)?;
            let moderated = false;
            tx.set_modes(room, moderated, true)
        }
        // Guests' roles and mutes, invitations and kicks are not stored.
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
            Change::Kick { target, reason } => {
                metrics::counter!("netkit_chat_kicks_total").increment(1);
                out.push((*target, format!("you were kicked from #{room}{reason}")));
            }
            Change::Ban { key, ban, kick, .. } => {
                metrics::counter!("netkit_chat_bans_total").increment(1);
                rules.bans.insert(key.clone(), ban.clone());
                if let Some(t) = kick {
                    out.push((
                        *t,
                        format!("you are banned from #{room} {}", ban_terms(ban)),
                    ));
                }
            }
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
                rules.moderated = false;
                rules.invite_only = true;
                for &id in &r.members {
                    out.push((id, format!("#{room} was closed by an admin{reason}")));
                }
            }
        }
    }
    for (id, why) in out {
        shared.put_out_locked(st, id, room, why);
    }
    shared.send_modes(st, room);
}

impl Shared {
    /// Takes client `id` out of `room` (a kick, a ban, a closed room): the
    /// room is told it left, and it gets `parted` and an error saying why.
    fn put_out_locked(&self, st: &mut State, id: ClientId, room: &str, why: String) {
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

/// A ban as asked for.
struct BanRequest {
    nick: String,
    duration: Option<String>,
    reason: Option<String>,
    address: bool,
}

/// A moderation request as the hub sees it.
enum Request {
    Role(Role, bool, String),
    Kick(String, Option<String>),
    Ban(BanRequest),
    Unban(String),
    Mute(String, Option<Option<String>>),
    Mode(String),
    Invite(String),
    Close(Option<String>),
}

impl Request {
    /// The room and the request of a moderation message.
    fn from_msg(msg: ClientMsg) -> Option<(String, Request)> {
        Some(match msg {
            ClientMsg::Op { room, nick } => (room, Request::Role(Role::Op, true, nick)),
            ClientMsg::Deop { room, nick } => (room, Request::Role(Role::Op, false, nick)),
            ClientMsg::Voice { room, nick } => (room, Request::Role(Role::Voice, true, nick)),
            ClientMsg::Devoice { room, nick } => (room, Request::Role(Role::Voice, false, nick)),
            ClientMsg::Kick { room, nick, reason } => (room, Request::Kick(nick, reason)),
            ClientMsg::Ban {
                room,
                nick,
                duration,
                reason,
                address,
            } => (
                room,
                Request::Ban(BanRequest {
                    nick,
                    duration,
                    reason,
                    address,
                }),
            ),
            ClientMsg::Unban { room, nick } => (room, Request::Unban(nick)),
            ClientMsg::Mute {
                room,
                nick,
                duration,
            } => (room, Request::Mute(nick, Some(duration))),
            ClientMsg::Unmute { room, nick } => (room, Request::Mute(nick, None)),
            ClientMsg::Mode { room, mode } => (room, Request::Mode(mode)),
            ClientMsg::Invite { room, nick } => (room, Request::Invite(nick)),
            ClientMsg::Close { room, reason } => (room, Request::Close(reason)),
            _ => return None,
        })
    }
}

/// ` (why)`, or nothing.
fn because(reason: &Option<String>) -> String {
    match reason.as_deref().map(str::trim) {
        Some(r) if !r.is_empty() => {
            let mut end = r.len().min(200);
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            format!(" ({})", &r[..end])
        }
        _ => String::new(),
    }
}

/// When a duration from now ends (ms since the epoch); `None` for none.
fn until(duration: &Option<String>) -> Result<Option<i64>, HubError> {
    let Some(d) = duration else { return Ok(None) };
    let d = crate::cli::parse_duration(d).map_err(HubError::BadModeration)?;
    Ok(Some(
        now_ms().saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
    ))
}

/// A mode string (`+m`, `-i`, `+mi-…`) applied to the current modes.
fn parse_mode(
    mode: &str,
    mut moderated: bool,
    mut invite_only: bool,
) -> Result<(bool, bool), HubError> {
    let bad = || {
        HubError::BadModeration(format!(
            "unknown mode '{}'; use +m, -m, +i or -i",
            super::truncate(mode)
        ))
    };
    let mut on = None;
    for ch in mode.trim().chars() {
        match ch {
            '+' => on = Some(true),
            '-' => on = Some(false),
            'm' => moderated = on.ok_or_else(bad)?,
            'i' => invite_only = on.ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    if on.is_none() {
        return Err(bad());
    }
    Ok((moderated, invite_only))
}

/// The target of a role, mute or invite: a connected nick's holder, or a
/// registered account's; its client if connected.
fn target(st: &State, nick: &str) -> Result<(Holder, Option<ClientId>), HubError> {
    let key = name_key(nick);
    if let Some(&id) = st.nicks.get(&key) {
        return Ok((holder(st, id), Some(id)));
    }
    if st.registered.contains(&key) {
        return Ok((Holder::Account(key), None));
    }
    Err(HubError::NoSuchUser(super::truncate(nick)))
}

/// A change aimed at a user (role, mute, invitation) and its notice.
fn plan_targeted(
    st: &State,
    room: &str,
    me: &str,
    req: Request,
) -> Result<(Change, String), HubError> {
    let (Request::Role(_, _, nick) | Request::Mute(nick, _) | Request::Invite(nick)) = &req else {
        return Err(HubError::BadModeration("not a request about a user".into()));
    };
    let (holder, id) = target(st, nick)?;
    let who = id.map_or_else(|| nick.clone(), |id| nick_of(st, id));
    Ok(match req {
        Request::Role(role, on, _) => {
            let what = match (role, on) {
                (Role::Op, true) => format!("{me} made {who} an operator"),
                (Role::Op, false) => format!("{me} took operator status from {who}"),
                (Role::Voice, true) => format!("{me} gave voice to {who}"),
                (Role::Voice, false) => format!("{me} took voice from {who}"),
            };
            (Change::Role { role, holder, on }, what)
        }
        Request::Mute(_, Some(d)) => {
            let until = until(&d)?;
            let how = d.map(|d| format!(" for {d}")).unwrap_or_default();
            let change = Change::Mute {
                holder,
                until: Some(until),
            };
            (change, format!("{me} muted {who}{how}"))
        }
        Request::Mute(_, None) => {
            let change = Change::Mute {
                holder,
                until: None,
            };
            (change, format!("{me} unmuted {who}"))
        }
        _ => {
            let change = Change::Invite { holder, target: id };
            (change, format!("{me} invited {who} to #{room}"))
        }
    })
}

/// The nick of client `id`.
fn nick_of(st: &State, id: ClientId) -> String {
    st.clients
        .get(&id)
        .map(|c| c.nick.clone())
        .unwrap_or_default()
}

impl Session {
    /// Why this client may not speak (or share files) in `room`, if it may not.
    pub(super) fn speak_refusal(&self, room: &str) -> Option<HubError> {
        let st = self.hub.lock();
        self.hub.shared.speak_refusal(&st, self.id, room)
    }

    /// Carries out a moderation request: checked now, then stored with its
    /// notice and applied by the writer.
    pub(super) async fn moderate(&mut self, msg: ClientMsg) -> Result<(), HubError> {
        let Some((room, req)) = Request::from_msg(msg) else {
            return Ok(());
        };
        if !valid_room(&room) {
            return Err(HubError::bad_room(&room));
        }
        let mut m = {
            let st = self.hub.lock();
            self.plan(&st, &room, req)?
        };
        // Broker mode: room ids are the log's, so the notice goes through
        // the log (to every hub) once the change has taken effect here.
        let Some(log) = self.hub.shared.room_log.get().cloned() else {
            return self.write(WriteCmd::Moderate(Box::new(m))).await;
        };
        let notice = m.notice.take();
        self.write(WriteCmd::Moderate(Box::new(m))).await?;
        self.settle().await;
        let Some(n) = notice else { return Ok(()) };
        let post = super::LoggedPost {
            room: n.room,
            from: n.from,
            text: n.text,
            kind: n.kind,
            ts: n.ts,
        };
        self.hub.say_logged(&log, post).await
    }

    /// Checks a request (the room, the client's powers, the target) and
    /// makes the change with its notice.
    fn plan(&self, st: &State, room: &str, req: Request) -> Result<ModWrite, HubError> {
        let shared = &self.hub.shared;
        let Some(r) = st.rooms.get(room) else {
            return Err(HubError::NoSuchRoom(room.to_string()));
        };
        let me = nick_of(st, self.id);
        if matches!(req, Request::Close(_)) {
            if !shared.is_admin(st, self.id) {
                return Err(HubError::NotAdmin);
            }
        } else if !shared.is_op(st, self.id, room) {
            return Err(HubError::NotOperator(room.to_string()));
        }
        let (change, text) = match req {
            Request::Kick(nick, reason) => self.plan_kick(st, room, &me, &nick, &reason)?,
            Request::Ban(b) => self.plan_ban(st, room, &me, b)?,
            Request::Unban(nick) => {
                let key = name_key(&nick);
                if !r.rules.bans.contains_key(&key) {
                    return Err(HubError::BadModeration(format!(
                        "'{}' is not banned from #{room}",
                        super::truncate(&nick)
                    )));
                }
                let text = format!("{me} lifted the ban on {nick}");
                (Change::Unban { key }, text)
            }
            Request::Mode(mode) => {
                let (moderated, invite_only) =
                    parse_mode(&mode, r.rules.moderated, r.rules.invite_only)?;
                let change = Change::Mode {
                    moderated,
                    invite_only,
                };
                (change, format!("{me} set mode {}", mode.trim()))
            }
            Request::Close(reason) => {
                let why = because(&reason);
                let text = format!("{me} closed #{room}{why}");
                (Change::Close { reason: why }, text)
            }
            other => plan_targeted(st, room, &me, other)?,
        };
        Ok(ModWrite {
            client: self.id,
            room: room.to_string(),
            change,
            notice: Some(notice(self.id, room, &me, text)),
            in_force: false,
        })
    }

    /// A kick of a member of `room` (an admin only by an admin).
    fn plan_kick(
        &self,
        st: &State,
        room: &str,
        me: &str,
        nick: &str,
        reason: &Option<String>,
    ) -> Result<(Change, String), HubError> {
        let shared = &self.hub.shared;
        let id = st
            .nicks
            .get(&name_key(nick))
            .copied()
            .filter(|id| st.rooms.get(room).is_some_and(|r| r.members.contains(id)))
            .ok_or_else(|| HubError::NotInRoom(super::truncate(nick), room.to_string()))?;
        if shared.is_admin(st, id) && !shared.is_admin(st, self.id) {
            return Err(HubError::NotAdmin);
        }
        let who = nick_of(st, id);
        let why = because(reason);
        let text = format!("{me} kicked {who} from #{room}{why}");
        Ok((
            Change::Kick {
                target: id,
                reason: why,
            },
            text,
        ))
    }

    /// A ban: by the connected user's account (or nick key), or by the name
    /// given; with `address`, also the connected user's address.
    fn plan_ban(
        &self,
        st: &State,
        room: &str,
        me: &str,
        req: BanRequest,
    ) -> Result<(Change, String), HubError> {
        let BanRequest {
            nick,
            duration,
            reason,
            address,
        } = req;
        let (duration, reason) = (&duration, &reason);
        let connected = st.nicks.get(&name_key(&nick)).copied();
        if let Some(id) = connected
            && self.hub.shared.is_admin(st, id)
        {
            return Err(HubError::NotAdmin);
        }
        let c = connected.and_then(|id| st.clients.get(&id));
        let key = c
            .and_then(|c| c.login.clone())
            .unwrap_or_else(|| name_key(&nick));
        let addr = match (address, c) {
            (false, _) => None,
            (true, Some(c)) => c.peer,
            (true, None) => {
                return Err(HubError::BadModeration(format!(
                    "'{}' is not connected; an address ban needs the user connected",
                    super::truncate(&nick)
                )));
            }
        };
        let who = c.map_or(nick, |c| c.nick.clone());
        let in_room =
            connected.filter(|id| st.rooms.get(room).is_some_and(|r| r.members.contains(id)));
        let ban = Ban {
            addr,
            until: until(duration)?,
            reason: reason.clone().unwrap_or_default(),
        };
        let how = duration
            .as_ref()
            .map(|d| format!(" for {d}"))
            .unwrap_or_default();
        let text = format!("{me} banned {who} from #{room}{how}{}", because(reason));
        let change = Change::Ban {
            key,
            ban,
            by: me.to_string(),
            kick: in_room,
        };
        Ok((change, text))
    }
}

/// A per-address cap on guest nicks handed out per minute (`0` = none).
/// Loopback addresses are exempt: a local tool or the machine's own users.
pub(super) struct GuestLimiter {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// The window of [`GuestLimiter`].
const GUEST_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl GuestLimiter {
    /// A limiter of `per_minute` guests per address.
    pub(super) fn new(per_minute: u32) -> GuestLimiter {
        GuestLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a guest from `peer`; refused (with the seconds to wait) over the cap.
    pub(super) fn guest(&self, peer: Option<IpAddr>) -> Result<(), HubError> {
        let Some(ip) = peer.filter(|ip| !ip.is_loopback() && self.per_minute > 0) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < GUEST_WINDOW);
        }
        let (start, n) = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= GUEST_WINDOW {
            *start = now;
            *n = 0;
        }
        if *n >= self.per_minute {
            metrics::counter!("netkit_chat_guests_refused_total").increment(1);
            let wait = GUEST_WINDOW.saturating_sub(now.duration_since(*start));
            return Err(HubError::TooManyGuests(wait.as_secs().max(1)));
        }
        *n += 1;
        Ok(())
    }
}

/// The duplicate-message guard of one client: the same text more than
/// `max` times in a row is refused.
#[derive(Default)]
pub(super) struct Repeats {
    last: u64,
    count: usize,
}

impl Repeats {
    /// Counts `text`; refused if it is the same as the last `max` ones (`0` = no limit).
    pub(super) fn check(&mut self, text: &str, max: usize) -> Result<(), HubError> {
        if max == 0 {
            return Ok(());
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.trim().hash(&mut h);
        let digest = h.finish();
        if digest == self.last && self.count > 0 {
            if self.count >= max {
                metrics::counter!("netkit_chat_repeats_refused_total").increment(1);
                return Err(HubError::Repeated(max));
            }
            self.count += 1;
        } else {
            self.last = digest;
            self.count = 1;
        }
        Ok(())
    }
}

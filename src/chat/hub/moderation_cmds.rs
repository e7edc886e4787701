//! Moderation requests from clients (`/op`, `/kick`, `/ban`, `/mode`, …):
//! parsed, checked against the room's rules under the member lock, and
//! queued for the writer.

use super::moderation::*;
use super::moderation_change::*;
use super::session::Session;
use super::writer::WriteCmd;
use super::{ClientId, HubError, State};
use crate::chat::names::name_key;
use crate::chat::protocol::{ClientMsg, now_ms, valid_room};
use crate::chat::store::Role;

/// A ban as asked for.
pub(super) struct BanRequest {
    pub(super) nick: String,
    pub(super) duration: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) address: bool,
}

/// A moderation request as the hub sees it.
pub(super) enum Request {
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
    pub(super) fn from_msg(msg: ClientMsg) -> Option<(String, Request)> {
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
pub(super) fn because(reason: &Option<String>) -> String {
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
pub(super) fn until(duration: &Option<String>) -> Result<Option<i64>, HubError> {
    let Some(d) = duration else { return Ok(None) };
    let d = crate::cli::parse_duration(d).map_err(HubError::BadModeration)?;
    Ok(Some(
        now_ms().saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
    ))
}

/// A mode string (`+m`, `-i`, `+mi-…`) applied to the current modes.
pub(super) fn parse_mode(
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
/// registered account's (or a user's of another hub, by account); its
/// client if connected here.
pub(super) fn target(st: &State, nick: &str) -> Result<(Holder, Option<ClientId>), HubError> {
    let key = name_key(nick);
    if let Some(&id) = st.nicks.get(&key) {
        return Ok((holder(st, id), Some(id)));
    }
    // A registered account here, or a user of another hub (roles, mutes
    // and invitations cross hubs by account; a guest there holds none).
    if st.registered.contains(&key) || st.remote.has_nick(nick) {
        return Ok((Holder::Account(key), None));
    }
    Err(HubError::NoSuchUser(super::truncate(nick)))
}

/// A change aimed at a user (role, mute, invitation) and its notice.
pub(super) fn plan_targeted(
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
pub(super) fn nick_of(st: &State, id: ClientId) -> String {
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
        let post = super::moderation_change::logged_notice(n);
        self.hub.say_logged(&log, post).await.map(|_| ())
    }

    /// Checks a request (the room, the client's powers, the target) and
    /// makes the change with its notice.
    pub(super) fn plan(&self, st: &State, room: &str, req: Request) -> Result<ModWrite, HubError> {
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
        let mut notice = notice(self.id, room, &me, text);
        notice.moderation = super::moderation_sync::ModAction::of(&change).map(|a| a.to_json());
        Ok(ModWrite {
            client: self.id,
            room: room.to_string(),
            change,
            notice: Some(notice),
            in_force: false,
            remote: false,
        })
    }

    /// A kick of a member of `room` (an admin only by an admin).
    pub(super) fn plan_kick(
        &self,
        st: &State,
        room: &str,
        me: &str,
        nick: &str,
        reason: &Option<String>,
    ) -> Result<(Change, String), HubError> {
        let shared = &self.hub.shared;
        let key = name_key(nick);
        let local = st
            .nicks
            .get(&key)
            .copied()
            .filter(|id| st.rooms.get(room).is_some_and(|r| r.members.contains(id)));
        let why = because(reason);
        let Some(id) = local else {
            // A member on another hub: that hub puts it out.
            let member = st
                .remote
                .rooms
                .get(room)
                .and_then(|set| set.iter().find(|m| name_key(&m.nick) == key))
                .ok_or_else(|| HubError::NotInRoom(super::truncate(nick), room.to_string()))?;
            let text = format!("{me} kicked {} from #{room}{why}", member.nick);
            let target = None;
            let reason = why;
            return Ok((
                Change::Kick {
                    target,
                    key,
                    reason,
                },
                text,
            ));
        };
        if shared.is_admin(st, id) && !shared.is_admin(st, self.id) {
            return Err(HubError::NotAdmin);
        }
        let who = nick_of(st, id);
        let text = format!("{me} kicked {who} from #{room}{why}");
        Ok((
            Change::Kick {
                target: Some(id),
                key: st
                    .clients
                    .get(&id)
                    .and_then(|c| c.login.clone())
                    .unwrap_or(key),
                reason: why,
            },
            text,
        ))
    }

    /// A ban: by the connected user's account (or nick key), or by the name
    /// given; with `address`, also the connected user's address.
    pub(super) fn plan_ban(
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

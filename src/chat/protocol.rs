//! Wire types of the chat protocol: what a client sends ([`ClientMsg`]) and what
//! the hub sends back ([`ServerMsg`]), as JSON objects tagged by `type`, and the
//! name rules ([`valid_room`], [`valid_nick`], from [`names`](super::names)). The WebSocket adapter speaks them
//! as-is; the line adapter translates. See `docs/chat-protocol.md`.

use serde::{Deserialize, Serialize};

pub use super::names::{valid_nick, valid_room};

/// A message from a client to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Join a room (created on first join); `after` resumes from the last id seen.
    Join {
        /// Room name.
        room: String,
        /// Last message id the client saw in this room; it gets every later one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Cluster resume: for each origin, the highest `origin_id` the
        /// client saw in this room (on any node); it gets every message it
        /// has not seen. Takes precedence over `after` on a clustered node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<std::collections::BTreeMap<String, u64>>,
    },
    /// Leave a room.
    Part {
        /// Room name.
        room: String,
    },
    /// Say something in a room the client has joined.
    Say {
        /// Room name.
        room: String,
        /// The text.
        text: String,
    },
    /// An action (`/me waves`) in a room.
    Me {
        /// Room name.
        room: String,
        /// The action text, without the nick.
        text: String,
    },
    /// A direct message to one user.
    Msg {
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
    },
    /// Change nickname.
    Nick {
        /// The wanted nickname.
        nick: String,
    },
    /// Set a room's topic.
    Topic {
        /// Room name.
        room: String,
        /// The new topic (empty clears it).
        topic: String,
    },
    /// List the rooms.
    Rooms,
    /// List the members of a room.
    Who {
        /// Room name.
        room: String,
    },
    /// Ask for a ticket to upload files into a room the client is in
    /// (answered with [`ServerMsg::FileTicket`]; see docs/chat-protocol.md).
    FileTicket {
        /// Room name.
        room: String,
    },
    /// Register the nick the client holds (`--chat-auth accounts|required`).
    Register {
        /// The password (never logged or echoed).
        password: String,
    },
    /// Log in: with `nick` and `password`, or with a `session` token a
    /// `logged_in` gave earlier.
    Login {
        /// The registered nick.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nick: Option<String>,
        /// Its password.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
        /// A session token instead of nick and password.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// Forget a session token (the page's "log out").
    Logout {
        /// The session token to forget.
        session: String,
    },
    /// Log in with an application token (a JWT from the deployment's backend).
    Auth {
        /// The token.
        token: String,
    },
    /// Make a member an operator of a room (operators and admins).
    Op {
        /// Room name.
        room: String,
        /// The member's nick (or a registered account's name).
        nick: String,
    },
    /// Take operator status away.
    Deop {
        /// Room name.
        room: String,
        /// The operator's nick (or account).
        nick: String,
    },
    /// Let a member speak in a moderated (`+m`) room.
    Voice {
        /// Room name.
        room: String,
        /// The member's nick (or account).
        nick: String,
    },
    /// Take a member's voice away.
    Devoice {
        /// Room name.
        room: String,
        /// The member's nick (or account).
        nick: String,
    },
    /// Put a member out of a room (it may join again).
    Kick {
        /// Room name.
        room: String,
        /// The member's nick.
        nick: String,
        /// Why (shown in the notice).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Keep a user (by account, or by nick look-alike key) out of a room.
    Ban {
        /// Room name.
        room: String,
        /// A connected nick, or an account (or nick) name.
        nick: String,
        /// How long, e.g. `10m`, `2h`, `7d` (absent: until unbanned).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration: Option<String>,
        /// Why (shown in the notice and to the banned user).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Also ban the address the user is connected from.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        address: bool,
    },
    /// Lift a ban.
    Unban {
        /// Room name.
        room: String,
        /// The banned nick or account.
        nick: String,
    },
    /// Keep a member from speaking in a room.
    Mute {
        /// Room name.
        room: String,
        /// The member's nick (or account).
        nick: String,
        /// How long (absent: until unmuted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration: Option<String>,
    },
    /// Let a muted member speak again.
    Unmute {
        /// Room name.
        room: String,
        /// The member's nick (or account).
        nick: String,
    },
    /// Change a room's modes: `+m`/`-m` (moderated), `+i`/`-i` (invite-only).
    Mode {
        /// Room name.
        room: String,
        /// The change, e.g. `+m`, `-i`, `+mi`.
        mode: String,
    },
    /// Let a user into an invite-only room.
    Invite {
        /// Room name.
        room: String,
        /// The user's nick (or account).
        nick: String,
    },
    /// Put everyone out of a room and make it invite-only (server admins).
    Close {
        /// Room name.
        room: String,
        /// Why (shown in the notice).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl ClientMsg {
    /// True for the moderation requests (carried out by the hub's moderation rules).
    pub fn is_moderation(&self) -> bool {
        matches!(
            self,
            ClientMsg::Op { .. }
                | ClientMsg::Deop { .. }
                | ClientMsg::Voice { .. }
                | ClientMsg::Devoice { .. }
                | ClientMsg::Kick { .. }
                | ClientMsg::Ban { .. }
                | ClientMsg::Unban { .. }
                | ClientMsg::Mute { .. }
                | ClientMsg::Unmute { .. }
                | ClientMsg::Mode { .. }
                | ClientMsg::Invite { .. }
                | ClientMsg::Close { .. }
        )
    }

    /// True for the requests that identify a client (allowed before login).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            ClientMsg::Register { .. }
                | ClientMsg::Login { .. }
                | ClientMsg::Logout { .. }
                | ClientMsg::Auth { .. }
        )
    }
}

/// Whether a room message is plain speech, a `/me` action or a moderation notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Plain text.
    #[default]
    Say,
    /// An action: render as `* nick text`.
    Me,
    /// A moderation notice (kick, ban, op, mode…): `from` is who did it,
    /// `text` says what in words. Appended last (the cluster relay encodes
    /// kinds by position).
    Notice,
}

impl MessageKind {
    /// True for the default kind (used to leave the field out of JSON).
    pub fn is_say(&self) -> bool {
        *self == MessageKind::Say
    }

    /// The name stored in SQLite.
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageKind::Say => "say",
            MessageKind::Me => "me",
            MessageKind::Notice => "notice",
        }
    }

    /// Parses the name stored in SQLite.
    pub fn from_db(s: &str) -> Self {
        match s {
            "me" => MessageKind::Me,
            "notice" => MessageKind::Notice,
            _ => MessageKind::Say,
        }
    }
}

/// A stored room message, as clients and the API see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Room name.
    pub room: String,
    /// Per-room id, increasing from 1.
    pub id: u64,
    /// Author nick.
    pub from: String,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    /// `me` for actions; absent for plain messages.
    #[serde(default, skip_serializing_if = "MessageKind::is_say")]
    pub kind: MessageKind,
    /// In a cluster: the origin (`node/TAG`) where it was posted; absent with
    /// clustering off and for messages stored before origins were recorded.
    /// (A `Box<str>` keeps [`ServerMsg`] from growing.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Box<str>>,
    /// With `origin`: its `id` in the room on the origin node (increasing
    /// in the origin's order; what `join` with `since` resumes by); 0 (and
    /// absent from JSON) without an origin.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub origin_id: u64,
    /// A file shared into the room (the text then says so in words); absent
    /// for plain messages. (Boxed: most messages have none.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<Box<FileRef>>,
}

/// A file shared in a room, as its message carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The name the uploader gave (validated: no separators or control characters).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the content, 64 hex digits (also the download's ETag).
    pub blake3: String,
    /// Where to download it (absolute URL).
    pub url: String,
    /// The media type sniffed from the content on the server.
    pub mime: String,
    /// True once retention removed the file (`--room-files-retention-days`):
    /// the link is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    /// A thumbnail made on the server (a PNG, longest side 320 px) for an
    /// image; absent for other files and once the file expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumb: Option<String>,
}

impl FileRef {
    /// The message text of a file message: `shared NAME (SIZE) URL`, which
    /// is what clients that know nothing of files show (`… (SIZE), expired`
    /// once the file is removed).
    pub fn summary(&self) -> String {
        if self.expired {
            return format!(
                "shared {} ({}), expired: the file is no longer kept",
                self.name,
                human_size(self.size)
            );
        }
        format!(
            "shared {} ({}) {}",
            self.name,
            human_size(self.size),
            self.url
        )
    }
}

/// A byte count for people: `512 B`, `2.1 MB` (powers of 1000, one decimal).
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// One room in a room list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// Room name.
    pub name: String,
    /// Members connected now.
    pub members: usize,
    /// Topic (may be empty).
    pub topic: String,
    /// Id of the newest message (0 if none).
    pub last_id: u64,
    /// How many of `members` are connected to other cluster nodes (absent when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub remote: usize,
    /// Only invited users (and operators) may join (`+i`; absent when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invite_only: bool,
    /// Only voiced members and operators may speak (`+m`; absent when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moderated: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// A room member connected to another node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RemoteMember {
    /// Its nickname.
    pub nick: String,
    /// The name of the node it is connected to.
    pub node: String,
}

impl RemoteMember {
    /// `nick@node`, how the line protocol and the web page show it.
    pub fn display(&self) -> String {
        format!("{}@{}", self.nick, self.node)
    }
}

/// Presence change in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    /// A member joined.
    Join,
    /// A member left (part or disconnect).
    Leave,
}

/// A message from the hub to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message on a connection: the nick the client got.
    Welcome {
        /// The client's nickname.
        nick: String,
    },
    /// A room message (live or history; history comes right after `joined`).
    Message(ChatMessage),
    /// The client joined a room; history follows, then live messages.
    Joined {
        /// Room name.
        room: String,
        /// Current topic.
        topic: String,
        /// Members now, the client included (at most the presence limit; see `member_count`).
        members: Vec<String>,
        /// How many members the room has.
        #[serde(default)]
        member_count: usize,
        /// Which of `members` are connected to other cluster nodes, and where
        /// (absent when none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remote: Vec<RemoteMember>,
        /// Id of the newest message in the room.
        last_id: u64,
        /// Number of history messages that follow.
        history: usize,
        /// True when more messages were missed than are replayed; fetch the
        /// older ones from `/api/rooms/{room}/messages?before=…`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        /// Members present who are operators (absent when none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ops: Vec<String>,
        /// Members present who are voiced (absent when none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        voiced: Vec<String>,
        /// `+m` (absent when off).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        moderated: bool,
        /// `+i` (absent when off).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        invite_only: bool,
    },
    /// The client left a room.
    Parted {
        /// Room name.
        room: String,
    },
    /// Someone joined or left a room the client is in.
    Presence {
        /// Room name.
        room: String,
        /// Whose presence changed.
        nick: String,
        /// What happened.
        event: PresenceEvent,
        /// The node the member is connected to, when it is another one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// Why a member left when it did not leave itself (e.g. `node down`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Someone (maybe the client) changed nick.
    Nick {
        /// Old nickname.
        old: String,
        /// New nickname.
        new: String,
        /// The node the user is connected to, when it is another one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// A direct message, to the recipient and echoed to the sender.
    Direct {
        /// Sender nick.
        from: String,
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch.
        ts: i64,
    },
    /// A room's topic changed.
    Topic {
        /// Room name.
        room: String,
        /// The new topic.
        topic: String,
        /// Who set it.
        by: String,
    },
    /// The room list.
    Rooms {
        /// Every known room.
        rooms: Vec<RoomInfo>,
    },
    /// The members of a room.
    Members {
        /// Room name.
        room: String,
        /// Member nicks.
        members: Vec<String>,
        /// Which of `members` are connected to other cluster nodes, and where
        /// (absent when none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remote: Vec<RemoteMember>,
    },
    /// The client is logged in (after `register`, `login` or `auth`).
    LoggedIn {
        /// The nick it is logged in as (and now holds).
        nick: String,
        /// How: `password`, `session` or `token`.
        via: String,
        /// A session token for a later `login` (password and session logins).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// When `session` expires, in ms since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires: Option<i64>,
        /// True for a server admin (`--chat-admins`): it may moderate every room.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        admin: bool,
    },
    /// A room's operators, voiced members and modes, as they are now: sent
    /// to every member after each change (`joined` carries them on joining).
    Modes {
        /// Room name.
        room: String,
        /// Members present who are operators.
        ops: Vec<String>,
        /// Members present who are voiced.
        voiced: Vec<String>,
        /// `+m`: only voiced members and operators speak.
        moderated: bool,
        /// `+i`: only invited users and operators join.
        invite_only: bool,
    },
    /// Informational text for a person (e.g. help).
    Info {
        /// The text.
        text: String,
    },
    /// A ticket for uploading files into a room (see docs/chat-protocol.md).
    FileTicket {
        /// Room name.
        room: String,
        /// The bearer token for `POST /api/rooms/{room}/files` and the upload.
        ticket: String,
        /// When it stops being accepted (milliseconds since the Unix epoch).
        expires: i64,
    },
    /// A problem with something the client sent, or why it is being disconnected.
    Error {
        /// Machine-readable code, e.g. `bad_room`, `rate_limited`, `lagging`.
        code: String,
        /// What went wrong and what to do about it.
        message: String,
    },
}

impl ServerMsg {
    /// An error message with a code and an explanation.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// Serializes to the JSON sent over WebSocket.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_messages_have_the_fixed_shape() {
        let m: ClientMsg = serde_json::from_str(r#"{"type":"join","room":"r"}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Join {
                room: "r".into(),
                after: None,
                since: None
            }
        );
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"say","room":"r","text":"hi"}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Say {
                room: "r".into(),
                text: "hi".into()
            }
        );
        let out = ServerMsg::Message(ChatMessage {
            room: "r".into(),
            id: 7,
            from: "ann".into(),
            text: "hi".into(),
            ts: 1000,
            kind: MessageKind::Say,
            origin: None,
            origin_id: 0,
            file: None,
        });
        assert_eq!(
            out.to_json(),
            r#"{"type":"message","room":"r","id":7,"from":"ann","text":"hi","ts":1000}"#
        );
        assert_eq!(
            ServerMsg::error("bad_room", "x").to_json(),
            r#"{"type":"error","code":"bad_room","message":"x"}"#
        );
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "1.0 kB");
        assert_eq!(human_size(2_100_000), "2.1 MB");
        assert_eq!(human_size(999_960), "1.0 MB");
        assert_eq!(human_size(u64::MAX), "18446.7 PB");
    }

    #[test]
    fn unknown_types_and_missing_fields_are_rejected() {
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"dance"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"say","room":"r"}"#).is_err());
    }
}

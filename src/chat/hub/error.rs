//! What goes wrong for a client: [`HubError`], one variant and one stable
//! code per refusal (sent back as an `error` message), and why the hub
//! disconnects a client ([`DisconnectReason`]).

use super::truncate;
use crate::chat::names::{check_nick, check_room};
use crate::chat::protocol::ServerMsg;

/// A problem with a client's request; sent back as an `error` message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    /// Room name not allowed: the name and why.
    #[error("invalid room name '{0}': {1}")]
    BadRoom(String, String),
    /// A new room whose name looks like an existing one's.
    #[error("room name '{0}' looks like the existing room '{1}'; join that one")]
    RoomLookalike(String, String),
    /// Nickname not allowed: the name and why.
    #[error("invalid nickname '{0}': {1}")]
    BadNick(String, String),
    /// Nickname (or one that looks like it) already in use.
    #[error("nickname '{0}' is taken; pick another with /nick")]
    NickTaken(String),
    /// Nickname registered by someone else.
    #[error("nickname '{0}' is registered; /login {0} PASSWORD, or pick another with /nick")]
    NickRegistered(String),
    /// The server requires a login first.
    #[error(
        "log in first: /login NICK PASSWORD, /register PASSWORD (after /nick NAME), or /token TOKEN"
    )]
    LoginRequired,
    /// Accounts or tokens are not enabled on this server.
    #[error("{0}")]
    AuthDisabled(&'static str),
    /// Registration refused (guest name, taken, bad password): why.
    #[error("cannot register: {0}")]
    CannotRegister(String),
    /// Wrong nick or password (not told apart).
    #[error("login failed: wrong nickname or password")]
    LoginFailed,
    /// Too many login attempts for the account or from the address.
    #[error("too many login attempts; try again in {0} s")]
    LoginThrottled(u64),
    /// An application or session token refused: why.
    #[error("token refused: {0}")]
    BadToken(String),
    /// A room the client's token does not allow.
    #[error("your token does not allow room '{0}'")]
    RoomNotAllowed(String),
    /// Client is not in the room.
    #[error("you are not in room '{0}'; join it first")]
    NotMember(String),
    /// Client is already in the room.
    #[error("you are already in room '{0}'")]
    AlreadyJoined(String),
    /// No such user for a direct message.
    #[error("no user named '{0}' is connected; /who lists a room's members")]
    NoSuchUser(String),
    /// Text empty or too long.
    #[error("message text must be 1 to {max} bytes (got {got})")]
    BadText {
        /// Length received.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// Sending too fast.
    #[error("too many messages: the limit is {0} per second; slow down")]
    RateLimited(f64),
    /// The hub is at its connection cap.
    #[error("server full: {0} clients already connected; try again later")]
    Full(usize),
    /// The hub is shutting down.
    #[error("server shutting down")]
    ShuttingDown,
    /// Storing the message failed; it was not sent to anyone.
    #[error("could not store the message, so it was not sent: {0}")]
    Store(String),
    /// A `join` whose `since` vector is out of bounds.
    #[error("bad 'since': {0}")]
    BadSince(String),
    /// A moderation request from a client that is not an operator of the room.
    #[error("you are not an operator of #{0}; ask one of its operators")]
    NotOperator(String),
    /// A request only server admins may make (or one against an admin).
    #[error("only a server admin (--chat-admins, logged in) may do that")]
    NotAdmin,
    /// A moderation request for a room that does not exist.
    #[error("no room named '{0}'")]
    NoSuchRoom(String),
    /// A kick of someone who is not in the room.
    #[error("'{0}' is not in #{1}")]
    NotInRoom(String, String),
    /// A malformed moderation request (duration, mode, target): why.
    #[error("{0}")]
    BadModeration(String),
    /// The client is banned from the room: for how long and why.
    #[error("you are banned from #{0} {1}")]
    Banned(String, String),
    /// The room is invite-only and the client was not invited.
    #[error("#{0} is invite-only; ask an operator to /invite you")]
    InviteOnly(String),
    /// The client is muted in the room.
    #[error("you are muted in #{0}")]
    Muted(String),
    /// The room is moderated and the client has no voice.
    #[error("#{0} is moderated (+m): only voiced members and operators speak")]
    Moderated(String),
    /// The same text sent too many times in a row.
    #[error("the same text more than {0} times in a row is refused; say something else")]
    Repeated(usize),
    /// Too many guest nicks from the client's address this minute.
    #[error("too many new guests from your address; try again in {0} s, or log in")]
    TooManyGuests(u64),
    /// The message broker did not take the message, so nobody was sent it.
    #[error("message not sent: the message broker is unavailable ({0}); try again")]
    Broker(String),
    /// An account another hub shared is not one a hub makes (not stored).
    #[error("account record refused: {0}")]
    BadAccount(String),
}

impl HubError {
    /// The machine-readable `code` of the `error` message.
    pub fn code(&self) -> &'static str {
        match self {
            HubError::BadRoom(..) | HubError::RoomLookalike(..) => "bad_room",
            HubError::BadNick(..) => "bad_nick",
            HubError::NickTaken(_) => "nick_taken",
            HubError::NickRegistered(_) => "nick_registered",
            HubError::LoginRequired => "login_required",
            HubError::AuthDisabled(_) => "auth_disabled",
            HubError::CannotRegister(_) => "cannot_register",
            HubError::LoginFailed => "login_failed",
            HubError::LoginThrottled(_) => "login_throttled",
            HubError::BadToken(_) => "bad_token",
            HubError::RoomNotAllowed(_) => "room_not_allowed",
            HubError::NotMember(_) => "not_member",
            HubError::AlreadyJoined(_) => "already_joined",
            HubError::NoSuchUser(_) => "no_such_user",
            HubError::BadText { .. } => "bad_text",
            HubError::RateLimited(_) => "rate_limited",
            HubError::Full(_) => "server_full",
            HubError::ShuttingDown => "shutting_down",
            HubError::Store(_) => "store_failed",
            HubError::BadSince(_) => "bad_message",
            HubError::NotOperator(_) => "not_operator",
            HubError::NotAdmin => "not_admin",
            HubError::NoSuchRoom(_) => "no_such_room",
            HubError::NotInRoom(..) => "not_in_room",
            HubError::BadModeration(_) => "bad_request",
            HubError::Banned(..) => "banned",
            HubError::InviteOnly(_) => "invite_only",
            HubError::Muted(_) => "muted",
            HubError::Moderated(_) => "moderated",
            HubError::Repeated(_) => "repeated",
            HubError::TooManyGuests(_) => "too_many_guests",
            HubError::Broker(_) => "broker_unavailable",
            HubError::BadAccount(_) => "bad_request",
        }
    }

    /// A refused nickname, with the rule it breaks.
    pub fn bad_nick(nick: &str) -> HubError {
        let why = check_nick(nick)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        HubError::BadNick(truncate(nick), why)
    }

    /// A refused room name, with the rule it breaks.
    pub fn bad_room(room: &str) -> HubError {
        let why = check_room(room)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        HubError::BadRoom(truncate(room), why)
    }

    /// This error as a message for the client.
    pub fn to_msg(&self) -> ServerMsg {
        ServerMsg::error(self.code(), self.to_string())
    }
}

/// Why the hub disconnected a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The outgoing queue overflowed: the client reads too slowly.
    Lagging {
        /// Queue limit in messages.
        messages: usize,
        /// Queue limit in bytes.
        bytes: usize,
    },
    /// The server is shutting down.
    Shutdown,
}

impl DisconnectReason {
    /// Short machine-readable name (metrics label, error code).
    pub fn code(&self) -> &'static str {
        match self {
            DisconnectReason::Lagging { .. } => "lagging",
            DisconnectReason::Shutdown => "shutting_down",
        }
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::Lagging { messages, bytes } => write!(
                f,
                "too slow: outgoing queue over {messages} messages or {bytes} bytes"
            ),
            DisconnectReason::Shutdown => f.write_str("server shutting down"),
        }
    }
}

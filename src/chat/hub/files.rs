//! What the hub does for files shared in rooms: it issues upload tickets to
//! room members over their own connection, tells who holds a ticket, and
//! posts a stored file's message in order with the member's other requests.
//! Where files live and how they travel is not its business.

use tokio::sync::mpsc;

use super::writer::{Post, WriteCmd};
use super::{ClientId, Hub, HubError, Session};
use crate::chat::protocol::{FileRef, MessageKind, ServerMsg, now_ms, valid_room};

/// How long an upload ticket is accepted after it was issued.
pub const TICKET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// A file to post, and where the writer says how it went.
pub(super) struct FileShare {
    /// The stored file.
    pub(super) file: FileRef,
    /// Told the message's id once it is stored and sent, or why it was not.
    pub(super) posted: mpsc::Sender<Result<u64, HubError>>,
}

impl FileShare {
    /// A file message that came from elsewhere (the broker's log): nobody
    /// here waits to hear how it went.
    pub(super) fn carried(file: FileRef) -> FileShare {
        let (posted, _) = mpsc::channel(1);
        FileShare { file, posted }
    }

    /// Tells the poster how it went (it waits for exactly one answer).
    pub(super) fn answer(&self, outcome: Result<u64, HubError>) {
        let _ = self.posted.try_send(outcome);
    }
}

/// A connected room member who presented a valid ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploader {
    client: ClientId,
    /// The room the ticket is for.
    pub room: String,
    /// The member's nickname now.
    pub nick: String,
}

/// Why a ticket is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a ticket this hub issued (or altered).
    #[error(
        "not a valid upload ticket; ask for one with {{\"type\":\"file_ticket\",\"room\":ROOM}}"
    )]
    Invalid,
    /// Issued for another room.
    #[error("the ticket is for room '{0}', not this one")]
    OtherRoom(String),
    /// Too old.
    #[error("the upload ticket has expired; ask for a new one")]
    Expired,
    /// Its holder has disconnected or left the room.
    #[error("the ticket's holder is no longer connected to room '{0}'")]
    Gone(String),
}

/// Whether a file that came from another hub is one a hub could have
/// posted: a valid name, a BLAKE3 of 64 lowercase hex digits and an http(s) link.
pub fn plausible_file(f: &FileRef) -> bool {
    let hex_ok = f.blake3.len() == 64
        && f.blake3
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let url_ok = f.url.starts_with("http://") || f.url.starts_with("https://");
    hex_ok && url_ok && crate::chat::files::names::check_name(&f.name).is_ok()
}

impl Session {
    /// Sends the client a ticket for uploading into `room`, which it must be in.
    pub fn file_ticket(&self, room: &str) -> Result<(), HubError> {
        if !valid_room(room) {
            return Err(HubError::bad_room(room));
        }
        if !self.in_room(room) {
            return Err(HubError::NotMember(room.to_string()));
        }
        // A member who may not speak there (muted, or +m without voice) may not share files.
        if let Some(e) = self.speak_refusal(room) {
            return Err(e);
        }
        let expires = now_ms().saturating_add(TICKET_LIFETIME.as_millis() as i64);
        let ticket = self.hub.ticket(self.id, room, expires);
        self.tell(ServerMsg::FileTicket {
            room: room.to_string(),
            ticket,
            expires,
        });
        Ok(())
    }
}

impl Hub {
    /// The ticket of `client` for `room` until `expires` (ms): its fields,
    /// then a keyed BLAKE3 of them under this hub's random key.
    fn ticket(&self, client: ClientId, room: &str, expires: i64) -> String {
        let fields = format!("{client:x}.{expires}.{room}");
        let mac = blake3::keyed_hash(&self.shared.ticket_key, fields.as_bytes());
        format!("{fields}.{}", mac.to_hex())
    }

    /// Who holds `ticket` for `room`: a client still connected and in the
    /// room, whose ticket this hub issued and has not expired.
    pub fn file_uploader(&self, ticket: &str, room: &str) -> Result<Uploader, TicketError> {
        let (fields, mac) = ticket.rsplit_once('.').ok_or(TicketError::Invalid)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| TicketError::Invalid)?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.shared.ticket_key, fields.as_bytes()) != mac {
            return Err(TicketError::Invalid);
        }
        let mut parts = fields.splitn(3, '.');
        let (Some(client), Some(expires), Some(for_room)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Invalid);
        };
        let client = ClientId::from_str_radix(client, 16).map_err(|_| TicketError::Invalid)?;
        let expires: i64 = expires.parse().map_err(|_| TicketError::Invalid)?;
        if for_room != room {
            return Err(TicketError::OtherRoom(for_room.to_string()));
        }
        if now_ms() > expires {
            return Err(TicketError::Expired);
        }
        let st = self.lock();
        match st.clients.get(&client) {
            Some(c) if c.rooms.contains(room) => Ok(Uploader {
                client,
                room: room.to_string(),
                nick: c.nick.clone(),
            }),
            _ => Err(TicketError::Gone(room.to_string())),
        }
    }

    /// Posts the stored `file` into the uploader's room as a message from
    /// its current nick, through the writer like any message (stored before
    /// anyone is sent it); returns the message's id.
    /// In broker mode the message goes to the log with its file (other hubs
    /// fetch the file when asked for it) and its id is the log's sequence.
    pub async fn post_file(&self, by: &Uploader, file: FileRef) -> Result<u64, HubError> {
        let from = {
            let st = self.lock();
            match st.clients.get(&by.client) {
                Some(c) if c.rooms.contains(&by.room) => c.nick.clone(),
                _ => return Err(HubError::NotMember(by.room.clone())),
            }
        };
        if let Some(log) = self.shared.room_log.get() {
            let post = super::LoggedPost {
                room: by.room.clone(),
                from,
                text: file.summary(),
                kind: MessageKind::Say,
                ts: now_ms(),
                moderation: None,
                file: Some(file),
            };
            return self.say_logged(log, post).await;
        }
        let (tx, mut rx) = mpsc::channel(1);
        let post = Post {
            client: by.client,
            room: by.room.clone(),
            from,
            text: file.summary(),
            kind: MessageKind::Say,
            ts: now_ms(),
            origin: None,
            file: Some(Box::new(FileShare { file, posted: tx })),
            moderation: None,
        };
        self.writer
            .send((WriteCmd::Say(post), None))
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        rx.recv().await.unwrap_or(Err(HubError::ShuttingDown))
    }
}

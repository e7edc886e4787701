//! What a room message looks like on the stream: subject `netkit.room.<room>`
//! and a JSON payload; anything else found on the stream is refused here.

use bytes::Bytes;

use crate::chat::LoggedPost;
use crate::chat::protocol::valid_room;

/// The subjects of the stream: one per room under this prefix.
pub const SUBJECT_PREFIX: &str = "netkit.room.";

/// The subject a room's messages are published on (room names hold no `.`,
/// `*`, `>` or white space, so every valid name is one subject token).
pub fn subject(room: &str) -> String {
    format!("{SUBJECT_PREFIX}{room}")
}

/// The payload of a post.
pub fn encode(post: &LoggedPost) -> Bytes {
    serde_json::to_vec(post)
        .expect("a post always serializes")
        .into()
}

/// Why an entry of the stream is not a room message of ours.
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    /// The payload is not a post.
    #[error("not a netkit room message: {0}")]
    Payload(#[from] serde_json::Error),
    /// The room name is not one a hub accepts.
    #[error("invalid room name")]
    Room,
    /// The subject does not match the room in the payload.
    #[error("subject {0} does not match the room in the message")]
    Subject(String),
}

/// Reads the post published on `subject`.
pub fn decode(subject: &str, payload: &[u8]) -> Result<LoggedPost, BadEntry> {
    let post: LoggedPost = serde_json::from_slice(payload)?;
    if !valid_room(&post.room) {
        return Err(BadEntry::Room);
    }
    if subject.strip_prefix(SUBJECT_PREFIX) != Some(post.room.as_str()) {
        return Err(BadEntry::Subject(subject.chars().take(80).collect()));
    }
    Ok(post)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::protocol::MessageKind;

    fn post(room: &str) -> LoggedPost {
        LoggedPost {
            room: room.into(),
            from: "ann".into(),
            text: "hi".into(),
            kind: MessageKind::Me,
            ts: 7,
        }
    }

    #[test]
    fn a_post_comes_back_as_it_went() {
        let p = post("lobby");
        assert_eq!(decode(&subject("lobby"), &encode(&p)).unwrap(), p);
    }

    #[test]
    fn foreign_entries_are_refused() {
        let p = encode(&post("lobby"));
        assert!(matches!(
            decode("netkit.room.other", &p),
            Err(BadEntry::Subject(_))
        ));
        assert!(matches!(
            decode("netkit.room.lobby", b"hello"),
            Err(BadEntry::Payload(_))
        ));
        let bad = encode(&post("no room"));
        assert!(matches!(
            decode("netkit.room.no room", &bad),
            Err(BadEntry::Room)
        ));
    }
}

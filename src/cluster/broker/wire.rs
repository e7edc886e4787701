//! What netkit puts on NATS: room messages on the stream (subject
//! `netkit.room.<room>`), each room's last topic on a stream of its own
//! (`netkit.topic.<room>`), and on plain subjects presence beats and direct
//! messages; all JSON, and anything else found there is refused here.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chat::accounts::{AccountRecord, SessionRecord};
use crate::chat::hub::plausible_file;
use crate::chat::protocol::{valid_nick, valid_room};
use crate::chat::{LoggedPost, hub::TopicChange};
use crate::cluster::NodeMeta;
use crate::cluster::relay::presence::{Snapshot, SnapshotUser};

/// Presence beats: `netkit.presence.<node>`, a snapshot of the node's users.
pub const PRESENCE_PREFIX: &str = "netkit.presence.";

/// Direct messages to the users of one node: `netkit.direct.<node>`.
pub const DIRECT_PREFIX: &str = "netkit.direct.";

/// Topic changes, from any node: `netkit.topic.<room>`, kept in their own
/// stream ([`TOPICS_STREAM`]), the last one of each room.
pub const TOPIC_PREFIX: &str = "netkit.topic.";

/// The stream of the rooms' topics (one entry per room, the newest).
pub const TOPICS_STREAM: &str = "NETKIT_TOPICS";

/// The subject a room's topic changes are published on.
pub fn topic_subject(room: &str) -> String {
    format!("{TOPIC_PREFIX}{room}")
}

/// Registered accounts: `netkit.account.<key in hex>`, kept in their own
/// stream ([`ACCOUNTS_STREAM`]), the first one of each key.
pub const ACCOUNT_PREFIX: &str = "netkit.account.";

/// The stream of registered accounts (one entry per account key).
pub const ACCOUNTS_STREAM: &str = "NETKIT_ACCOUNTS";

/// The subject an account is claimed on: its name key (which holds any
/// Unicode letter) in lowercase hex, one subject token.
pub fn account_subject(nick: &str) -> String {
    let key = crate::chat::names::name_key(nick);
    let mut s = String::with_capacity(ACCOUNT_PREFIX.len() + 2 * key.len());
    s.push_str(ACCOUNT_PREFIX);
    for b in key.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The payload of an account claim.
pub fn account(record: &AccountRecord) -> Bytes {
    json(record)
}

/// Reads an account claimed on `subject`: refused unless it is well formed
/// (nick, argon2id hash within bounds) and the subject is its nick's key.
pub fn decode_account(subject: &str, payload: &[u8]) -> Result<AccountRecord, BadEntry> {
    let record: AccountRecord = serde_json::from_slice(payload)?;
    record.check().map_err(|_| BadEntry::Content)?;
    own_subject(subject, &account_subject(&record.nick))?;
    Ok(record)
}

/// Page sessions: `netkit.session.<selector>`, kept in their own stream
/// ([`SESSIONS_STREAM`]), the newest entry of each (a logout replaces it).
pub const SESSION_PREFIX: &str = "netkit.session.";

/// The stream of page sessions.
pub const SESSIONS_STREAM: &str = "NETKIT_SESSIONS";

/// The subject of the session whose selector is `selector` (base64url: one
/// subject token).
pub fn session_subject(selector: &str) -> String {
    format!("{SESSION_PREFIX}{selector}")
}

/// The payload of a shared session.
pub fn session(record: &SessionRecord) -> Bytes {
    json(record)
}

/// Reads a session shared on `subject`: refused unless well formed and
/// published under its own selector.
pub fn decode_session(subject: &str, payload: &[u8]) -> Result<SessionRecord, BadEntry> {
    let record: SessionRecord = serde_json::from_slice(payload)?;
    record.check().map_err(|_| BadEntry::Content)?;
    own_subject(subject, &session_subject(&record.selector))?;
    Ok(record)
}

/// Refuses an entry published on `subject` that belongs on `own`.
fn own_subject(subject: &str, own: &str) -> Result<(), BadEntry> {
    if subject != own {
        return Err(BadEntry::Subject(subject.chars().take(80).collect()));
    }
    Ok(())
}

/// Longest hub name on the wire.
const MAX_NODE: usize = 64;

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
    #[error("not netkit's format: {0}")]
    Payload(#[from] serde_json::Error),
    /// The room name is not one a hub accepts.
    #[error("invalid room name")]
    Room,
    /// Names or sizes a hub does not accept.
    #[error("malformed content")]
    Content,
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
    if post.file.as_ref().is_some_and(|f| !plausible_file(f)) {
        return Err(BadEntry::Content);
    }
    Ok(post)
}

/// Whether `node` is a hub name netkit uses: 1 to 64 of `a-z`, `0-9`, `-`
/// (one subject token).
pub fn valid_node(node: &str) -> bool {
    (1..=MAX_NODE).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Any JSON payload of ours.
fn json<T: Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value)
        .expect("a netkit payload always serializes")
        .into()
}

/// The node a subject under `prefix` names, if valid.
fn node_of<'a>(subject: &'a str, prefix: &str) -> Result<&'a str, BadEntry> {
    subject
        .strip_prefix(prefix)
        .filter(|n| valid_node(n))
        .ok_or_else(|| BadEntry::Subject(subject.chars().take(80).collect()))
}

/// A presence beat: the hub's snapshot and where its doors listen (for
/// `/api/cluster`), one JSON object: `{"version", "users", "http", "chat"}`.
/// Read and written through [`BeatWire`] and [`BeatOut`], not with
/// `#[serde(flatten)]`, which buffers the whole object (every user) before
/// reading it: a beat repeats hundreds of users every second.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "BeatWire")]
pub struct Beat {
    /// The hub's users.
    pub snapshot: Snapshot,
    /// The hub's HTTP and line-chat addresses (absent fields: none).
    pub meta: NodeMeta,
}

/// A beat as read off the wire.
#[derive(Deserialize)]
struct BeatWire {
    version: u64,
    users: Vec<SnapshotUser>,
    #[serde(default)]
    http: Option<SocketAddr>,
    #[serde(default)]
    chat: Option<SocketAddr>,
}

impl From<BeatWire> for Beat {
    fn from(w: BeatWire) -> Beat {
        Beat {
            snapshot: Snapshot {
                version: w.version,
                users: w.users,
            },
            meta: NodeMeta {
                http: w.http,
                chat: w.chat,
            },
        }
    }
}

/// A beat as written, borrowing what it sends.
#[derive(Serialize)]
struct BeatOut<'a> {
    version: u64,
    users: &'a [SnapshotUser],
    http: Option<SocketAddr>,
    chat: Option<SocketAddr>,
}

/// What a beat says before its users: its version. Reading it skips the
/// users without keeping them, so a beat that repeats a version already
/// applied costs a scan, not a decode.
#[derive(Deserialize)]
struct BeatHead {
    version: u64,
}

/// The subject and payload of `node`'s presence beat of `snapshot`.
pub fn beat(node: &str, snapshot: &Snapshot, meta: &NodeMeta) -> (String, Bytes) {
    let out = BeatOut {
        version: snapshot.version,
        users: &snapshot.users,
        http: meta.http,
        chat: meta.chat,
    };
    (format!("{PRESENCE_PREFIX}{node}"), json(&out))
}

/// Reads a presence beat: the node it is from and its beat. Its snapshot's
/// names are checked where it is applied (`PresenceTable::apply`), against
/// what that node already sent: a beat repeats hundreds every second.
pub fn decode_beat(subject: &str, payload: &[u8]) -> Result<(String, Beat), BadEntry> {
    let node = node_of(subject, PRESENCE_PREFIX)?;
    let beat: Beat = serde_json::from_slice(payload)?;
    Ok((node.to_string(), beat))
}

/// Reads only the node a beat is from and its version (the payload must
/// still be one well-formed JSON object with a version).
pub fn beat_version(subject: &str, payload: &[u8]) -> Result<(String, u64), BadEntry> {
    let node = node_of(subject, PRESENCE_PREFIX)?;
    let head: BeatHead = serde_json::from_slice(payload)?;
    Ok((node.to_string(), head.version))
}

/// A direct message from a user of one hub to a user of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Direct {
    /// The sender's hub.
    pub from_node: String,
    /// The sender's nick.
    pub from: String,
    /// The recipient's nick (on the hub the subject names).
    pub to: String,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch, set by the sending hub.
    pub ts: i64,
}

/// The subject and payload of a direct message to a user of `to_node`.
pub fn direct(to_node: &str, msg: &Direct) -> (String, Bytes) {
    (format!("{DIRECT_PREFIX}{to_node}"), json(msg))
}

/// Reads a direct message (checked: names and a non-empty text).
pub fn decode_direct(payload: &[u8]) -> Result<Direct, BadEntry> {
    let d: Direct = serde_json::from_slice(payload)?;
    let ok = valid_node(&d.from_node) && valid_nick(&d.from) && valid_nick(&d.to);
    if !ok || d.text.is_empty() {
        return Err(BadEntry::Content);
    }
    Ok(d)
}

/// A topic change as published: which node it is from, and the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// The hub it was set on.
    pub node: String,
    /// The change.
    pub change: TopicChange,
}

/// The payload of a topic change set on `node`.
pub fn topic(node: &str, change: &TopicChange) -> Bytes {
    json(&Topic {
        node: node.to_string(),
        change: change.clone(),
    })
}

/// Reads a topic change published on `subject` (the hub checks the nick
/// and length).
pub fn decode_topic(subject: &str, payload: &[u8]) -> Result<Topic, BadEntry> {
    let t: Topic = serde_json::from_slice(payload)?;
    if !valid_node(&t.node) {
        return Err(BadEntry::Content);
    }
    if !valid_room(&t.change.room) {
        return Err(BadEntry::Room);
    }
    if subject != topic_subject(&t.change.room) {
        return Err(BadEntry::Subject(subject.to_string()));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::protocol::{FileRef, MessageKind};

    fn post(room: &str) -> LoggedPost {
        LoggedPost {
            room: room.into(),
            from: "ann".into(),
            text: "hi".into(),
            kind: MessageKind::Me,
            ts: 7,
            moderation: None,
            file: None,
        }
    }

    #[test]
    fn a_post_comes_back_as_it_went() {
        let p = post("lobby");
        assert_eq!(decode(&subject("lobby"), &encode(&p)).unwrap(), p);
    }

    #[test]
    fn a_file_message_comes_back_with_its_file_and_a_forged_one_does_not() {
        let hex = blake3::hash(b"x").to_hex().to_string();
        let file = FileRef {
            name: "a.txt".into(),
            size: 1,
            blake3: hex.clone(),
            url: format!("http://127.0.0.1:1/files/lobby/{hex}/a.txt"),
            mime: "text/plain".into(),
            expired: false,
            thumb: None,
        };
        let p = LoggedPost {
            file: Some(file.clone()),
            ..post("lobby")
        };
        assert_eq!(decode(&subject("lobby"), &encode(&p)).unwrap(), p);
        // A post without a file is encoded as before (no `file` key).
        assert!(!String::from_utf8_lossy(&encode(&post("lobby"))).contains("file"));
        for bad in [
            FileRef {
                blake3: "00".into(),
                ..file.clone()
            },
            FileRef {
                url: "javascript:alert(1)".into(),
                ..file.clone()
            },
            FileRef {
                name: "../x".into(),
                ..file.clone()
            },
        ] {
            let p = LoggedPost {
                file: Some(bad),
                ..post("lobby")
            };
            assert!(matches!(
                decode(&subject("lobby"), &encode(&p)),
                Err(BadEntry::Content)
            ));
        }
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

    #[test]
    fn beats_and_directs_come_back_and_bad_names_are_refused() {
        let snap = Snapshot {
            version: 3,
            users: vec![crate::cluster::relay::presence::SnapshotUser {
                id: 1,
                nick: "ann".into(),
                rooms: vec!["lobby".into()],
            }],
        };
        let b = Beat {
            snapshot: snap.clone(),
            meta: NodeMeta {
                http: Some("127.0.0.1:8080".parse().unwrap()),
                chat: None,
            },
        };
        let (subject, payload) = beat("hub-1", &b.snapshot, &b.meta);
        assert_eq!(
            decode_beat(&subject, &payload).unwrap(),
            ("hub-1".into(), b.clone())
        );
        assert_eq!(
            beat_version(&subject, &payload).unwrap(),
            ("hub-1".into(), 3)
        );
        // The format is the one written before BeatOut (flattened fields).
        assert_eq!(
            std::str::from_utf8(&payload).unwrap(),
            r#"{"version":3,"users":[{"id":1,"nick":"ann","rooms":["lobby"]}],"http":"127.0.0.1:8080","chat":null}"#
        );
        // A beat without addresses is one with none.
        let bare = serde_json::to_vec(&snap).unwrap();
        assert_eq!(
            decode_beat(&subject, &bare).unwrap().1.meta,
            NodeMeta::default()
        );
        assert!(decode_beat("netkit.presence.Hub 1", &payload).is_err());
        assert!(decode_beat(&subject, b"{}").is_err());
        assert!(beat_version(&subject, b"{}").is_err());
        assert!(beat_version(&subject, br#"{"version":3,"users":[{"id":1"#).is_err());
        assert!(beat_version("netkit.presence.Hub 1", &payload).is_err());
        let d = Direct {
            from_node: "hub-1".into(),
            from: "ann".into(),
            to: "bob".into(),
            text: "hi".into(),
            ts: 1,
        };
        assert_eq!(decode_direct(&direct("hub-2", &d).1).unwrap(), d);
        let empty = Direct {
            text: String::new(),
            ..d
        };
        assert!(decode_direct(&direct("hub-2", &empty).1).is_err());
        let t = TopicChange {
            room: "lobby".into(),
            topic: "t".into(),
            by: "ann".into(),
            ms: 1_764_000_000_000,
            origin: "a/1".into(),
        };
        let on = topic_subject(&t.room);
        assert_eq!(decode_topic(&on, &topic("hub-1", &t)).unwrap().change, t);
        assert!(decode_topic(&on, &topic("a.b", &t)).is_err());
        // Published on another room's subject: refused.
        assert!(decode_topic("netkit.topic.other", &topic("hub-1", &t)).is_err());
        // From a hub older than topic stamps: read with stamp 0.
        let old = br#"{"node":"hub-1","change":{"room":"lobby","topic":"t","by":"ann"}}"#;
        let read = decode_topic(&on, old).unwrap().change;
        assert_eq!((read.ms, read.origin.as_str()), (0, ""));
    }
}

//! The relay's datagrams: [`RelayPacket`] and the [`RelayedMessage`] it
//! carries, encoded as [`MAGIC`] then postcard so the gossip payload
//! channel can be shared.

use serde::{Deserialize, Serialize};

use super::presence::Snapshot;
use crate::chat::hub::TopicChange;

/// First byte of every relay datagram, so the gossip payload channel can be shared.
pub const MAGIC: u8 = 0xC7;

/// A room message as it travels between nodes: an entry of the cluster
/// log, as the origin's store holds it (the same fields in the same order
/// as before the log moved into the hub's store, so the datagram is unchanged).
pub type RelayedMessage = crate::chat::store::LogMessage;

/// One relay datagram between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayPacket {
    /// A message, new or served on request.
    Msg(RelayedMessage),
    /// The sender's highest gap-free sequence per origin.
    Summary(Vec<(String, u64)>),
    /// Asks for `origin`'s messages with a sequence above `after`.
    Pull {
        /// Whose messages.
        origin: String,
        /// The highest one the asker has without a gap.
        after: u64,
    },
    /// The nicknames connected to the sender (for `/api/cluster`).
    Users(Vec<String>),
    /// One piece of a packet too large for one datagram ([`super::parts::split`]).
    Part {
        /// Random id shared by the pieces of one packet.
        id: u64,
        /// This piece's place, from 0.
        index: u16,
        /// How many pieces.
        count: u16,
        /// Its bytes of the encoded packet.
        data: Vec<u8>,
    },
    /// The sender's whole presence (its users and their rooms), replacing
    /// what the receiver held for it ([`super::presence`]).
    Presence(Snapshot),
    /// A direct message from a user of the sender to a user of the receiver,
    /// resent until acknowledged ([`super::direct::DirectLink`]).
    Direct {
        /// Sender nick.
        from: String,
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch, at the sender.
        ts: i64,
        /// The sender's number for it, echoed by [`RelayPacket::DirectAck`].
        id: u64,
    },
    /// "Your direct message `id` arrived" (delivered, or nobody by that
    /// nick is here: either way, no resend would help).
    DirectAck {
        /// The sender's number for it.
        id: u64,
    },
    /// Room topics with when and where each was set: one just set on the
    /// sender, or (at most [`TOPICS_PER_PACKET`] per packet) those it holds,
    /// for a member that came up or now and then in case one was lost. The
    /// receiver keeps the later setting of each room.
    Topics(Vec<TopicChange>),
    /// "Send me every topic you hold": sent to a member this node sees come
    /// up (with this node's own topics), so that a node that has just started
    /// gets them even if the member's own packets reached it too early.
    TopicsPlease,
}

/// Most topics one [`RelayPacket::Topics`] carries; a packet with more is dropped.
pub const TOPICS_PER_PACKET: usize = 32;

impl RelayPacket {
    /// The datagram: [`MAGIC`] then the packet in postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC];
        out.extend(postcard::to_allocvec(self).expect("relay packets always serialize"));
        out
    }

    /// Parses a datagram; `None` if it is not a relay packet or is malformed.
    pub fn decode(data: &[u8]) -> Option<RelayPacket> {
        match data.split_first() {
            Some((&MAGIC, rest)) => RelayPacket::decode_body(rest),
            _ => None,
        }
    }

    /// Parses a packet's postcard bytes. A message from a node that
    /// predates [`RelayedMessage::file`] (its last field) lacks the field's
    /// byte, and one from a node that also predates
    /// [`RelayedMessage::moderation`] lacks two: they are read as `None`.
    pub fn decode_body(body: &[u8]) -> Option<RelayPacket> {
        if let Ok(p) = postcard::from_bytes(body) {
            return Some(p);
        }
        // Variant 0 is `Msg`; `None` is a single 0 byte.
        if body.first() != Some(&0) {
            return None;
        }
        (1..=2).find_map(|missing| {
            let mut legacy = body.to_vec();
            legacy.resize(body.len() + missing, 0);
            postcard::from_bytes(&legacy).ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::relay::presence::SnapshotUser;

    #[test]
    fn presence_packets_roundtrip_and_garbage_is_dropped() {
        let snap = RelayPacket::Presence(Snapshot {
            version: 3,
            users: vec![SnapshotUser {
                id: 7,
                nick: "bob".into(),
                rooms: vec!["lobby".into()],
            }],
        });
        assert_eq!(RelayPacket::decode(&snap.encode()), Some(snap.clone()));
        let direct = RelayPacket::Direct {
            from: "ann".into(),
            to: "bob".into(),
            text: "psst".into(),
            ts: 1,
            id: 9,
        };
        assert_eq!(RelayPacket::decode(&direct.encode()), Some(direct));
        let ack = RelayPacket::DirectAck { id: 9 };
        assert_eq!(RelayPacket::decode(&ack.encode()), Some(ack));
        // Truncated or padded datagrams of a presence packet do not decode.
        let bytes = snap.encode();
        for cut in 1..bytes.len() {
            assert_eq!(RelayPacket::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        // A claimed length far beyond the datagram.
        let mut huge = vec![MAGIC, 6, 3, 0xff, 0xff, 0xff, 0xff, 0x0f];
        huge.extend([0u8; 16]);
        assert_eq!(RelayPacket::decode(&huge), None);
    }

    #[test]
    fn messages_with_and_without_a_moderation_change_decode() {
        use crate::chat::protocol::MessageKind;
        let m = RelayedMessage {
            origin: "b/2".into(),
            seq: 3,
            room: "dev".into(),
            from: "ann".into(),
            text: "ann banned bob".into(),
            kind: MessageKind::Notice,
            ts: 9,
            origin_id: 4,
            moderation: Some(r#"{"kind":"unban","key":"bob"}"#.into()),
            file: None,
        };
        let with = RelayPacket::Msg(m.clone());
        assert_eq!(RelayPacket::decode(&with.encode()), Some(with));
        // From a node that predates the field: the same bytes, minus the
        // last one (`None`), read as a message without a change.
        let without = RelayPacket::Msg(RelayedMessage {
            moderation: None,
            ..m.clone()
        });
        let mut legacy = without.encode();
        assert_eq!(legacy.pop(), Some(0));
        assert_eq!(RelayPacket::decode(&legacy), Some(without));
        // From a node that predates both fields: two bytes fewer.
        let bare = RelayPacket::Msg(RelayedMessage {
            moderation: None,
            file: None,
            ..m.clone()
        });
        let mut older = bare.encode();
        assert_eq!((older.pop(), older.pop()), (Some(0), Some(0)));
        assert_eq!(RelayPacket::decode(&older), Some(bare));
        // A file message keeps its file.
        let file = RelayPacket::Msg(RelayedMessage {
            file: Some(r#"{"name":"a.txt"}"#.into()),
            ..m
        });
        assert_eq!(RelayPacket::decode(&file.encode()), Some(file));
        // Other packets get no such help.
        let mut summary = RelayPacket::Summary(vec![("a".into(), 1)]).encode();
        summary.pop();
        assert_eq!(RelayPacket::decode(&summary), None);
    }
}

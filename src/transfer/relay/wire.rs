//! The relay's matching protocol, sans-IO: the 42-byte hello a peer sends
//! (magic, version, side, channel id) and the relay's short replies
//! (`Waiting`, `Paired`, `Refused`). After `Paired` the relay only copies bytes.

use bytes::{Buf, BufMut, BytesMut};

/// The first 8 bytes of a hello: identifies a netkit relay client.
pub const MAGIC: [u8; 8] = *b"NETKITRL";
/// The matching protocol's version.
pub const VERSION: u8 = 1;
/// Length of a hello: magic, version, side, channel id.
pub const HELLO_LEN: usize = 8 + 1 + 1 + 32;
/// Longest reason a `Refused` reply carries.
pub const MAX_REASON: usize = 512;

const WAITING: u8 = 1;
const PAIRED: u8 = 2;
const REFUSED: u8 = 3;

/// Which end of a transfer a relay peer is; a pair is one of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `netkit send` (byte 1).
    Sender,
    /// `netkit recv` (byte 2).
    Receiver,
}

impl Side {
    fn byte(self) -> u8 {
        match self {
            Side::Sender => 1,
            Side::Receiver => 2,
        }
    }

    /// `sender` or `receiver`, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Side::Sender => "sender",
            Side::Receiver => "receiver",
        }
    }
}

/// What a peer sends the relay first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The peer's side.
    pub side: Side,
    /// The rendezvous id ([`crate::transfer::code::Code::channel_id`]).
    pub channel: [u8; 32],
}

/// Why bytes are not a valid hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not the relay magic: not a netkit relay client.
    #[error("not a netkit relay hello (first bytes {0:?})")]
    BadMagic(String),
    /// Another version of the matching protocol.
    #[error("relay protocol version {0}, this relay speaks {VERSION}")]
    Version(u8),
    /// A side byte other than 1 or 2.
    #[error("unknown side {0}")]
    Side(u8),
}

impl Hello {
    /// The 42 bytes on the wire.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = VERSION;
        out[9] = self.side.byte();
        out[10..].copy_from_slice(&self.channel);
        out
    }

    /// Parses a hello; the magic is checked first, so garbage is named as such.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        if b[..8] != MAGIC {
            return Err(HelloError::BadMagic(
                String::from_utf8_lossy(&b[..8]).escape_debug().to_string(),
            ));
        }
        if b[8] != VERSION {
            return Err(HelloError::Version(b[8]));
        }
        let side = match b[9] {
            1 => Side::Sender,
            2 => Side::Receiver,
            s => return Err(HelloError::Side(s)),
        };
        Ok(Hello {
            side,
            channel: b[10..].try_into().expect("32 bytes"),
        })
    }
}

/// The relay's answer to a hello: `type: u8, length: u16 BE, payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The peer is registered; the relay waits this many seconds for the other side.
    Waiting {
        /// The relay's `--max-wait`, in whole seconds.
        max_wait_secs: u32,
    },
    /// The other side is here: every byte from now on is the other peer's.
    Paired,
    /// The relay turned the peer away, and closes.
    Refused {
        /// The refusal is about this channel (in use, or used up): a new
        /// code, with another channel number, may succeed.
        channel: bool,
        /// Why, for the user.
        reason: String,
    },
}

/// Why bytes are not a valid reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the relay sent a malformed reply ({0}) — is the address a netkit relay?")]
pub struct ReplyError(pub &'static str);

impl Reply {
    /// Appends the encoded reply to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Reply::Waiting { max_wait_secs } => {
                out.put_u8(WAITING);
                out.put_u16(4);
                out.put_u32(*max_wait_secs);
            }
            Reply::Paired => {
                out.put_u8(PAIRED);
                out.put_u16(0);
            }
            Reply::Refused { channel, reason } => {
                let mut end = reason.len().min(MAX_REASON - 1);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.put_u8(REFUSED);
                out.put_u16(1 + end as u16);
                out.put_u8(u8::from(*channel));
                out.put_slice(&reason.as_bytes()[..end]);
            }
        }
    }

    /// Decodes one reply from the front of `buf`, if it is complete.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        if buf.len() < 3 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if len > MAX_REASON {
            return Err(ReplyError("oversized"));
        }
        if buf.len() < 3 + len {
            return Ok(None);
        }
        let ty = buf.get_u8();
        buf.advance(2);
        let mut p = buf.split_to(len);
        match (ty, len) {
            (WAITING, 4) => Ok(Some(Reply::Waiting {
                max_wait_secs: p.get_u32(),
            })),
            (PAIRED, 0) => Ok(Some(Reply::Paired)),
            (REFUSED, 1..) => Ok(Some(Reply::Refused {
                channel: p.get_u8() != 0,
                reason: String::from_utf8_lossy(&p).into_owned(),
            })),
            _ => Err(ReplyError("unknown type or length")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            side: Side::Receiver,
            channel: [7; 32],
        };
        let b = h.encode();
        assert_eq!(&b[..10], b"NETKITRL\x01\x02");
        assert_eq!(Hello::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = b'G';
        assert!(matches!(Hello::decode(&bad), Err(HelloError::BadMagic(_))));
        let mut bad = b;
        bad[8] = 9;
        assert_eq!(Hello::decode(&bad), Err(HelloError::Version(9)));
        let mut bad = b;
        bad[9] = 0;
        assert_eq!(Hello::decode(&bad), Err(HelloError::Side(0)));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The relay example of docs/transfer-protocol.md §8.6: code `7-…`.
    #[test]
    fn worked_example_hello_and_replies() {
        let code = crate::transfer::code::Code::parse("7-aardvark-adroitness").unwrap();
        let id = code.channel_id();
        assert_eq!(
            hex(&id),
            "87aeae45f4a5dd92f02789e6a654bb663f5208cf7dde5a2556b519fcd86b0599"
        );
        let hello = Hello {
            side: Side::Sender,
            channel: id,
        };
        assert_eq!(hex(&hello.encode()[..10]), "4e45544b4954524c0101");
        let mut out = BytesMut::new();
        Reply::Waiting { max_wait_secs: 600 }.encode(&mut out);
        Reply::Paired.encode(&mut out);
        Reply::Refused {
            channel: true,
            reason: "used".into(),
        }
        .encode(&mut out);
        assert_eq!(hex(&out), "010004000002580200000300050175736564");
    }

    #[test]
    fn replies_round_trip_byte_by_byte() {
        let all = [
            Reply::Waiting { max_wait_secs: 600 },
            Reply::Paired,
            Reply::Refused {
                channel: true,
                reason: "channel in use".into(),
            },
        ];
        let mut wire = BytesMut::new();
        for r in &all {
            r.encode(&mut wire);
        }
        assert_eq!(&wire[..7], &[1, 0, 4, 0, 0, 2, 0x58]);
        // Fed one byte at a time, each reply comes out once it is complete.
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for b in wire {
            buf.put_u8(b);
            if let Some(r) = Reply::decode(&mut buf).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got, all);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_char_boundary_and_bad_replies_fail() {
        let mut out = BytesMut::new();
        Reply::Refused {
            channel: false,
            reason: "é".repeat(400),
        }
        .encode(&mut out);
        let Some(Reply::Refused { channel, reason }) = Reply::decode(&mut out).unwrap() else {
            panic!()
        };
        assert!(!channel);
        assert_eq!(reason.len(), MAX_REASON - 2, "cut inside a 2-byte char");
        let mut bad = BytesMut::from(&[9u8, 0, 0][..]);
        assert!(Reply::decode(&mut bad).is_err());
        let mut big = BytesMut::from(&[3u8, 0xff, 0xff][..]);
        assert!(Reply::decode(&mut big).is_err());
    }
}

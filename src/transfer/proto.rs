//! The transfer protocol's wire format, without sockets: the fixed preamble
//! (magic, version, auth method), typed frames in each direction, and a
//! streaming decoder with hard size limits. See `docs/transfer-protocol.md`.
//!
//! Every frame is `type: u8, length: u32 BE, payload`. Integers are big-endian;
//! strings are `u16 length + UTF-8`. A control frame carries at most
//! [`MAX_CONTROL_FRAME`] bytes, a data frame at most [`MAX_DATA_FRAME`]; the
//! decoder rejects a larger length from the header alone, before buffering.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first 8 bytes each side sends: identifies a netkit transfer peer.
pub const MAGIC: [u8; 8] = *b"NETKITXF";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Auth method 0: no authentication (the only one defined in version 1).
pub const AUTH_NONE: u8 = 0;
/// Length of the preamble: magic, version (u16), auth method (u8), reserved (u8).
pub const PREAMBLE_LEN: usize = 12;
/// Largest payload of a control frame (everything except `Data`).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest payload of a `Data` frame.
pub const MAX_DATA_FRAME: usize = 1024 * 1024;
/// Length of the frame header: type (u8) and payload length (u32).
pub const HEADER_LEN: usize = 5;
/// Longest reason string carried by `Reject`, `Failed` and `Error` frames.
pub const MAX_REASON: usize = 1024;

/// A malformed preamble or frame; the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The peer's first bytes are not the netkit transfer magic.
    #[error(
        "peer is not a netkit transfer endpoint (first bytes {0:?}) — check the address and port"
    )]
    BadMagic(String),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks transfer protocol version {peer}, this netkit speaks {ours} — upgrade the older side"
    )]
    Version {
        /// The peer's version.
        peer: u16,
        /// Our version.
        ours: u16,
    },
    /// The peer asks for an auth method this build does not know.
    #[error(
        "peer asks for auth method {0}, this netkit supports only 0 (none) — upgrade this side"
    )]
    Auth(u8),
    /// A frame header announced a payload over the limit for its type.
    #[error("oversized frame: type {kind:#04x} announces {len} bytes, limit is {limit}")]
    Oversized {
        /// Frame type.
        kind: u8,
        /// Announced payload length.
        len: u32,
        /// The limit for this type.
        limit: usize,
    },
    /// An unknown frame type for this direction.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A payload that does not parse as its frame type.
    #[error("malformed {frame} frame: {what}")]
    Malformed {
        /// Frame name.
        frame: &'static str,
        /// What was wrong.
        what: &'static str,
    },
}

/// The preamble each side sends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Protocol version.
    pub version: u16,
    /// Auth method; a later version may define an authenticated, encrypted handshake here.
    pub auth: u8,
}

impl Preamble {
    /// The preamble of this build.
    pub const OURS: Preamble = Preamble {
        version: VERSION,
        auth: AUTH_NONE,
    };

    /// Encodes the 12-byte preamble.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.version.to_be_bytes());
        out[10] = self.auth;
        out
    }

    /// Decodes a preamble (magic checked, version and auth returned as sent).
    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Preamble, ProtoError> {
        if b[..8] != MAGIC {
            return Err(ProtoError::BadMagic(
                String::from_utf8_lossy(&b[..8]).escape_debug().to_string(),
            ));
        }
        Ok(Preamble {
            version: u16::from_be_bytes([b[8], b[9]]),
            auth: b[10],
        })
    }

    /// Checks a decoded peer preamble against ours.
    pub fn check_compatible(&self) -> Result<(), ProtoError> {
        if self.version != VERSION {
            return Err(ProtoError::Version {
                peer: self.version,
                ours: VERSION,
            });
        }
        if self.auth != AUTH_NONE {
            return Err(ProtoError::Auth(self.auth));
        }
        Ok(())
    }
}

/// What an offer describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file, followed by its content.
    File,
    /// A directory (sent after its contents, so its mode and mtime stick).
    Dir,
}

/// A file or directory offered by the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Relative path, `/`-separated; untrusted on the receiving side.
    pub path: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Size in bytes; `None` when unknown in advance (stdin from a pipe).
    pub size: Option<u64>,
    /// Unix permission bits (lower 12 bits are used).
    pub mode: u32,
    /// Modification time as (seconds, nanoseconds) since the Unix epoch, if known.
    pub mtime: Option<(i64, u32)>,
}

/// Frames from the sender to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderFrame {
    /// Offers one file or directory.
    Offer(Offer),
    /// Content follows, starting at this offset of the file.
    Start {
        /// First byte the sender will send (the receiver keeps its prefix up to here).
        offset: u64,
    },
    /// The receiver's existing file has the sender's hash: nothing to send.
    Same,
    /// A chunk of content.
    Data(Bytes),
    /// End of content: the BLAKE3 hash of the whole file.
    Done {
        /// BLAKE3 of the whole file, from byte 0.
        hash: [u8; 32],
    },
    /// The sender has nothing more to send.
    Bye,
    /// Before the first offer: post each stored file into this chat room,
    /// as the member who holds `ticket` (only a `netkit serve` drop takes it).
    Room {
        /// The room's name.
        room: String,
        /// An upload ticket the hub issued to a member of the room.
        ticket: String,
    },
    /// A fatal error; the sender closes after this.
    Error {
        /// Why.
        reason: String,
    },
}

/// Frames from the receiver to the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverFrame {
    /// Send the content from `offset` (0: new file; N: a partial file of N bytes exists).
    Accept {
        /// Length of the partial file the receiver holds.
        offset: u64,
        /// BLAKE3 of those `offset` bytes (all zeros when `offset` is 0).
        prefix_hash: [u8; 32],
    },
    /// A file of the same size exists under this name; this is its BLAKE3.
    Check {
        /// BLAKE3 of the existing file.
        hash: [u8; 32],
    },
    /// The offer is refused; the session goes on with the next offer.
    Reject {
        /// Why, for the user.
        reason: String,
    },
    /// The entry is stored durably under `name` (which may differ from the offered path).
    Stored {
        /// Final relative path.
        name: String,
        /// Size stored.
        size: u64,
    },
    /// An identical file was already there; nothing was written.
    Skipped {
        /// Relative path of the identical file.
        name: String,
    },
    /// The content was received but not stored (hash or size mismatch, I/O error).
    Failed {
        /// Why, for the user.
        reason: String,
    },
    /// A fatal error; the receiver closes after this.
    Error {
        /// Why.
        reason: String,
    },
}

mod tag {
    pub const OFFER: u8 = 0x01;
    pub const START: u8 = 0x02;
    pub const SAME: u8 = 0x03;
    pub const DATA: u8 = 0x04;
    pub const DONE: u8 = 0x05;
    pub const BYE: u8 = 0x06;
    pub const ROOM: u8 = 0x07;
    pub const ACCEPT: u8 = 0x41;
    pub const CHECK: u8 = 0x42;
    pub const REJECT: u8 = 0x43;
    pub const STORED: u8 = 0x44;
    pub const SKIPPED: u8 = 0x45;
    pub const FAILED: u8 = 0x46;
    pub const ERROR: u8 = 0x7f;
}

const FLAG_SIZE: u8 = 1;
const FLAG_MTIME: u8 = 2;

fn limit_for(kind: u8) -> usize {
    if kind == tag::DATA {
        MAX_DATA_FRAME
    } else {
        MAX_CONTROL_FRAME
    }
}

fn put_header(out: &mut BytesMut, kind: u8, len: usize) {
    debug_assert!(len <= limit_for(kind));
    out.put_u8(kind);
    out.put_u32(len as u32);
}

/// Truncates a reason to [`MAX_REASON`] bytes on a char boundary.
pub fn clip_reason(s: &str) -> &str {
    if s.len() <= MAX_REASON {
        return s;
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = if s.len() > u16::MAX as usize {
        clip_reason(s)
    } else {
        s
    };
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn frame(kind: u8, body: impl FnOnce(&mut BytesMut), out: &mut BytesMut) {
    let mut payload = BytesMut::new();
    body(&mut payload);
    put_header(out, kind, payload.len());
    out.extend_from_slice(&payload);
}

/// Encodes the header of a `Data` frame carrying `len` bytes (the payload is
/// written after it by the caller, so content is never copied into a frame).
pub fn data_header(len: usize) -> [u8; HEADER_LEN] {
    assert!(len <= MAX_DATA_FRAME, "data frame over the limit");
    let mut h = [0u8; HEADER_LEN];
    h[0] = tag::DATA;
    h[1..].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

impl SenderFrame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            SenderFrame::Offer(o) => frame(
                tag::OFFER,
                |p| {
                    p.put_u8(match o.kind {
                        EntryKind::File => 0,
                        EntryKind::Dir => 1,
                    });
                    let mut flags = 0;
                    if o.size.is_some() {
                        flags |= FLAG_SIZE;
                    }
                    if o.mtime.is_some() {
                        flags |= FLAG_MTIME;
                    }
                    p.put_u8(flags);
                    p.put_u64(o.size.unwrap_or(0));
                    p.put_u32(o.mode);
                    let (s, ns) = o.mtime.unwrap_or((0, 0));
                    p.put_i64(s);
                    p.put_u32(ns);
                    put_str(p, &o.path);
                },
                out,
            ),
            SenderFrame::Start { offset } => frame(tag::START, |p| p.put_u64(*offset), out),
            SenderFrame::Same => frame(tag::SAME, |_| {}, out),
            SenderFrame::Data(d) => {
                out.extend_from_slice(&data_header(d.len()));
                out.extend_from_slice(d);
            }
            SenderFrame::Done { hash } => frame(tag::DONE, |p| p.put_slice(hash), out),
            SenderFrame::Bye => frame(tag::BYE, |_| {}, out),
            SenderFrame::Room { room, ticket } => frame(
                tag::ROOM,
                |p| {
                    put_str(p, room);
                    put_str(p, ticket);
                },
                out,
            ),
            SenderFrame::Error { reason } => {
                frame(tag::ERROR, |p| put_str(p, clip_reason(reason)), out)
            }
        }
    }

    /// Decodes one frame from the front of `buf`; `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<SenderFrame>, ProtoError> {
        let Some((kind, mut p)) = split_frame(buf)? else {
            return Ok(None);
        };
        let f = match kind {
            tag::OFFER => {
                let name = "Offer";
                let kind = match get_u8(&mut p, name)? {
                    0 => EntryKind::File,
                    1 => EntryKind::Dir,
                    _ => return Err(malformed(name, "unknown entry kind")),
                };
                let flags = get_u8(&mut p, name)?;
                if flags & !(FLAG_SIZE | FLAG_MTIME) != 0 {
                    return Err(malformed(name, "unknown flags"));
                }
                let size = need(&p, 8 + 4 + 8 + 4, name).map(|_| p.get_u64())?;
                let mode = p.get_u32();
                let secs = p.get_i64();
                let nanos = p.get_u32();
                if nanos >= 1_000_000_000 {
                    return Err(malformed(name, "mtime nanoseconds out of range"));
                }
                let path = get_str(&mut p, name)?;
                SenderFrame::Offer(Offer {
                    path,
                    kind,
                    size: (flags & FLAG_SIZE != 0).then_some(size),
                    mode,
                    mtime: (flags & FLAG_MTIME != 0).then_some((secs, nanos)),
                })
            }
            tag::START => SenderFrame::Start {
                offset: get_u64(&mut p, "Start")?,
            },
            tag::SAME => SenderFrame::Same,
            tag::DATA => return Ok(Some(SenderFrame::Data(p))),
            tag::DONE => SenderFrame::Done {
                hash: get_hash(&mut p, "Done")?,
            },
            tag::BYE => SenderFrame::Bye,
            tag::ROOM => SenderFrame::Room {
                room: get_str(&mut p, "Room")?,
                ticket: get_str(&mut p, "Room")?,
            },
            tag::ERROR => SenderFrame::Error {
                reason: get_str(&mut p, "Error")?,
            },
            other => return Err(ProtoError::UnknownType(other)),
        };
        if !p.is_empty() {
            return Err(malformed(frame_name(kind), "trailing bytes"));
        }
        Ok(Some(f))
    }
}

impl ReceiverFrame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReceiverFrame::Accept {
                offset,
                prefix_hash,
            } => frame(
                tag::ACCEPT,
                |p| {
                    p.put_u64(*offset);
                    p.put_slice(prefix_hash);
                },
                out,
            ),
            ReceiverFrame::Check { hash } => frame(tag::CHECK, |p| p.put_slice(hash), out),
            ReceiverFrame::Reject { reason } => {
                frame(tag::REJECT, |p| put_str(p, clip_reason(reason)), out)
            }
            ReceiverFrame::Stored { name, size } => frame(
                tag::STORED,
                |p| {
                    p.put_u64(*size);
                    put_str(p, name);
                },
                out,
            ),
            ReceiverFrame::Skipped { name } => frame(tag::SKIPPED, |p| put_str(p, name), out),
            ReceiverFrame::Failed { reason } => {
                frame(tag::FAILED, |p| put_str(p, clip_reason(reason)), out)
            }
            ReceiverFrame::Error { reason } => {
                frame(tag::ERROR, |p| put_str(p, clip_reason(reason)), out)
            }
        }
    }

    /// Decodes one frame from the front of `buf`; `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<ReceiverFrame>, ProtoError> {
        let Some((kind, mut p)) = split_frame(buf)? else {
            return Ok(None);
        };
        let f = match kind {
            tag::ACCEPT => ReceiverFrame::Accept {
                offset: get_u64(&mut p, "Accept")?,
                prefix_hash: get_hash(&mut p, "Accept")?,
            },
            tag::CHECK => ReceiverFrame::Check {
                hash: get_hash(&mut p, "Check")?,
            },
            tag::REJECT => ReceiverFrame::Reject {
                reason: get_str(&mut p, "Reject")?,
            },
            tag::STORED => ReceiverFrame::Stored {
                size: get_u64(&mut p, "Stored")?,
                name: get_str(&mut p, "Stored")?,
            },
            tag::SKIPPED => ReceiverFrame::Skipped {
                name: get_str(&mut p, "Skipped")?,
            },
            tag::FAILED => ReceiverFrame::Failed {
                reason: get_str(&mut p, "Failed")?,
            },
            tag::ERROR => ReceiverFrame::Error {
                reason: get_str(&mut p, "Error")?,
            },
            other => return Err(ProtoError::UnknownType(other)),
        };
        if !p.is_empty() {
            return Err(malformed(frame_name(kind), "trailing bytes"));
        }
        Ok(Some(f))
    }
}

fn frame_name(kind: u8) -> &'static str {
    match kind {
        tag::OFFER => "Offer",
        tag::START => "Start",
        tag::SAME => "Same",
        tag::DATA => "Data",
        tag::DONE => "Done",
        tag::BYE => "Bye",
        tag::ROOM => "Room",
        tag::ACCEPT => "Accept",
        tag::CHECK => "Check",
        tag::REJECT => "Reject",
        tag::STORED => "Stored",
        tag::SKIPPED => "Skipped",
        tag::FAILED => "Failed",
        tag::ERROR => "Error",
        _ => "unknown",
    }
}

/// How many more bytes `buf` needs before the next frame can be decoded (a
/// hint for reserving buffer space; 0 when a frame is complete or invalid).
pub fn bytes_needed(buf: &[u8]) -> usize {
    if buf.len() < HEADER_LEN {
        return HEADER_LEN - buf.len();
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > limit_for(buf[0]) {
        return 0;
    }
    (HEADER_LEN + len).saturating_sub(buf.len())
}

/// Splits a complete frame off `buf`: its type and payload. Checks the
/// length limit as soon as the header is in.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let limit = limit_for(kind);
    if len as usize > limit {
        return Err(ProtoError::Oversized { kind, len, limit });
    }
    if buf.len() < HEADER_LEN + len as usize {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some((kind, buf.split_to(len as usize).freeze())))
}

fn malformed(frame: &'static str, what: &'static str) -> ProtoError {
    ProtoError::Malformed { frame, what }
}

fn need(p: &Bytes, n: usize, frame: &'static str) -> Result<(), ProtoError> {
    if p.remaining() < n {
        Err(malformed(frame, "payload too short"))
    } else {
        Ok(())
    }
}

fn get_u8(p: &mut Bytes, frame: &'static str) -> Result<u8, ProtoError> {
    need(p, 1, frame)?;
    Ok(p.get_u8())
}

fn get_u64(p: &mut Bytes, frame: &'static str) -> Result<u64, ProtoError> {
    need(p, 8, frame)?;
    Ok(p.get_u64())
}

fn get_hash(p: &mut Bytes, frame: &'static str) -> Result<[u8; 32], ProtoError> {
    need(p, 32, frame)?;
    let mut h = [0u8; 32];
    p.copy_to_slice(&mut h);
    Ok(h)
}

fn get_str(p: &mut Bytes, frame: &'static str) -> Result<String, ProtoError> {
    need(p, 2, frame)?;
    let len = p.get_u16() as usize;
    need(p, len, frame)?;
    let raw = p.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| malformed(frame, "string is not UTF-8"))
}

#[cfg(test)]
mod tests;

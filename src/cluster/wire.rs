//! The gossip packet format: a one-byte kind, then either a foca packet or a
//! netkit message (push-pull state, metadata, leave notice, application
//! payload); with `--cluster-key`, the whole packet sealed with
//! XChaCha20-Poly1305 under the first key of the keyring, and opened with any of them.
//!
//! ```text
//! plain:   0x00 foca-packet            | 0x01 postcard(AppFrame)
//! sealed:  0xA5 nonce[24] ciphertext+tag[16]   (plaintext = one plain packet)
//! ```

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use super::id::{NodeId, NodeMeta};

/// Kind byte of a packet carrying a foca message.
pub const KIND_FOCA: u8 = 0x00;
/// Kind byte of a packet carrying an [`AppFrame`].
pub const KIND_APP: u8 = 0x01;
/// Kind byte of a sealed (encrypted and authenticated) packet.
pub const KIND_SEALED: u8 = 0xA5;
/// Bytes a sealed packet adds: kind, nonce and tag.
pub const SEAL_OVERHEAD: usize = 1 + 24 + 16;

/// A netkit message between two members, next to foca's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppFrame {
    /// The sender's identity.
    pub from: NodeId,
    /// What it says.
    pub msg: AppMsg,
}

/// The netkit messages exchanged over the gossip socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppMsg {
    /// One part of the sender's full membership state (push-pull); `reply`
    /// is false when the receiver should answer with its own state.
    PushPull {
        /// Whether this is the answer to a push-pull (then no answer is due).
        reply: bool,
        /// Members as the sender knows them, down ones included.
        members: Vec<foca::Member<NodeId>>,
    },
    /// The sender's metadata; `want_reply` asks for the receiver's.
    Meta {
        /// The sender's metadata.
        meta: NodeMeta,
        /// Whether the sender does not know the receiver's metadata yet.
        want_reply: bool,
    },
    /// The sender suspects the receiver at this incarnation: a direct nudge so
    /// that a live receiver refutes at once instead of waiting for gossip.
    Suspected {
        /// The receiver's incarnation the suspicion is about.
        incarnation: u16,
    },
    /// The sender is leaving the cluster on purpose.
    Leave,
    /// Opaque application data for whoever subscribed (the chat relay).
    Payload(Vec<u8>),
}

/// Why a received packet was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The packet was empty.
    #[error("empty packet")]
    Empty,
    /// The packet is sealed, and this node has no key.
    #[error("encrypted packet, but this node has no --cluster-key; give every node the same key")]
    UnexpectedSealed,
    /// This node has a key, and the packet is not sealed.
    #[error(
        "unencrypted packet, but this node requires --cluster-key; give every node the same key"
    )]
    NotSealed,
    /// The packet did not authenticate under this node's key.
    #[error("packet does not authenticate with this node's --cluster-key (another key?)")]
    BadSeal,
    /// The kind byte is unknown.
    #[error("unknown packet kind {0:#04x}")]
    UnknownKind(u8),
    /// The netkit message did not decode.
    #[error("malformed netkit message: {0}")]
    Malformed(String),
}

/// A decoded plain packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A foca message, handed to foca as is.
    Foca(&'a [u8]),
    /// A netkit message.
    App(AppFrame),
}

/// Frames a foca packet.
pub fn frame_foca(data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(KIND_FOCA);
    out.extend_from_slice(data);
}

/// Frames a netkit message.
pub fn frame_app(frame: &AppFrame, out: &mut Vec<u8>) {
    out.clear();
    out.push(KIND_APP);
    // Serialising into a Vec cannot fail for these types.
    let body = postcard::to_allocvec(frame).expect("AppFrame serialises");
    out.extend_from_slice(&body);
}

/// Decodes a plain (unsealed) packet.
pub fn decode(packet: &[u8]) -> Result<Packet<'_>, WireError> {
    let (&kind, body) = packet.split_first().ok_or(WireError::Empty)?;
    match kind {
        KIND_FOCA => Ok(Packet::Foca(body)),
        KIND_APP => postcard::from_bytes(body)
            .map(Packet::App)
            .map_err(|e| WireError::Malformed(e.to_string())),
        KIND_SEALED => Err(WireError::UnexpectedSealed),
        other => Err(WireError::UnknownKind(other)),
    }
}

/// Seals packets with the first key of the keyring and opens them with any
/// key in it, so a cluster can rotate keys one node at a time.
#[derive(Clone)]
pub struct Sealer {
    ciphers: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Derives the 256-bit packet key from the `--cluster-key` passphrase.
    pub fn from_passphrase(key: &str) -> Self {
        Self {
            ciphers: vec![Self::cipher(key)],
        }
    }

    /// A keyring from a comma-separated `--cluster-key` list: the first key
    /// seals, every key opens. `None` when an entry is empty.
    pub fn from_keys(list: &str) -> Option<Self> {
        let keys: Vec<&str> = list.split(',').collect();
        if keys.iter().any(|k| k.is_empty()) {
            return None;
        }
        Some(Self {
            ciphers: keys.into_iter().map(Self::cipher).collect(),
        })
    }

    fn cipher(key: &str) -> XChaCha20Poly1305 {
        let key = blake3::derive_key("netkit 2026 cluster gossip packet key", key.as_bytes());
        XChaCha20Poly1305::new(&key.into())
    }

    /// Seals `plain` with a random 192-bit `nonce` into `out`.
    pub fn seal(&self, plain: &[u8], nonce: [u8; 24], out: &mut Vec<u8>) {
        out.clear();
        out.push(KIND_SEALED);
        out.extend_from_slice(&nonce);
        let sealed = self.ciphers[0]
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &[KIND_SEALED],
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for packet sizes");
        out.extend_from_slice(&sealed);
    }

    /// Opens a sealed packet into its plain form.
    pub fn open(&self, packet: &[u8]) -> Result<Vec<u8>, WireError> {
        match packet.first() {
            None => return Err(WireError::Empty),
            Some(&KIND_SEALED) => {}
            Some(_) => return Err(WireError::NotSealed),
        }
        if packet.len() < SEAL_OVERHEAD {
            return Err(WireError::BadSeal);
        }
        let (nonce, body) = packet[1..].split_at(24);
        let payload = || Payload {
            msg: body,
            aad: &[KIND_SEALED],
        };
        self.ciphers
            .iter()
            .find_map(|c| c.decrypt(XNonce::from_slice(nonce), payload()).ok())
            .ok_or(WireError::BadSeal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> AppFrame {
        AppFrame {
            from: NodeId::with_bump("a", "127.0.0.1:1".parse().unwrap(), 7),
            msg: AppMsg::Payload(b"hi".to_vec()),
        }
    }

    #[test]
    fn app_frames_round_trip() {
        let mut out = Vec::new();
        frame_app(&frame(), &mut out);
        assert_eq!(decode(&out).unwrap(), Packet::App(frame()));
        frame_foca(b"xyz", &mut out);
        assert_eq!(decode(&out).unwrap(), Packet::Foca(b"xyz"));
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(decode(&[9, 1]), Err(WireError::UnknownKind(9)));
        assert!(matches!(
            decode(&[KIND_APP, 200]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_keyring_seals_with_its_first_key_and_opens_with_any() {
        let mut plain = Vec::new();
        frame_app(&frame(), &mut plain);
        let old = Sealer::from_passphrase("old");
        let both = Sealer::from_keys("old,new").unwrap();
        let switched = Sealer::from_keys("new,old").unwrap();
        let new = Sealer::from_keys("new").unwrap();
        let seal = |s: &Sealer| {
            let mut out = Vec::new();
            s.seal(&plain, [9; 24], &mut out);
            out
        };
        // Step 1 (add the new key second): everyone still seals with the old one.
        assert_eq!(old.open(&seal(&both)).unwrap(), plain);
        // Step 2 (new key first): nodes holding both keys read it, old-only ones do not.
        assert_eq!(both.open(&seal(&switched)).unwrap(), plain);
        assert_eq!(switched.open(&seal(&both)).unwrap(), plain);
        assert_eq!(old.open(&seal(&switched)), Err(WireError::BadSeal));
        // Step 3 (drop the old key).
        assert_eq!(new.open(&seal(&switched)).unwrap(), plain);
        assert_eq!(new.open(&seal(&old)), Err(WireError::BadSeal));
        assert!(Sealer::from_keys("a,,b").is_none());
        assert!(Sealer::from_keys("").is_none());
    }

    #[test]
    fn sealing_authenticates() {
        let a = Sealer::from_passphrase("secret");
        let b = Sealer::from_passphrase("other");
        let mut plain = Vec::new();
        frame_app(&frame(), &mut plain);
        let mut sealed = Vec::new();
        a.seal(&plain, [3; 24], &mut sealed);
        assert_eq!(sealed.len(), plain.len() + SEAL_OVERHEAD);
        assert_eq!(a.open(&sealed).unwrap(), plain);
        assert_eq!(b.open(&sealed), Err(WireError::BadSeal));
        assert_eq!(a.open(&plain), Err(WireError::NotSealed));
        assert_eq!(decode(&sealed), Err(WireError::UnexpectedSealed));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(a.open(&tampered), Err(WireError::BadSeal));
        assert_eq!(a.open(&sealed[..10]), Err(WireError::BadSeal));
    }
}

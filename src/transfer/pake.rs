//! The code handshake, sans-IO: SPAKE2 (Ed25519 group) with the sender as A
//! and the receiver as B, both identities and the protocol version bound in,
//! then HKDF-SHA256 key confirmation and one sealing key per direction.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};

/// Auth method byte of the preamble for this handshake.
pub const AUTH_SPAKE2: u8 = 1;
/// Protocol version that defines the code handshake.
pub const PAKE_VERSION: u16 = 2;
/// Frame type of a SPAKE2 message (in the range reserved for the handshake).
pub const FRAME_PAKE: u8 = 0x20;
/// Frame type of a key confirmation MAC.
pub const FRAME_CONFIRM: u8 = 0x21;
/// Length of a SPAKE2 message: a side byte and a compressed point.
pub const PAKE_MSG_LEN: usize = 33;
/// Length of a confirmation MAC (HMAC-SHA256).
pub const CONFIRM_LEN: usize = 32;

/// The message a user sees when the codes do not match.
pub const WRONG_CODE: &str = "wrong code (or someone tried to guess it); nothing was sent";

type HmacSha256 = Hmac<Sha256>;

/// Which end of the transfer this is; the sender is SPAKE2's side A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `netkit send`.
    Sender,
    /// `netkit recv` or the file drop.
    Receiver,
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PakeError {
    /// The peer used another code, role or version (or guessed).
    #[error("{WRONG_CODE}")]
    WrongCode,
    /// The peer's SPAKE2 message is malformed.
    #[error("the peer's handshake message is malformed ({0})")]
    BadMessage(String),
}

/// The two sealing keys of a session: one per direction, never shared.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Key for the frames this end sends.
    pub send: [u8; 32],
    /// Key for the frames this end receives.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(…)")
    }
}

/// A started handshake: our SPAKE2 message is ready to send.
pub struct Handshake {
    role: Role,
    version: u16,
    spake: Spake2<Ed25519Group>,
    ours: Vec<u8>,
}

/// SPAKE2's identities, with the protocol version in them.
fn identities(version: u16) -> (Identity, Identity) {
    (
        Identity::new(format!("netkit transfer v{version} sender").as_bytes()),
        Identity::new(format!("netkit transfer v{version} receiver").as_bytes()),
    )
}

impl Handshake {
    /// Starts the handshake for `role` with the shared `password`.
    pub fn start(role: Role, password: &[u8], rng: impl RngCore + CryptoRng) -> Handshake {
        Handshake::start_version(role, password, PAKE_VERSION, rng)
    }

    /// [`Handshake::start`] for another protocol version (tests the binding).
    pub(crate) fn start_version(
        role: Role,
        password: &[u8],
        version: u16,
        rng: impl RngCore + CryptoRng,
    ) -> Handshake {
        let (a, b) = identities(version);
        let pw = Password::new(password);
        let (spake, ours) = match role {
            Role::Sender => Spake2::<Ed25519Group>::start_a_with_rng(&pw, &a, &b, rng),
            Role::Receiver => Spake2::<Ed25519Group>::start_b_with_rng(&pw, &a, &b, rng),
        };
        Handshake {
            role,
            version,
            spake,
            ours,
        }
    }

    /// Our SPAKE2 message, [`PAKE_MSG_LEN`] bytes.
    pub fn message(&self) -> &[u8] {
        &self.ours
    }

    /// Takes the peer's SPAKE2 message and derives the confirmation MACs and keys.
    pub fn finish(self, peer: &[u8]) -> Result<Unconfirmed, PakeError> {
        if peer.len() != PAKE_MSG_LEN {
            return Err(PakeError::BadMessage(format!("{} bytes", peer.len())));
        }
        let (msg_s, msg_r) = match self.role {
            Role::Sender => (&self.ours[..], peer),
            Role::Receiver => (peer, &self.ours[..]),
        };
        let transcript = transcript(self.version, msg_s, msg_r);
        // A message for the wrong side, or an invalid point, means the peer
        // is not the partner this code was made for: same answer as a wrong code.
        let shared = self.spake.finish(peer).map_err(|_| PakeError::WrongCode)?;
        Ok(Unconfirmed::derive(self.role, &shared, &transcript))
    }
}

/// SHA-256 of the version and both SPAKE2 messages, sender's first.
fn transcript(version: u16, msg_s: &[u8], msg_r: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"netkit transfer handshake");
    h.update(version.to_be_bytes());
    h.update(msg_s);
    h.update(msg_r);
    h.finalize().into()
}

/// Keys derived but not yet confirmed: nothing but the confirmation MAC may
/// be sent until [`Unconfirmed::verify`] accepts the peer's.
pub struct Unconfirmed {
    keys: SessionKeys,
    ours: [u8; CONFIRM_LEN],
    peer_key: [u8; 32],
    transcript: [u8; 32],
}

/// The HKDF labels of the key schedule.
mod label {
    pub const CONFIRM_S: &[u8] = b"netkit v2 confirm sender";
    pub const CONFIRM_R: &[u8] = b"netkit v2 confirm receiver";
    pub const KEY_S2R: &[u8] = b"netkit v2 key sender to receiver";
    pub const KEY_R2S: &[u8] = b"netkit v2 key receiver to sender";
}

/// HMAC-SHA256 of the transcript under a confirmation key.
fn confirm_mac(key: &[u8; 32], transcript: &[u8; 32]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(transcript);
    m
}

impl Unconfirmed {
    /// HKDF-SHA256(salt = transcript, ikm = SPAKE2 key) expanded per label.
    fn derive(role: Role, shared: &[u8], transcript: &[u8; 32]) -> Unconfirmed {
        let hk = Hkdf::<Sha256>::new(Some(transcript), shared);
        let expand = |info: &[u8]| {
            let mut k = [0u8; 32];
            hk.expand(info, &mut k)
                .expect("32 bytes is a valid HKDF length");
            k
        };
        let (cs, cr) = (expand(label::CONFIRM_S), expand(label::CONFIRM_R));
        let (s2r, r2s) = (expand(label::KEY_S2R), expand(label::KEY_R2S));
        let (our_ck, peer_ck, keys) = match role {
            Role::Sender => (
                cs,
                cr,
                SessionKeys {
                    send: s2r,
                    recv: r2s,
                },
            ),
            Role::Receiver => (
                cr,
                cs,
                SessionKeys {
                    send: r2s,
                    recv: s2r,
                },
            ),
        };
        Unconfirmed {
            keys,
            ours: confirm_mac(&our_ck, transcript)
                .finalize()
                .into_bytes()
                .into(),
            peer_key: peer_ck,
            transcript: *transcript,
        }
    }

    /// Our confirmation MAC, to send to the peer.
    pub fn confirmation(&self) -> [u8; CONFIRM_LEN] {
        self.ours
    }

    /// Checks the peer's confirmation MAC (in constant time); on success the
    /// session keys may be used.
    pub fn verify(self, peer_mac: &[u8]) -> Result<SessionKeys, PakeError> {
        confirm_mac(&self.peer_key, &self.transcript)
            .verify_slice(peer_mac)
            .map_err(|_| PakeError::WrongCode)?;
        Ok(self.keys)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic "random" source for test vectors (never for real use).
    pub(crate) struct FixedRng(pub u8);

    impl RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            rand_core::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.0;
                self.0 = self.0.wrapping_mul(31).wrapping_add(7);
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for FixedRng {}

    /// Runs both ends of a handshake in memory.
    pub(crate) fn run(
        s: Handshake,
        r: Handshake,
    ) -> (
        Result<SessionKeys, PakeError>,
        Result<SessionKeys, PakeError>,
    ) {
        let (ms, mr) = (s.message().to_vec(), r.message().to_vec());
        let (us, ur) = match (s.finish(&mr), r.finish(&ms)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => return (a.map(|_| unreachable!()), b.map(|_| unreachable!())),
        };
        let (cs, cr) = (us.confirmation(), ur.confirmation());
        (us.verify(&cr), ur.verify(&cs))
    }

    fn os(role: Role, pw: &str) -> Handshake {
        Handshake::start(role, pw.as_bytes(), rand_core::OsRng)
    }

    #[test]
    fn same_code_gives_matching_keys_per_direction() {
        let (s, r) = run(os(Role::Sender, "a-b"), os(Role::Receiver, "a-b"));
        let (s, r) = (s.unwrap(), r.unwrap());
        assert_eq!(s.send, r.recv);
        assert_eq!(s.recv, r.send);
        assert_ne!(s.send, s.recv, "each direction has its own key");
    }

    #[test]
    fn wrong_code_fails_on_both_sides() {
        let (s, r) = run(os(Role::Sender, "a-b"), os(Role::Receiver, "a-c"));
        assert_eq!(s, Err(PakeError::WrongCode));
        assert_eq!(r, Err(PakeError::WrongCode));
        assert_eq!(PakeError::WrongCode.to_string(), WRONG_CODE);
    }

    #[test]
    fn swapped_roles_fail() {
        let (a, b) = run(os(Role::Sender, "a-b"), os(Role::Sender, "a-b"));
        assert!(a.is_err() && b.is_err());
        let (a, b) = run(os(Role::Receiver, "a-b"), os(Role::Receiver, "a-b"));
        assert!(a.is_err() && b.is_err());
    }

    #[test]
    fn another_version_fails() {
        let s = Handshake::start_version(Role::Sender, b"a-b", 3, rand_core::OsRng);
        let (s, r) = run(s, os(Role::Receiver, "a-b"));
        assert_eq!(
            (s, r),
            (Err(PakeError::WrongCode), Err(PakeError::WrongCode))
        );
    }

    #[test]
    fn a_confirmation_from_another_session_is_refused() {
        let s1 = os(Role::Sender, "a-b");
        let r1 = os(Role::Receiver, "a-b");
        let u1 = s1.finish(r1.message()).unwrap();
        // A second, honest session with the same code: its MAC binds its own transcript.
        let (s2, r2) = (os(Role::Sender, "a-b"), os(Role::Receiver, "a-b"));
        let other_u = r2.finish(s2.message()).unwrap();
        assert_eq!(
            u1.verify(&other_u.confirmation()),
            Err(PakeError::WrongCode)
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let s = os(Role::Sender, "a-b");
        assert!(matches!(s.finish(&[0u8; 5]), Err(PakeError::BadMessage(_))));
        let s = os(Role::Sender, "a-b");
        assert_eq!(
            s.finish(&[0xffu8; PAKE_MSG_LEN]).err(),
            Some(PakeError::WrongCode)
        );
    }

    #[test]
    fn every_handshake_gives_new_keys() {
        let (a, _) = run(os(Role::Sender, "a-b"), os(Role::Receiver, "a-b"));
        let (b, _) = run(os(Role::Sender, "a-b"), os(Role::Receiver, "a-b"));
        assert_ne!(a.unwrap().send, b.unwrap().send);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The worked example of docs/transfer-protocol.md §10: fixed scalars
    /// (from [`FixedRng`]), code `7-aardvark-adroitness`.
    #[test]
    fn worked_example_vectors() {
        let pw = b"aardvark-adroitness";
        let s = Handshake::start(Role::Sender, pw, FixedRng(1));
        let r = Handshake::start(Role::Receiver, pw, FixedRng(2));
        let (ms, mr) = (s.message().to_vec(), r.message().to_vec());
        let us = s.finish(&mr).unwrap();
        let ur = r.finish(&ms).unwrap();
        let (cs, cr) = (us.confirmation(), ur.confirmation());
        let keys = us.verify(&cr).unwrap();
        ur.verify(&cs).unwrap();
        let got = [
            hex(&ms),
            hex(&mr),
            hex(&transcript(PAKE_VERSION, &ms, &mr)),
            hex(&cs),
            hex(&cr),
            hex(&keys.send),
            hex(&keys.recv),
        ];
        let want = [
            "4148b81366d5c8b0f4ed6790fffcd07820d07ed5a0f10ffe9568d9611442256799",
            "428b8b2217c1c2f5736574c91c5d2d571f7e3874b0ae56c8ef3b3b816483743b22",
            "b02ee6e09a5250f73cabaeaccaf882cc77c60a590956435b032701360cd10d3c",
            "48c9006ffa1d00f71b3bd498dbe8b73e8a8940ff444e8c8b97b28150ef60772f",
            "a0e79ef350e981be77364f58c6801c3156ba17a3e98cdc01136bda4e22543226",
            "4eecd1f36dfdb44609833106aa567f86a0ddbc9a48bee174b69289d108257f51",
            "4af2c78e98fbf64b26a4a11570d2ff4d37112d589be75bd6a12bfed3c613eabe",
        ];
        assert_eq!(got, want);
        // The sender's first sealed record: the bytes "hi", not last, counter 0.
        let mut out = bytes::BytesMut::new();
        crate::transfer::seal::Sealer::new(&keys.send)
            .seal(b"hi", false, &mut out)
            .unwrap();
        assert_eq!(hex(&out), "0000001262cf92e7ad3a4e2856f53f85396cb1f256bd");
    }
}

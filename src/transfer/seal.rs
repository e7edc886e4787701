//! Sealed records, sans-IO: after the code handshake every byte travels in
//! AES-256-GCM records with a counter nonce per direction, so an altered,
//! replayed, reordered or truncated stream fails to open.
//!
//! Record: `header: u32 BE (bit 31 = last record, bits 0–30 = sealed length)
//! | ciphertext | 16-byte tag`; the header is the associated data, the nonce is
//! 4 zero bytes and the record counter (u64 BE). AES-256-GCM was measured
//! against ChaCha20-Poly1305 on the target CPU (bench/aead) and was faster;
//! ring's stitched AES-NI/VAES + CLMUL code does it in a fraction of the CPU
//! the RustCrypto `aes-gcm` crate took (its GHASH was a third of a sender's
//! time, bench/results/transfer_code-2026-11-28.txt).

use bytes::{Buf, BufMut, BytesMut};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Length of a record header.
pub const RECORD_HEADER: usize = 4;
/// Length of the AEAD tag at the end of each record.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record: a 1 MiB `Data` frame and its header.
pub const MAX_PLAINTEXT: usize = (1 << 20) + 64;
const LAST: u32 = 1 << 31;

/// Why a record stream cannot be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// A record failed authentication: altered, replayed, reordered or forged.
    #[error("a sealed record failed authentication (altered, replayed or reordered in transit)")]
    Forged,
    /// The stream ended before its last record.
    #[error("the sealed stream was cut short (truncated in transit)")]
    Truncated,
    /// A record header announces more than [`MAX_PLAINTEXT`].
    #[error("a sealed record of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Data after the last record.
    #[error("data after the last sealed record")]
    AfterLast,
    /// 2^64 records in one direction: the nonce would repeat.
    #[error("the record counter is exhausted; start a new session")]
    Exhausted,
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// The sealing half of one direction.
pub struct Sealer {
    aead: LessSafeKey,
    counter: u64,
    done: bool,
}

/// The AES-256-GCM key of one direction.
fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

impl Sealer {
    /// A sealer with a fresh key from the handshake; its counter starts at 0.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            aead: aead_key(key),
            counter: 0,
            done: false,
        }
    }

    /// The nonce counter of the next record.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Appends one sealed record of `plain` to `out`; `last` marks the end
    /// of the stream (nothing may be sealed after it).
    pub fn seal(&mut self, plain: &[u8], last: bool, out: &mut BytesMut) -> Result<(), SealError> {
        self.seal_parts(&[plain], last, out)
    }

    /// [`Sealer::seal`] of the concatenation of `parts` (a frame header and
    /// its payload), copied once, straight into `out`.
    pub fn seal_parts(
        &mut self,
        parts: &[&[u8]],
        last: bool,
        out: &mut BytesMut,
    ) -> Result<(), SealError> {
        let plain_len: usize = parts.iter().map(|p| p.len()).sum();
        if plain_len > MAX_PLAINTEXT {
            return Err(SealError::TooLarge(plain_len));
        }
        let start = Sealer::begin(out, plain_len);
        for p in parts {
            out.put_slice(p);
        }
        self.seal_in_place(out, start, last)
    }

    /// Starts a record at the end of `out` (a header to be filled in) with
    /// room for `plain_len` more bytes; returns where the record starts. Put
    /// the plaintext after it, then call [`Sealer::seal_in_place`].
    pub fn begin(out: &mut BytesMut, plain_len: usize) -> usize {
        out.reserve(RECORD_HEADER + plain_len.min(MAX_PLAINTEXT) + TAG_LEN);
        let start = out.len();
        out.put_slice(&[0; RECORD_HEADER]);
        start
    }

    /// Seals, where it lies, the plaintext after the record started at
    /// `start` by [`Sealer::begin`] (everything to the end of `out`), and
    /// appends the tag; `last` marks the end of the stream. On an error the
    /// record is removed from `out`.
    pub fn seal_in_place(
        &mut self,
        out: &mut BytesMut,
        start: usize,
        last: bool,
    ) -> Result<(), SealError> {
        let plain_len = out.len() - start - RECORD_HEADER;
        let checked = if self.done {
            Err(SealError::AfterLast)
        } else if plain_len > MAX_PLAINTEXT {
            Err(SealError::TooLarge(plain_len))
        } else {
            self.counter.checked_add(1).ok_or(SealError::Exhausted)
        };
        let next = match checked {
            Ok(next) => next,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        let counter = std::mem::replace(&mut self.counter, next);
        self.done = last;
        let len = (plain_len + TAG_LEN) as u32;
        let header = (len | if last { LAST } else { 0 }).to_be_bytes();
        out[start..start + RECORD_HEADER].copy_from_slice(&header);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce(counter)),
                Aad::from(header),
                &mut out[start + RECORD_HEADER..],
            )
            .map_err(|_| SealError::TooLarge(plain_len))?;
        out.put_slice(tag.as_ref());
        Ok(())
    }
}

/// One opened record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    /// The plaintext.
    pub plain: BytesMut,
    /// Whether this is the stream's last record.
    pub last: bool,
}

/// The opening half of one direction.
pub struct Opener {
    aead: LessSafeKey,
    counter: u64,
    done: bool,
}

impl Opener {
    /// An opener with the peer's sending key; its counter starts at 0.
    pub fn new(key: &[u8; 32]) -> Opener {
        Opener {
            aead: aead_key(key),
            counter: 0,
            done: false,
        }
    }

    /// Bytes still missing before the record at the front of `buf` is complete.
    pub fn bytes_needed(buf: &[u8]) -> usize {
        if buf.len() < RECORD_HEADER {
            return RECORD_HEADER - buf.len();
        }
        let len = (u32::from_be_bytes(buf[..4].try_into().unwrap()) & !LAST) as usize;
        (RECORD_HEADER + len).saturating_sub(buf.len())
    }

    /// Opens the record at the front of `buf`, if it is complete.
    pub fn open(&mut self, buf: &mut BytesMut) -> Result<Option<Record>, SealError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if self.done {
            return Err(SealError::AfterLast);
        }
        if buf.len() < RECORD_HEADER {
            return Ok(None);
        }
        let raw = u32::from_be_bytes(buf[..4].try_into().unwrap());
        let len = (raw & !LAST) as usize;
        if !(TAG_LEN..=MAX_PLAINTEXT + TAG_LEN).contains(&len) {
            return Err(SealError::TooLarge(len));
        }
        if buf.len() < RECORD_HEADER + len {
            return Ok(None);
        }
        let header = buf.split_to(RECORD_HEADER);
        let mut plain = buf.split_to(len);
        self.aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce(self.counter)),
                Aad::from(&header[..]),
                &mut plain,
            )
            .map_err(|_| SealError::Forged)?;
        plain.truncate(len - TAG_LEN);
        self.counter = self.counter.checked_add(1).ok_or(SealError::Exhausted)?;
        self.done = raw & LAST != 0;
        Ok(Some(Record {
            plain,
            last: self.done,
        }))
    }

    /// Call at the end of the stream: an error unless the last record was opened.
    pub fn finish(&self, leftover: &[u8]) -> Result<(), SealError> {
        match (self.done, leftover.has_remaining()) {
            (true, false) => Ok(()),
            (true, true) => Err(SealError::AfterLast),
            (false, _) => Err(SealError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: [u8; 32] = [3; 32];

    /// Seals `msgs` as separate records (the last one marked) into one buffer,
    /// returning the buffer and each record's byte range.
    fn stream(msgs: &[&[u8]]) -> (BytesMut, Vec<std::ops::Range<usize>>) {
        let mut s = Sealer::new(&K);
        let mut out = BytesMut::new();
        let mut ranges = vec![];
        for (i, m) in msgs.iter().enumerate() {
            let start = out.len();
            s.seal(m, i + 1 == msgs.len(), &mut out).unwrap();
            ranges.push(start..out.len());
        }
        (out, ranges)
    }

    /// Opens every record of `buf`, then checks the end of stream.
    fn open_all(mut buf: BytesMut) -> Result<Vec<Vec<u8>>, SealError> {
        let mut o = Opener::new(&K);
        let mut got = vec![];
        while let Some(r) = o.open(&mut buf)? {
            got.push(r.plain.to_vec());
        }
        o.finish(&buf)?;
        Ok(got)
    }

    #[test]
    fn round_trip() {
        let (buf, _) = stream(&[b"offer", b"", &[9u8; 70_000], b"bye"]);
        let got = open_all(buf).unwrap();
        assert_eq!(
            got,
            vec![
                b"offer".to_vec(),
                vec![],
                vec![9u8; 70_000],
                b"bye".to_vec()
            ]
        );
    }

    #[test]
    fn sealing_in_place_matches_sealing_a_copy() {
        let (mut a, mut b) = (Sealer::new(&K), Sealer::new(&K));
        let (mut copied, mut in_place) = (BytesMut::new(), BytesMut::new());
        for (i, m) in [&b"offer"[..], &[7u8; 70_000], b"bye"].iter().enumerate() {
            let last = i == 2;
            a.seal_parts(&[&m[..2], &m[2..]], last, &mut copied)
                .unwrap();
            let start = Sealer::begin(&mut in_place, m.len());
            in_place.put_slice(m);
            b.seal_in_place(&mut in_place, start, last).unwrap();
        }
        assert_eq!(copied, in_place);
        // A record begun after the last one is refused and taken back out.
        let len = in_place.len();
        let start = Sealer::begin(&mut in_place, 3);
        in_place.put_slice(b"more");
        assert_eq!(
            b.seal_in_place(&mut in_place, start, false),
            Err(SealError::AfterLast)
        );
        assert_eq!(in_place.len(), len);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let (buf, _) = stream(&[b"offer", b"data"]);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x01;
            assert!(open_all(b).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn replay_reorder_drop_and_truncation_are_detected() {
        let (buf, r) = stream(&[b"one", b"two", b"three"]);
        let rec = |i: usize| &buf[r[i].clone()];
        let join = |parts: &[&[u8]]| BytesMut::from(&parts.concat()[..]);
        // Replayed record.
        assert_eq!(
            open_all(join(&[rec(0), rec(0), rec(1), rec(2)])),
            Err(SealError::Forged)
        );
        // Two records swapped.
        assert_eq!(
            open_all(join(&[rec(1), rec(0), rec(2)])),
            Err(SealError::Forged)
        );
        // A dropped record.
        assert_eq!(open_all(join(&[rec(0), rec(2)])), Err(SealError::Forged));
        // Cut after a whole record, and in the middle of one.
        assert_eq!(open_all(join(&[rec(0), rec(1)])), Err(SealError::Truncated));
        assert_eq!(
            open_all(BytesMut::from(&buf[..buf.len() - 3])),
            Err(SealError::Truncated)
        );
        // Something appended after the last record.
        assert_eq!(
            open_all(join(&[&buf[..], rec(0)])),
            Err(SealError::AfterLast)
        );
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut o = Opener::new(&K);
        let mut b = BytesMut::from(&0x7fff_ffffu32.to_be_bytes()[..]);
        assert!(matches!(o.open(&mut b), Err(SealError::TooLarge(_))));
        let mut s = Sealer::new(&K);
        let big = vec![0u8; MAX_PLAINTEXT + 1];
        assert!(s.seal(&big, false, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn nonces_never_repeat_within_or_across_sessions() {
        // Within a session the counter only goes up, and sealing after the
        // last record is refused rather than reusing a nonce.
        let mut s = Sealer::new(&K);
        let mut out = BytesMut::new();
        for i in 0..100 {
            assert_eq!(s.counter(), i);
            s.seal(b"x", false, &mut out).unwrap();
        }
        s.seal(b"end", true, &mut out).unwrap();
        assert_eq!(s.seal(b"more", false, &mut out), Err(SealError::AfterLast));
        // A counter at its end refuses rather than wrapping to 0.
        s.counter = u64::MAX;
        s.done = false;
        assert_eq!(s.seal(b"x", false, &mut out), Err(SealError::Exhausted));
        // A resume is a new connection, hence a new handshake and new keys:
        // counter 0 comes back only under a key never used before.
        use crate::transfer::pake::{Handshake, Role, tests::run};
        let mut keys = std::collections::HashSet::new();
        for _ in 0..4 {
            let s = Handshake::start(Role::Sender, b"a-b", rand_core::OsRng);
            let r = Handshake::start(Role::Receiver, b"a-b", rand_core::OsRng);
            let (ks, _) = run(s, r);
            let ks = ks.unwrap();
            assert!(keys.insert(ks.send) && keys.insert(ks.recv));
        }
    }
}

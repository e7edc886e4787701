//! Packets too large for one datagram: [`split`] into [`RelayPacket::Part`]s
//! and put back together by a bounded [`Reassembly`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::packet::RelayPacket;

/// Largest relay datagram sent (gossip payloads allow about 1250 bytes).
pub const MAX_DATAGRAM: usize = 1000;

/// The datagrams for `packet`: one if it fits in [`MAX_DATAGRAM`], else
/// [`RelayPacket::Part`]s that [`Reassembly`] puts back together. `id` must
/// be random (it tells apart packets in flight from one sender).
pub fn split(packet: &RelayPacket, id: u64) -> Vec<Vec<u8>> {
    let whole = packet.encode();
    if whole.len() <= MAX_DATAGRAM {
        return vec![whole];
    }
    let body = &whole[1..];
    let piece = MAX_DATAGRAM - 32;
    let count = body.len().div_ceil(piece);
    body.chunks(piece)
        .enumerate()
        .map(|(i, data)| {
            RelayPacket::Part {
                id,
                index: i as u16,
                count: count as u16,
                data: data.to_vec(),
            }
            .encode()
        })
        .collect()
}

/// Most pieces one packet may be split into (about 1 MB); a packet
/// announcing more is dropped.
pub const MAX_PARTS: u16 = 1100;

/// Most packets being reassembled at once.
pub const MAX_ASSEMBLIES: usize = 256;

/// Puts split packets back together; bounded, the oldest assembly dropped
/// first (a lost piece is recovered like a lost message: by a pull).
#[derive(Debug, Clone)]
pub struct Reassembly<P> {
    pending: BTreeMap<(P, u64), Assembly>,
}

/// One packet being reassembled: when it began, how many pieces, those in.
type Assembly = (Duration, u16, BTreeMap<u16, Vec<u8>>);

impl<P> Default for Reassembly<P> {
    fn default() -> Self {
        Reassembly {
            pending: BTreeMap::new(),
        }
    }
}

impl<P: Ord + Clone> Reassembly<P> {
    /// Takes a piece from `from`; returns the whole packet once every piece is in.
    pub fn add(
        &mut self,
        from: P,
        id: u64,
        index: u16,
        count: u16,
        data: Vec<u8>,
        now: Duration,
    ) -> Option<RelayPacket> {
        if count == 0 || index >= count || count > MAX_PARTS || data.len() > MAX_DATAGRAM {
            return None;
        }
        let key = (from, id);
        if self.pending.len() >= MAX_ASSEMBLIES && !self.pending.contains_key(&key) {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, (at, _, _))| *at)
                .map(|(k, _)| k.clone())?;
            self.pending.remove(&oldest);
        }
        let entry = self
            .pending
            .entry(key.clone())
            .or_insert_with(|| (now, count, BTreeMap::new()));
        if entry.1 != count {
            return None;
        }
        entry.2.insert(index, data);
        if entry.2.len() < count as usize {
            return None;
        }
        let (_, _, pieces) = self.pending.remove(&key)?;
        let body: Vec<u8> = pieces.into_values().flatten().collect();
        match RelayPacket::decode_body(&body)? {
            RelayPacket::Part { .. } => None,
            packet => Some(packet),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::protocol::MessageKind;
    use crate::cluster::relay::packet::RelayedMessage;

    #[test]
    fn large_packets_are_split_and_reassembled() {
        let big = RelayPacket::Msg(RelayedMessage {
            origin: "a".into(),
            seq: 1,
            room: "r".into(),
            from: "x".into(),
            text: "é".repeat(4000),
            kind: MessageKind::Me,
            ts: 5,
            origin_id: 9,
            moderation: None,
            file: None,
        });
        let mut pieces = split(&big, 42);
        assert!(pieces.len() >= 8, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|d| d.len() <= MAX_DATAGRAM));
        pieces.reverse();
        let mut r = Reassembly::default();
        let mut out = None;
        for (i, d) in pieces.iter().enumerate() {
            let Some(RelayPacket::Part {
                id,
                index,
                count,
                data,
            }) = RelayPacket::decode(d)
            else {
                panic!("not a part");
            };
            // A piece of another packet from the same sender does not mix in.
            assert!(r.add(1, id + 1, 0, 2, vec![1], Duration::ZERO).is_none());
            let got = r.add(1, id, index, count, data, Duration::ZERO);
            assert_eq!(got.is_some(), i + 1 == pieces.len());
            out = got.or(out);
        }
        assert_eq!(out, Some(big));
        let small = RelayPacket::Pull {
            origin: "a".into(),
            after: 3,
        };
        assert_eq!(split(&small, 1), vec![small.encode()]);
        assert!(r.add(1, 9, 3, 2, vec![], Duration::ZERO).is_none());
    }

    #[test]
    fn oversized_and_garbage_pieces_are_refused() {
        // Pieces announcing more than MAX_PARTS, or larger than a datagram,
        // are refused before anything is held.
        let mut r = Reassembly::default();
        assert!(
            r.add(1, 1, 0, MAX_PARTS + 1, vec![0], Duration::ZERO)
                .is_none()
        );
        assert!(
            r.add(1, 2, 0, 2, vec![0; MAX_DATAGRAM + 1], Duration::ZERO)
                .is_none()
        );
        assert!(r.pending.is_empty());
        // A split snapshot whose reassembled body is garbage yields nothing.
        assert!(r.add(1, 3, 0, 2, vec![6, 3], Duration::ZERO).is_none());
        assert!(r.add(1, 3, 1, 2, vec![0xff; 8], Duration::ZERO).is_none());
        assert!(r.pending.is_empty());
    }
}

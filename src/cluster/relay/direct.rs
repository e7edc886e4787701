//! Direct messages between nodes, sans-IO: numbered, acknowledged, resent
//! until acknowledged, and shown once however many copies arrive.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use super::packet::RelayPacket;

/// How long an unacknowledged direct message waits before it is resent (the
/// relay checks on its one-second tick).
pub const DIRECT_RESEND: Duration = Duration::from_secs(1);
/// Resends of one direct message before it is given up.
pub const DIRECT_TRIES: u8 = 5;
/// Direct messages remembered as seen (per receiving node), to drop resends.
pub const DIRECT_SEEN: usize = 4096;

/// Direct messages between nodes, sans-IO: each gets a number; the sender
/// resends it every [`DIRECT_RESEND`] until acknowledged (at most
/// [`DIRECT_TRIES`] times), and the receiver acknowledges every copy but
/// shows only the first. So a lost datagram costs a resend, not the message,
/// and a resend is never shown twice.
#[derive(Debug, Clone)]
pub struct DirectLink<P> {
    next_id: u64,
    /// id → (peer, packet, resends left, due).
    pending: BTreeMap<u64, (P, RelayPacket, u8, Duration)>,
    seen: HashSet<(P, u64)>,
    seen_order: VecDeque<(P, u64)>,
}

impl<P> Default for DirectLink<P> {
    fn default() -> Self {
        DirectLink {
            next_id: 0,
            pending: BTreeMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
        }
    }
}

impl<P: Clone + Eq + std::hash::Hash> DirectLink<P> {
    /// The packet that carries a new direct message to `peer`; it is kept
    /// for resending until [`DirectLink::acked`].
    pub fn send(
        &mut self,
        peer: P,
        from: String,
        to: String,
        text: String,
        ts: i64,
        now: Duration,
    ) -> RelayPacket {
        self.next_id += 1;
        let packet = RelayPacket::Direct {
            from,
            to,
            text,
            ts,
            id: self.next_id,
        };
        self.pending.insert(
            self.next_id,
            (peer, packet.clone(), DIRECT_TRIES, now + DIRECT_RESEND),
        );
        packet
    }

    /// `peer` acknowledged `id`.
    pub fn acked(&mut self, peer: &P, id: u64) {
        if self.pending.get(&id).is_some_and(|(p, ..)| p == peer) {
            self.pending.remove(&id);
        }
    }

    /// What is due for resending at `now`; messages out of tries are dropped
    /// (and counted in the second value).
    pub fn due(&mut self, now: Duration) -> (Vec<(P, RelayPacket)>, usize) {
        let mut out = Vec::new();
        let mut given_up = 0;
        self.pending.retain(|_, (peer, packet, left, due)| {
            if *due > now {
                return true;
            }
            if *left == 0 {
                given_up += 1;
                return false;
            }
            *left -= 1;
            *due = now + DIRECT_RESEND;
            out.push((peer.clone(), packet.clone()));
            true
        });
        (out, given_up)
    }

    /// A direct message `id` came from `peer`: whether it is new (to be
    /// shown). Acknowledge it either way.
    pub fn first_time(&mut self, peer: P, id: u64) -> bool {
        if !self.seen.insert((peer.clone(), id)) {
            return false;
        }
        self.seen_order.push_back((peer, id));
        if self.seen_order.len() > DIRECT_SEEN
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }

    /// Messages waiting for an acknowledgement.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_messages_are_resent_until_acknowledged_and_shown_once() {
        let ms = Duration::from_millis;
        let mut a: DirectLink<u8> = DirectLink::default();
        let p1 = a.send(2, "ann".into(), "bob".into(), "one".into(), 1, ms(0));
        let p2 = a.send(3, "ann".into(), "cid".into(), "two".into(), 2, ms(0));
        let (RelayPacket::Direct { id: id1, .. }, RelayPacket::Direct { id: id2, .. }) = (&p1, &p2)
        else {
            panic!("direct packets");
        };
        assert_ne!(id1, id2);
        // Nothing is due before the resend interval.
        assert_eq!(a.due(ms(999)), (vec![], 0));
        // Unacknowledged: resent to the same peer, same packet.
        let (resend, _) = a.due(DIRECT_RESEND);
        assert_eq!(resend, vec![(2, p1.clone()), (3, p2.clone())]);
        // An ack from the wrong peer does not count; from the right one it does.
        a.acked(&3, *id1);
        a.acked(&2, *id1);
        assert_eq!(a.pending(), 1);
        // The other is resent DIRECT_TRIES times in all, then given up.
        let mut resends = 1;
        let mut given_up = 0;
        for k in 2..20u64 {
            let (out, g) = a.due(DIRECT_RESEND * k as u32);
            resends += out.len();
            given_up += g;
        }
        assert_eq!((resends, given_up), (DIRECT_TRIES as usize, 1));
        assert_eq!(a.pending(), 0);

        // The receiver shows each (peer, id) once, resends and all.
        let mut b: DirectLink<u8> = DirectLink::default();
        assert!(b.first_time(1, 7));
        assert!(!b.first_time(1, 7));
        assert!(b.first_time(2, 7), "another sender's 7 is another message");
        // The memory of what was seen is bounded.
        for id in 100..100 + DIRECT_SEEN as u64 {
            assert!(b.first_time(1, id));
        }
        assert!(b.seen.len() <= DIRECT_SEEN);
        assert!(b.first_time(1, 7), "forgotten after DIRECT_SEEN newer ones");
    }
}

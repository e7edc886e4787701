//! The relay's matching table, without sockets: who waits on which channel,
//! which channels are used up, and the verdict for each new hello. Generic
//! over what is handed to the waiting peer, so it is tested with plain values.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Refusal;
use super::wire::{Hello, Side};

/// A channel id: [`crate::transfer::code::Code::channel_id`].
pub type ChannelId = [u8; 32];

/// Most used-up channels remembered; past it the oldest is forgotten first.
const MAX_USED: usize = 65_536;

/// The verdict on a hello.
#[derive(Debug)]
pub enum Join<P> {
    /// No partner yet: wait for one on `rx`; `ticket` identifies this wait to [`Rendezvous::leave`].
    Wait {
        /// This wait's ticket.
        ticket: u64,
        /// Delivers the partner once the other side arrives.
        rx: oneshot::Receiver<P>,
    },
    /// The other side waits already: hand this peer to it on `tx`. The channel is now used up.
    Pair(oneshot::Sender<P>),
    /// Turned away.
    Refused(Refusal),
}

/// Peers waiting for their partner, and the channels that were used.
#[derive(Debug)]
pub struct Rendezvous<P> {
    table: Mutex<Table<P>>,
    max_waiting: usize,
    reuse_after: Duration,
}

#[derive(Debug)]
struct Table<P> {
    waiting: HashMap<ChannelId, Waiter<P>>,
    used: HashMap<ChannelId, Instant>,
    used_order: VecDeque<(ChannelId, Instant)>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter<P> {
    side: Side,
    ticket: u64,
    tx: oneshot::Sender<P>,
}

impl<P> Rendezvous<P> {
    /// At most `max_waiting` peers wait at once; a used channel is refused
    /// for `reuse_after`.
    pub fn new(max_waiting: usize, reuse_after: Duration) -> Self {
        Rendezvous {
            table: Mutex::new(Table {
                waiting: HashMap::new(),
                used: HashMap::new(),
                used_order: VecDeque::new(),
                next_ticket: 0,
            }),
            max_waiting,
            reuse_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<P>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict on `hello` at `now`. `can_pair`: a pair slot is free
    /// (else a peer that would pair is refused as busy, and the waiter stays).
    pub fn join(&self, hello: &Hello, now: Instant, can_pair: bool) -> Join<P> {
        let mut t = self.lock();
        t.forget_used(now, self.reuse_after);
        if t.used.contains_key(&hello.channel) {
            return Join::Refused(Refusal::ChannelUsed);
        }
        match t.waiting.get(&hello.channel) {
            Some(w) if w.side == hello.side => return Join::Refused(Refusal::ChannelTaken),
            Some(_) if !can_pair => return Join::Refused(Refusal::Busy),
            Some(_) => {
                let w = t.waiting.remove(&hello.channel).expect("present");
                t.mark_used(hello.channel, now);
                return Join::Pair(w.tx);
            }
            None => {}
        }
        if t.waiting.len() >= self.max_waiting {
            return Join::Refused(Refusal::TooManyWaiting);
        }
        let (tx, rx) = oneshot::channel();
        let ticket = t.next_ticket;
        t.next_ticket += 1;
        t.waiting.insert(
            hello.channel,
            Waiter {
                side: hello.side,
                ticket,
                tx,
            },
        );
        Join::Wait { ticket, rx }
    }

    /// Takes the wait `ticket` on `channel` off the table (the peer left or
    /// its time ran out). False when it was paired meanwhile: its partner is on the way.
    pub fn leave(&self, channel: &ChannelId, ticket: u64) -> bool {
        let mut t = self.lock();
        match t.waiting.get(channel) {
            Some(w) if w.ticket == ticket => {
                t.waiting.remove(channel);
                true
            }
            _ => false,
        }
    }

    /// Peers waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

impl<P> Table<P> {
    fn mark_used(&mut self, id: ChannelId, now: Instant) {
        if self.used_order.len() >= MAX_USED
            && let Some((old, _)) = self.used_order.pop_front()
        {
            self.used.remove(&old);
        }
        self.used.insert(id, now);
        self.used_order.push_back((id, now));
    }

    /// Drops the used channels older than `reuse_after` (oldest first).
    fn forget_used(&mut self, now: Instant, reuse_after: Duration) {
        while let Some((id, at)) = self.used_order.front().copied() {
            if now.duration_since(at) < reuse_after {
                break;
            }
            self.used_order.pop_front();
            if self.used.get(&id) == Some(&at) {
                self.used.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(side: Side, ch: u8) -> Hello {
        Hello {
            side,
            channel: [ch; 32],
        }
    }

    #[test]
    fn a_sender_and_a_receiver_pair_once_and_the_channel_is_used_up() {
        let r = Rendezvous::<&str>::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let Join::Wait { mut rx, .. } = r.join(&hello(Side::Sender, 1), t0, true) else {
            panic!("first peer waits")
        };
        let Join::Pair(tx) = r.join(&hello(Side::Receiver, 1), t0, true) else {
            panic!("second pairs")
        };
        tx.send("receiver").unwrap();
        assert_eq!(rx.try_recv().unwrap(), "receiver");
        assert_eq!(r.waiting(), 0);
        for side in [Side::Sender, Side::Receiver] {
            assert!(matches!(
                r.join(&hello(side, 1), t0, true),
                Join::Refused(Refusal::ChannelUsed)
            ));
        }
        // After the cool-down the number may be used again.
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            r.join(&hello(Side::Sender, 1), later, true),
            Join::Wait { .. }
        ));
    }

    #[test]
    fn same_side_busy_and_the_waiting_cap_are_refused() {
        let r = Rendezvous::<()>::new(2, Duration::from_secs(60));
        let now = Instant::now();
        let Join::Wait { ticket, .. } = r.join(&hello(Side::Receiver, 1), now, true) else {
            panic!()
        };
        assert!(matches!(
            r.join(&hello(Side::Receiver, 1), now, true),
            Join::Refused(Refusal::ChannelTaken)
        ));
        // No pair slot: the newcomer is refused, the waiter stays.
        assert!(matches!(
            r.join(&hello(Side::Sender, 1), now, false),
            Join::Refused(Refusal::Busy)
        ));
        assert_eq!(r.waiting(), 1);
        let _w2 = r.join(&hello(Side::Sender, 2), now, true);
        assert!(matches!(
            r.join(&hello(Side::Sender, 3), now, true),
            Join::Refused(Refusal::TooManyWaiting)
        ));
        // Leaving frees the channel without using it up.
        assert!(r.leave(&[1; 32], ticket));
        assert!(!r.leave(&[1; 32], ticket), "a ticket leaves once");
        assert!(matches!(
            r.join(&hello(Side::Sender, 1), now, true),
            Join::Wait { .. }
        ));
    }

    #[test]
    fn a_paired_ticket_cannot_leave_and_a_stale_ticket_does_not_evict_a_new_waiter() {
        let r = Rendezvous::<()>::new(10, Duration::from_secs(60));
        let now = Instant::now();
        let Join::Wait { ticket: t1, .. } = r.join(&hello(Side::Sender, 1), now, true) else {
            panic!()
        };
        let _pair = r.join(&hello(Side::Receiver, 1), now, true);
        assert!(!r.leave(&[1; 32], t1), "paired meanwhile");
        let Join::Wait { ticket: t2, .. } = r.join(&hello(Side::Sender, 2), now, true) else {
            panic!()
        };
        assert!(!r.leave(&[2; 32], t1));
        assert!(r.leave(&[2; 32], t2));
    }
}

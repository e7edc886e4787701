//! Abuse limits of the chat hub: a per-address cap on guest nicks handed out
//! per minute, and a guard against the same text said many times in a row.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

use super::HubError;

/// A per-address cap on guest nicks handed out per minute (`0` = none).
/// Loopback addresses are exempt: a local tool or the machine's own users.
pub(super) struct GuestLimiter {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// The window of [`GuestLimiter`].
const GUEST_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl GuestLimiter {
    /// A limiter of `per_minute` guests per address.
    pub(super) fn new(per_minute: u32) -> GuestLimiter {
        GuestLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a guest from `peer`; refused (with the seconds to wait) over the cap.
    pub(super) fn guest(&self, peer: Option<IpAddr>) -> Result<(), HubError> {
        let Some(ip) = peer.filter(|ip| !ip.is_loopback() && self.per_minute > 0) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < GUEST_WINDOW);
        }
        let (start, n) = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= GUEST_WINDOW {
            *start = now;
            *n = 0;
        }
        if *n >= self.per_minute {
            metrics::counter!("netkit_chat_guests_refused_total").increment(1);
            let wait = GUEST_WINDOW.saturating_sub(now.duration_since(*start));
            return Err(HubError::TooManyGuests(wait.as_secs().max(1)));
        }
        *n += 1;
        Ok(())
    }
}

/// The duplicate-message guard of one client: the same text more than
/// `max` times in a row is refused.
#[derive(Default)]
pub(super) struct Repeats {
    last: u64,
    count: usize,
}

impl Repeats {
    /// Counts `text`; refused if it is the same as the last `max` ones (`0` = no limit).
    pub(super) fn check(&mut self, text: &str, max: usize) -> Result<(), HubError> {
        if max == 0 {
            return Ok(());
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.trim().hash(&mut h);
        let digest = h.finish();
        if digest == self.last && self.count > 0 {
            if self.count >= max {
                metrics::counter!("netkit_chat_repeats_refused_total").increment(1);
                return Err(HubError::Repeated(max));
            }
            self.count += 1;
        } else {
            self.last = digest;
            self.count = 1;
        }
        Ok(())
    }
}

//! Per-address connection limits shared by every door: at most N connections
//! from one IP at once, so one host cannot take a whole server's connection cap.
//! A refusal is counted in `/metrics` under the door's name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The `--max-conns-per-ip` flag, the same for every door of a command.
#[derive(Debug, Clone, clap::Args)]
pub struct PerIpArgs {
    /// Most connections one address may hold open on each door (0: no limit);
    /// loopback peers (a local reverse proxy, local tools) are not counted.
    #[arg(long, default_value_t = 64, env = "NETKIT_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: usize,
}

/// Connections open per address on one door, and the cap.
#[derive(Debug, Clone)]
pub struct PerIpLimit {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    door: &'static str,
    max: usize,
    loopback: bool,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its address's slot.
#[derive(Debug)]
pub struct IpPermit {
    inner: Option<(Arc<Inner>, IpAddr)>,
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let Some((inner, ip)) = self.inner.take() else {
            return;
        };
        let mut open = inner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

impl PerIpLimit {
    /// At most `max` connections per address on `door` (0: no limit).
    /// Loopback peers are not counted: on the host itself they are a reverse
    /// proxy or a local tool, one address for many users.
    pub fn new(door: &'static str, max: usize) -> Self {
        Self::build(door, max, false)
    }

    /// Like [`new`](Self::new), but loopback peers count too (tests, or a
    /// server that only local users reach directly).
    pub fn including_loopback(door: &'static str, max: usize) -> Self {
        Self::build(door, max, true)
    }

    /// No limit at all.
    pub fn unlimited(door: &'static str) -> Self {
        Self::build(door, 0, false)
    }

    fn build(door: &'static str, max: usize, loopback: bool) -> Self {
        PerIpLimit {
            inner: Arc::new(Inner {
                door,
                max,
                loopback,
                open: Mutex::default(),
            }),
        }
    }

    /// A permit for one more connection from `ip`, or `None` (counted and
    /// logged) when that address already has the maximum open.
    pub fn admit(&self, ip: IpAddr) -> Option<IpPermit> {
        let inner = &self.inner;
        let ip = ip.to_canonical();
        if inner.max == 0 || (ip.is_loopback() && !inner.loopback) {
            return Some(IpPermit { inner: None });
        }
        let mut open = inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= inner.max {
            drop(open);
            metrics::counter!("netkit_conns_refused_per_ip_total", "door" => inner.door)
                .increment(1);
            tracing::warn!(
                %ip,
                max = inner.max,
                "{}: refusing a connection: this address has --max-conns-per-ip open already",
                inner.door
            );
            return None;
        }
        *n += 1;
        Some(IpPermit {
            inner: Some((inner.clone(), ip)),
        })
    }

    /// Connections open now from `ip` (counted ones only).
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Default for PerIpLimit {
    fn default() -> Self {
        Self::unlimited("door")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_max_and_a_freed_slot_is_reused() {
        let limit = PerIpLimit::including_loopback("t", 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limit.admit(a).unwrap();
        let _p2 = limit.admit(a).unwrap();
        assert!(limit.admit(a).is_none());
        let _q = limit.admit(b).expect("another address has its own count");
        drop(p1);
        assert_eq!(limit.open(a), 1);
        assert!(limit.admit(a).is_some());
    }

    #[test]
    fn loopback_is_exempt_unless_asked_and_v4_mapped_is_one_address() {
        let limit = PerIpLimit::new("t", 1);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let _a = limit.admit(lo).unwrap();
        assert!(limit.admit(lo).is_some());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let _b = limit.admit(v4).unwrap();
        assert!(limit.admit(mapped).is_none());
        assert!(PerIpLimit::unlimited("t").admit(v4).is_some());
    }
}

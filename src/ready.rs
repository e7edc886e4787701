//! The ready line: with `--ready-json` (env `NETKIT_READY_JSON`), a long-running
//! command prints one JSON line on stdout once every socket it serves on is
//! bound, so scripts and tests learn the addresses without reading the log.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the ready line on for this process (`--ready-json`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The bound addresses of a command's front doors; a door that is off is `None`
/// and left out of the line.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ready {
    /// HTTP (web app, `/ws`, API, metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// TCP line chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<SocketAddr>,
    /// File drop of `netkit serve`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<SocketAddr>,
    /// TCP line service (`serve --tcp`, `tcp serve`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
    /// UDP service (`serve --udp`, `udp serve`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<SocketAddr>,
    /// Gossip socket of the cluster membership.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<SocketAddr>,
    /// Transfer listener of `netkit recv --listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recv: Option<SocketAddr>,
    /// Transfer relay (`netkit relay`, `serve --relay`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<SocketAddr>,
}

#[derive(Serialize)]
struct Line<'a> {
    ready: bool,
    #[serde(flatten)]
    doors: &'a Ready,
}

impl Ready {
    /// The line printed for these addresses: `{"ready":true,"http":"127.0.0.1:41234",…}`.
    pub fn line(&self) -> String {
        serde_json::to_string(&Line {
            ready: true,
            doors: self,
        })
        .expect("addresses always serialize")
    }
}

/// Prints the ready line for `doors` on stdout (and flushes it) when
/// `--ready-json` is on; does nothing otherwise. Call it once, after the last bind.
pub fn announce(doors: &Ready) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    {
        let mut out = std::io::stdout().lock();
        // A closed stdout only means nobody is waiting for the line.
        let _ = writeln!(out, "{}", doors.line());
        let _ = out.flush();
    }
    ANNOUNCED.store(true, Ordering::Release);
    ANNOUNCED_NOTIFY.notify_waiters();
}

/// Set once the ready line is out.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);
/// Wakes [`announced`] waiters when the ready line is out.
static ANNOUNCED_NOTIFY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Returns once the ready line has been printed (at once when `--ready-json`
/// is off). Other stdout writers wait for it, so the ready line is always the
/// first line a test or script reads.
pub async fn announced() {
    loop {
        let notified = ANNOUNCED_NOTIFY.notified();
        if !ENABLED.load(Ordering::Relaxed) || ANNOUNCED.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_doors_are_left_out_of_the_line() {
        let r = Ready {
            tcp: Some("127.0.0.1:4000".parse().unwrap()),
            ..Ready::default()
        };
        assert_eq!(r.line(), r#"{"ready":true,"tcp":"127.0.0.1:4000"}"#);
    }

    #[test]
    fn every_open_door_is_named() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let r = Ready {
            http: Some(a),
            chat: Some(a),
            drop: Some(a),
            tcp: Some(a),
            udp: Some(a),
            cluster: Some(a),
            recv: None,
            relay: Some(a),
        };
        let v: serde_json::Value = serde_json::from_str(&r.line()).unwrap();
        for k in ["http", "chat", "drop", "tcp", "udp", "cluster", "relay"] {
            assert_eq!(v[k], "127.0.0.1:1", "{k}");
        }
        assert_eq!(v["ready"], true);
        assert!(v.get("recv").is_none());
    }
}

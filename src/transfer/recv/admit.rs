//! Admission of a connection before it is a sender: a per-address cap on
//! connections that have not sent their preamble yet, a short handshake
//! timeout, then one of `max_conns` sender slots — or `busy` at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::Config;
use crate::net::limit::{IpPermit, PerIpLimit};
use crate::transfer::proto::{Preamble, ReceiverFrame};
use crate::transfer::{Conn, TransferError};

/// What a connection was doing when the handshake timeout ran out.
pub(super) use crate::transfer::conn::HANDSHAKE;

/// Why a connection was turned away before it became a sender.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    /// Its address already had `max_pending_per_ip` connections without a preamble.
    PendingPerIp,
    /// No valid preamble within the handshake timeout.
    HandshakeTimeout,
    /// A preamble that is not netkit's, or an incompatible version.
    BadPreamble,
    /// Every sender slot was taken.
    Busy,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::PendingPerIp,
        Refusal::HandshakeTimeout,
        Refusal::BadPreamble,
        Refusal::Busy,
    ];

    /// The label in logs and in `netkit_transfer_refused_total{reason}`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Refusal::PendingPerIp => "pending_per_ip",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::BadPreamble => "bad_preamble",
            Refusal::Busy => "busy",
        }
    }
}

/// The admission state of one receiver: pending connections per address,
/// sender slots, and the refusal counts.
#[derive(Debug)]
pub(super) struct Gate {
    door: &'static str,
    pending: PerIpLimit,
    slots: Arc<Semaphore>,
    max_conns: usize,
    handshake_timeout: Duration,
    refused: [AtomicU64; 4],
}

impl Gate {
    /// The gate `config` describes.
    pub(super) fn new(config: &Config) -> Gate {
        let max_conns = config.max_conns.max(1);
        Gate {
            door: config.door,
            // Loopback counts: the drop has no reverse proxy in front of it.
            pending: PerIpLimit::including_loopback(config.door, config.max_pending_per_ip),
            slots: Arc::new(Semaphore::new(max_conns)),
            max_conns,
            handshake_timeout: config.handshake_timeout,
            refused: Default::default(),
        }
    }

    /// A pending slot for a new connection from `ip`; over the cap the
    /// connection is told why (one non-blocking write) and closed.
    pub(super) fn admit_pending(&self, stream: &TcpStream, ip: IpAddr) -> Option<IpPermit> {
        let permit = self.pending.admit(ip);
        if permit.is_none() {
            self.count(Refusal::PendingPerIp);
            let reason = format!(
                "too many connections from {ip} still in their handshake; try again in a moment"
            );
            let mut out = BytesMut::from(&Preamble::OURS.encode()[..]);
            ReceiverFrame::Error { reason }.encode(&mut out);
            let _ = stream.try_write(&out);
        }
        permit
    }

    /// Exchanges preambles within the handshake timeout, then takes a sender
    /// slot; `Busy` when every slot is taken. Refusals are counted.
    pub(super) async fn handshake<S>(
        &self,
        conn: &mut Conn<S>,
    ) -> Result<OwnedSemaphorePermit, TransferError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let exchanged = tokio::time::timeout(self.handshake_timeout, async {
            conn.write_preamble().await?;
            conn.read_preamble().await
        })
        .await;
        match exchanged {
            Err(_) => {
                self.count(Refusal::HandshakeTimeout);
                return Err(TransferError::Timeout {
                    what: HANDSHAKE,
                    after: self.handshake_timeout,
                });
            }
            Ok(Err(e)) => {
                let r = match e {
                    TransferError::Timeout { .. } => Refusal::HandshakeTimeout,
                    _ => Refusal::BadPreamble,
                };
                self.count(r);
                return Err(e);
            }
            Ok(Ok(_)) => {}
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Ok(slot),
            Err(_) => {
                self.count(Refusal::Busy);
                let ahead = self.max_conns - self.slots.available_permits();
                Err(TransferError::Busy {
                    ahead,
                    max: self.max_conns,
                })
            }
        }
    }

    /// Counts one refusal in `/metrics` and logs it: every one at debug,
    /// the 1st, 10th, 100th… of each reason at warn with the total so far.
    fn count(&self, r: Refusal) {
        metrics::counter!("netkit_transfer_refused_total", "door" => self.door, "reason" => r.label())
            .increment(1);
        let n = self.refused[r as usize].fetch_add(1, Ordering::Relaxed) + 1;
        debug!(
            reason = r.label(),
            total = n,
            "{}: refused a connection",
            self.door
        );
        if crate::transfer::is_power_of_ten(n) {
            warn!(
                reason = r.label(),
                total = n,
                "{}: {n} connection(s) refused so far ({})",
                self.door,
                r.label()
            );
        }
    }

    /// The refusal counts so far, by label.
    pub(super) fn refusals(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (r.label(), self.refused[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

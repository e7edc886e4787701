//! What every front door does to a new connection before its protocol starts:
//! the per-address limit ([`super::limit`]) in the accept loop, then the TLS
//! handshake ([`crate::tls`]) in the connection's own task.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::limit::{IpPermit, PerIpLimit};
use crate::tls::{ServerStream, TlsAcceptor};

/// A door's TLS (if any) and per-address limit.
#[derive(Debug, Clone)]
pub struct Door {
    /// Name in logs and metrics (`http`, `chat`, `tcp`).
    pub name: &'static str,
    /// The TLS acceptor, when this door speaks TLS.
    pub tls: Option<TlsAcceptor>,
    /// At most this many connections per address.
    pub per_ip: PerIpLimit,
}

impl Door {
    /// A plaintext door named `name` with no per-address limit.
    pub fn plain(name: &'static str) -> Self {
        Door {
            name,
            tls: None,
            per_ip: PerIpLimit::unlimited(name),
        }
    }

    /// A door named `name`, TLS when `tls` is given, `max_per_ip` connections per address (0: any).
    pub fn new(name: &'static str, tls: Option<TlsAcceptor>, max_per_ip: usize) -> Self {
        Door {
            name,
            tls,
            per_ip: PerIpLimit::new(name, max_per_ip),
        }
    }

    /// A slot for one more connection from `peer`, or `None` (counted, logged): close it.
    pub fn admit(&self, peer: SocketAddr) -> Option<IpPermit> {
        self.per_ip.admit(peer.ip())
    }

    /// The stream the protocol runs on: `stream` itself on a plaintext door,
    /// else the finished TLS stream, or `None` after a logged handshake failure.
    pub async fn handshake(&self, stream: TcpStream) -> Option<ServerStream> {
        match &self.tls {
            None => Some(tokio_util::either::Either::Right(stream)),
            Some(t) => t.accept_logged(stream, self.name).await,
        }
    }

    /// True when this door speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl Default for Door {
    fn default() -> Self {
        Door::plain("door")
    }
}

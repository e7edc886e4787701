//! The accept step every TCP server here shares: the next connection, or
//! `None` once shutdown is cancelled. Accept errors (EMFILE and the like) are
//! logged and retried with exponential backoff, never spun on or fatal.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections for one server, remembering the current backoff.
#[derive(Debug)]
pub struct Acceptor {
    what: &'static str,
    backoff: Duration,
}

impl Acceptor {
    /// An acceptor whose log lines start with `what` (`tcp`, `chat`, `recv`).
    pub fn new(what: &'static str) -> Self {
        Acceptor {
            what,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next connection, or `None` once `shutdown` is cancelled.
    pub async fn accept(
        &mut self,
        listener: &TcpListener,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let r = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                r = listener.accept() => r,
            };
            match r {
                Ok(pair) => {
                    self.backoff = FIRST_BACKOFF;
                    return Some(pair);
                }
                Err(e) => {
                    warn!(
                        "{}: accept failed: {e}; retrying in {}ms",
                        self.what,
                        self.backoff.as_millis()
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

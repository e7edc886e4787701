//! Copies bytes both ways between the two peers of a pair, never parsing
//! them: one buffer per direction, an end of stream passed on as a
//! half-close, and the pair cut when nothing moves for the idle timeout or
//! when it has moved its byte limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Size of each direction's buffer (two per pair).
pub const BUFFER: usize = 128 * 1024;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both peers closed their sending side.
    Done,
    /// Nothing moved either way for the idle timeout (a peer stopped reading or writing).
    Idle,
    /// The pair moved more than its byte limit.
    ByteLimit,
    /// A socket failed (reset, broken pipe).
    Failed,
    /// The relay is shutting down.
    Shutdown,
}

/// The limits of one pair.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Cut the pair when nothing moved for this long.
    pub idle: Duration,
    /// Cut the pair past this many bytes, both ways together (0: no limit).
    pub max_bytes: u64,
}

/// Progress shared by both directions: bytes moved and the time of the last move.
struct Shared {
    started: Instant,
    bytes: AtomicU64,
    /// Milliseconds since `started` of the last byte moved.
    last_ms: AtomicU64,
    max_bytes: u64,
}

impl Shared {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Copies `a` ⇄ `b` until both ends closed, or a limit or `shutdown` cut it;
/// returns how it ended and the bytes moved (both ways).
pub async fn splice<A, B>(a: A, b: B, limits: Limits, shutdown: &CancellationToken) -> (End, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Shared {
        started: Instant::now(),
        bytes: AtomicU64::new(0),
        last_ms: AtomicU64::new(0),
        max_bytes: limits.max_bytes,
    };
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(pump(ar, bw, &shared), pump(br, aw, &shared))
            .map_or_else(|e| e, |_| End::Done)
    };
    let end = tokio::select! {
        end = both => end,
        _ = watchdog(&shared, limits.idle) => End::Idle,
        _ = shutdown.cancelled() => End::Shutdown,
    };
    (end, shared.bytes.load(Ordering::Relaxed))
}

/// One direction: `from` to `to`, passing an end of stream on as a
/// shutdown of `to`'s write side. `Err` carries why the pair must end now.
async fn pump<R, W>(mut from: R, mut to: W, shared: &Shared) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| End::Failed)?;
        if n == 0 {
            // The other side may still answer (its last record, `Stored`…).
            let _ = to.shutdown().await;
            return Ok(());
        }
        shared.touch();
        let total = shared.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if shared.max_bytes > 0 && total > shared.max_bytes {
            return Err(End::ByteLimit);
        }
        to.write_all(&buf[..n]).await.map_err(|_| End::Failed)?;
        shared.touch();
    }
}

/// Returns once nothing moved for `idle`.
async fn watchdog(shared: &Shared, idle: Duration) {
    loop {
        let quiet = shared.since_last();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    const LIMITS: Limits = Limits {
        idle: Duration::from_secs(5),
        max_bytes: 0,
    };

    #[tokio::test]
    async fn bytes_pass_both_ways_and_a_half_close_is_passed_on() {
        let (mut s, relay_s) = duplex(1024);
        let (mut r, relay_r) = duplex(1024);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move { splice(relay_s, relay_r, LIMITS, &stop).await });
        s.write_all(b"offer").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"offer",
            "the sender's end of stream reaches the receiver"
        );
        // The receiver still answers after the sender's half-close.
        r.write_all(b"stored").await.unwrap();
        r.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"stored");
        assert_eq!(relay.await.unwrap(), (End::Done, 11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_cut_after_the_idle_timeout() {
        let (mut s, relay_s) = duplex(64 * 1024);
        // The receiver never reads: its pipe fills up and the relay blocks.
        let (_r, relay_r) = duplex(1024);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move { splice(relay_s, relay_r, LIMITS, &stop).await });
        let writer = tokio::spawn(async move {
            let chunk = vec![0u8; 4096];
            while s.write_all(&chunk).await.is_ok() {}
        });
        let started = tokio::time::Instant::now();
        let (end, bytes) = relay.await.unwrap();
        assert_eq!(end, End::Idle);
        assert!(started.elapsed() >= LIMITS.idle);
        assert!(bytes > 1024, "it moved what fitted first");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_byte_limit_cuts_the_pair() {
        let (mut s, relay_s) = duplex(64 * 1024);
        let (mut r, relay_r) = duplex(64 * 1024);
        let stop = CancellationToken::new();
        let limits = Limits {
            max_bytes: 10_000,
            ..LIMITS
        };
        let relay = tokio::spawn(async move { splice(relay_s, relay_r, limits, &stop).await });
        let _ = s.write_all(&[1u8; 20_000]).await;
        let mut got = Vec::new();
        let _ = r.read_to_end(&mut got).await;
        assert!(got.len() <= 10_000, "{} bytes passed", got.len());
        assert_eq!(relay.await.unwrap().0, End::ByteLimit);
    }
}

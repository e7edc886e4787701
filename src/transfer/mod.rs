//! Verified, resumable file and directory transfer: `netkit send` and
//! `netkit recv` (also the file drop of `netkit serve`).
//!
//! - [`proto`]: the frames and preamble, sans-IO, with hard limits.
//! - [`names`]: validation of untrusted names and safe folder creation.
//! - `conn`: the framed connection (one generic read and send, sendfile).
//! - `disk`: the receiver's side of the disk (part file, write loop, commit,
//!   metadata, free space) and prefix hashing.
//! - [`report`]: [`FileReport`] and [`Verdict`], the outcome of each entry.
//! - [`send`] and [`recv`]: the two ends over TCP.
//! - [`progress`]: bars on a terminal, plain lines otherwise.
//! - [`relay`]: the relay two peers with a code meet at, and their side of it.
//!
//! The content of each file travels in `Data` frames; both ends hash it with
//! BLAKE3 on a separate thread while the socket and the disk are busy, and
//! the receiver stores a file under its final name only after the hashes
//! match and the data is durable. The wire format is in
//! `docs/transfer-protocol.md`.

pub mod code;
mod conn;
pub(crate) mod disk;
pub mod names;
pub mod pake;
pub mod progress;
pub mod proto;
pub mod recv;
pub mod relay;
pub mod report;
pub mod seal;
pub mod send;

pub use conn::{CodeAuth, tune_allocator};
pub use report::{FileReport, Verdict};

pub(crate) use conn::Conn;

use std::io;
use std::time::Duration;

use proto::ProtoError;

/// Size of the chunks read from disk and sent as `Data` frames; every frame
/// of a file ends on a multiple of it, so a resumed file lines up again.
pub const CHUNK: usize = 128 * 1024;

/// Largest `Data` frame the clear sender makes of a regular file (sendfile):
/// four chunks. Per frame the receiver pays a buffer, a read and a hand-off
/// to its disk thread; at 128 KiB those were a tenth of a tmpfs transfer's
/// CPU. Sealed frames stay at [`CHUNK`] (one record each).
pub const FILE_FRAME: usize = 4 * CHUNK;

/// Why a transfer session ended early.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The peer sent nothing for too long.
    #[error("peer sent nothing for {} while {what} — it stalled or is not a netkit peer; raise --timeout for slow links", humantime::format_duration(*after))]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection while {0}")]
    Closed(&'static str),
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The peer reported a fatal error.
    #[error("peer reported: {0}")]
    Peer(String),
    /// A valid frame, but not one allowed at this point.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// The peer broke a rule of the protocol (size, offsets).
    #[error("protocol violation: {0}")]
    Violation(String),
    /// Every sender slot of the receiver is taken.
    #[error(
        "busy: the receiver is serving its limit of {max} senders ({ahead} ahead of you); \
         try again in a moment"
    )]
    Busy {
        /// Senders being served now.
        ahead: usize,
        /// The receiver's `--max-conns`.
        max: usize,
    },
    /// The code handshake failed: the peer used another code (or guessed).
    #[error(transparent)]
    Pake(#[from] pake::PakeError),
    /// A sealed record failed to open: the stream was altered in transit.
    #[error(transparent)]
    Sealed(#[from] seal::SealError),
}

/// 1, 10, 100…: which refusal counts are logged as warnings.
pub(crate) fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

impl TransferError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        TransferError::Io {
            what: what.into(),
            source,
        }
    }
}

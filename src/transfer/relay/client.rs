//! The peers' side of the relay: connect, send the hello for a code's
//! channel, and wait until the relay pairs this end with the other one. The
//! stream it returns then carries the usual code handshake, end to end.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{Hello, Reply, Side};
use crate::transfer::code::Code;

/// Extra time a peer waits beyond the relay's own `--relay-max-wait`.
const WAIT_SLACK: Duration = Duration::from_secs(30);

/// Tries of fresh codes when the relay says a generated code's channel is taken.
const CHANNEL_TRIES: usize = 20;

/// Why the relay did not pair this end.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The relay said no (and why).
    #[error("the relay {relay} refused: {reason}")]
    Refused {
        /// The relay's address.
        relay: String,
        /// The refusal is about the channel: another code may succeed.
        channel: bool,
        /// The relay's reason.
        reason: String,
    },
    /// Connecting, reading or writing failed, or the relay broke the protocol.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// This end, registered at the relay: waiting for the other side, or paired.
#[derive(Debug)]
pub enum Joined {
    /// The relay waits up to `max_wait` for the other side.
    Waiting {
        /// The connection to the relay.
        stream: TcpStream,
        /// The relay's address, for errors.
        relay: String,
        /// The relay's wait limit.
        max_wait: Duration,
    },
    /// The other side was there already: the stream is theirs now.
    Paired(TcpStream),
}

impl Joined {
    /// The stream to the other side, once the relay paired the two.
    pub async fn paired(self) -> Result<TcpStream, JoinError> {
        match self {
            Joined::Paired(s) => Ok(s),
            Joined::Waiting {
                mut stream,
                relay,
                max_wait,
            } => match read_reply(&mut stream, &relay, max_wait + WAIT_SLACK).await? {
                Reply::Paired => Ok(stream),
                Reply::Waiting { .. } => Err(anyhow::anyhow!(
                    "the relay {relay} said `waiting` twice — is it a netkit relay?"
                )
                .into()),
                Reply::Refused { channel, reason } => Err(JoinError::Refused {
                    relay,
                    channel,
                    reason,
                }),
            },
        }
    }
}

/// Connects to `relay` and registers `side` on `code`'s channel; `timeout`
/// bounds the connect and the relay's first answer.
pub async fn join(
    relay: &str,
    side: Side,
    code: &Code,
    timeout: Duration,
) -> Result<Joined, JoinError> {
    let what = "`netkit relay` (or `netkit serve` with --relay)";
    let mut s = crate::transfer::send::connect_peer(relay, timeout, what, "--relay").await?;
    let hello = Hello {
        side,
        channel: code.channel_id(),
    };
    match tokio::time::timeout(timeout, s.write_all(&hello.encode())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(anyhow::anyhow!("writing to the relay {relay}: {e}").into()),
        Err(_) => return Err(anyhow::anyhow!("the relay {relay} does not read").into()),
    }
    match read_reply(&mut s, relay, timeout).await? {
        Reply::Waiting { max_wait_secs } => Ok(Joined::Waiting {
            stream: s,
            relay: relay.to_string(),
            max_wait: Duration::from_secs(max_wait_secs.into()),
        }),
        Reply::Paired => Ok(Joined::Paired(s)),
        Reply::Refused { channel, reason } => Err(JoinError::Refused {
            relay: relay.to_string(),
            channel,
            reason,
        }),
    }
}

/// The sender's registration: with `chosen`, that code; else a generated
/// one, and another if the relay says its channel is taken or used. Returns
/// the code to show the receiver and the registration.
pub async fn join_as_sender(
    relay: &str,
    chosen: Option<Code>,
    timeout: Duration,
) -> Result<(Code, Joined), JoinError> {
    if let Some(code) = chosen {
        let j = join(relay, Side::Sender, &code, timeout).await?;
        return Ok((code, j));
    }
    let mut tries = 0;
    loop {
        let code = Code::generate(&mut rand_core::OsRng);
        match join(relay, Side::Sender, &code, timeout).await {
            Err(JoinError::Refused { channel: true, .. }) if tries + 1 < CHANNEL_TRIES => {
                tries += 1;
            }
            r => return r.map(|j| (code, j)),
        }
    }
}

/// Reads one reply, exactly (the other peer's bytes may follow a `Paired`).
async fn read_reply(s: &mut TcpStream, relay: &str, t: Duration) -> Result<Reply, JoinError> {
    let read = async {
        let mut head = [0u8; 3];
        s.read_exact(&mut head).await?;
        let len = u16::from_be_bytes([head[1], head[2]]) as usize;
        let mut buf = BytesMut::from(&head[..]);
        buf.resize(3 + len.min(super::wire::MAX_REASON + 1), 0);
        s.read_exact(&mut buf[3..]).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let mut buf = match tokio::time::timeout(t, read).await {
        Err(_) => {
            return Err(anyhow::anyhow!(
                "the relay {relay} answered nothing for {}",
                humantime::format_duration(t)
            )
            .into());
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(anyhow::anyhow!(
                "the relay {relay} closed the connection — is it a netkit relay?"
            )
            .into());
        }
        Ok(Err(e)) => return Err(anyhow::anyhow!("reading from the relay {relay}: {e}").into()),
        Ok(Ok(b)) => b,
    };
    match Reply::decode(&mut buf) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(anyhow::anyhow!("the relay {relay} sent an oversized reply").into()),
        Err(e) => Err(anyhow::anyhow!("{e}").into()),
    }
}

//! The TCP line adapter: `nc 127.0.0.1 8330` users chat in the same rooms as
//! WebSocket users. A line starting with `/` is a command (`/join`, `/msg`, …,
//! parsed in [`parse`]); any other line is said in the current room. Hub
//! messages are rendered as readable lines by [`format_line`] ([`format`],
//! also used by `netkit chat`).

mod format;
mod parse;

pub use format::{clock, format_line, shown_members};
pub use parse::{HELP, LineCommand, parse_line};

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use super::ConnConfig;
use super::hub::Session;
use super::hub::{Hub, Inbox, Received};
use super::protocol::{MessageKind, ServerMsg};

/// The nicks a line client ignores (`/ignore`): their room messages and
/// direct messages are not shown; notices, presence and errors still are.
/// Shared by the reading and the writing task of a connection.
#[derive(Debug, Default)]
pub struct Ignored {
    /// Quick check: false while nobody is ignored (the common case costs one load).
    any: std::sync::atomic::AtomicBool,
    keys: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Ignored {
    /// Ignores (`on`) `nick` (and every look-alike of it), or stops ignoring it;
    /// the line that says so.
    pub fn set(&self, nick: &str, on: bool) -> String {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = super::names::name_key(nick);
        let told = if on {
            keys.insert(key);
            format!("ignoring {nick} (/unignore {nick} to stop)")
        } else if keys.remove(&key) {
            format!("no longer ignoring {nick}")
        } else {
            format!("you were not ignoring {nick}")
        };
        self.any
            .store(!keys.is_empty(), std::sync::atomic::Ordering::Relaxed);
        told
    }

    /// True if `msg` comes from an ignored nick and is not shown.
    pub fn hides(&self, msg: &ServerMsg) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let from = match msg {
            ServerMsg::Message(m) if m.kind != MessageKind::Notice => &m.from,
            ServerMsg::Direct { from, .. } => from,
            _ => return false,
        };
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.contains(&super::names::name_key(from))
    }
}

/// The outcome of [`read_line_limited`].
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A complete line is in the buffer (without its newline).
    Line,
    /// The line was longer than the limit; it was read and thrown away.
    TooLong,
    /// The peer closed the connection.
    Eof,
}

/// Reads one `\n`-terminated line into `buf`, never holding more than `max`
/// bytes: a longer line is consumed up to its newline and reported as
/// [`LineRead::TooLong`], so the connection can go on.
pub async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    use tokio::io::AsyncBufReadExt;
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = rd.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if too_long || !buf.is_empty() {
                if too_long {
                    LineRead::TooLong
                } else {
                    LineRead::Line
                }
            } else {
                LineRead::Eof
            });
        }
        let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        rd.consume(take + usize::from(end));
        if end {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// Serves TCP line clients on `listener` until `shutdown` is cancelled; then
/// every client is told and closed. `door` adds TLS and the per-address limit.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: ConnConfig,
    door: crate::net::door::Door,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    info!(
        "chat: listening on {} ({})",
        local.map(|a| a.to_string()).unwrap_or_default(),
        if door.is_tls() {
            "TLS lines"
        } else {
            "TCP lines"
        }
    );
    let config = Arc::new(config);
    let tracker = TaskTracker::new();
    let mut acceptor = crate::net::accept::Acceptor::new("chat");
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        let Some(permit) = door.admit(peer) else {
            continue;
        };
        // A child token per connection: polled per line, a shared one would be one contended lock.
        let (hub, config, shutdown) = (hub.clone(), config.clone(), shutdown.child_token());
        let door = door.clone();
        tracker.spawn(
            async move {
                debug!("accepted");
                let _permit = permit;
                match door.handshake(stream).await {
                    Some(Either::Right(plain)) => serve_conn(plain, hub, &config, shutdown).await,
                    Some(Either::Left(tls)) => {
                        let (rd, wr) = tokio::io::split(tls);
                        serve_halves(rd, wr, Some(peer.ip()), hub, &config, shutdown).await
                    }
                    None => return,
                }
                debug!("closed");
            }
            .instrument(info_span!("chat-line", %peer)),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Serves one line client: this task reads and hands requests to the hub;
/// a second task writes. When either ends, the other stops.
pub async fn serve_conn(
    stream: TcpStream,
    hub: Hub,
    config: &ConnConfig,
    shutdown: CancellationToken,
) {
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let (rd, wr) = stream.into_split();
    serve_halves(rd, wr, peer, hub, config, shutdown).await
}

/// [`serve_conn`] over the two halves of any stream (a TLS one included),
/// from `peer` (for the per-address login limit).
pub async fn serve_halves<R, W>(
    rd: R,
    mut wr: W,
    peer: Option<std::net::IpAddr>,
    hub: Hub,
    config: &ConnConfig,
    shutdown: CancellationToken,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, inbox) = match hub.connect_from(None, peer) {
        Ok(pair) => pair,
        Err(e) => {
            let line = format!("{}\n", format_line(&e.to_msg()));
            let _ = tokio::time::timeout(config.write_timeout, wr.write_all(line.as_bytes())).await;
            return;
        }
    };
    let mut session = session;
    let ignored = Arc::new(Ignored::default());
    let done = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        BufWriter::new(wr),
        (inbox, ignored.clone()),
        config.write_timeout,
        done.clone(),
        shutdown.clone(),
    ));
    let mut rd = tokio::io::BufReader::new(rd);
    let mut bytes = Vec::new();
    loop {
        // The next line is read only once the replies to the last ones fit
        // the client's queue (backpressure on a client that sends faster
        // than it reads).
        let read = async {
            session.room_for_replies().await;
            tokio::time::timeout(
                config.idle_timeout,
                read_line_limited(&mut rd, &mut bytes, config.max_msg),
            )
            .await
        };
        let next = tokio::select! {
            _ = done.cancelled() => break,
            _ = shutdown.cancelled() => break,
            r = read => r,
        };
        match next {
            Err(_) => {
                session.tell(ServerMsg::error(
                    "idle_timeout",
                    format!(
                        "nothing received for {}; closing",
                        humantime::format_duration(config.idle_timeout)
                    ),
                ));
                break;
            }
            Ok(Ok(LineRead::Eof)) => break,
            Ok(Ok(LineRead::TooLong)) => {
                session.tell(ServerMsg::error(
                    "too_large",
                    format!("line longer than {} bytes ignored", config.max_msg),
                ));
                continue;
            }
            Ok(Err(e)) => {
                debug!("read failed: {e}");
                break;
            }
            Ok(Ok(LineRead::Line)) => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        if !run_line(&mut session, &ignored, &line).await {
            break;
        }
    }
    // Every line read has taken effect and its replies are queued before the
    // writer is told to flush and stop.
    session.settle().await;
    done.cancel();
    // Let the writer flush what is queued (bounded by its write timeout).
    drop(session);
    let _ = writer.await;
}

/// Carries out one typed line, after the earlier ones have taken effect:
/// plain text goes to the hub's current room for the client. False when the
/// client quits.
async fn run_line(session: &mut Session, ignored: &Ignored, line: &str) -> bool {
    let current = session.current_room().await;
    match parse_line(line, current.as_deref()) {
        Ok(LineCommand::Nothing) => {}
        Ok(LineCommand::Ignore(nick, on)) => session.tell(ServerMsg::Info {
            text: ignored.set(&nick, on),
        }),
        Ok(LineCommand::Help) => {
            for l in HELP.lines() {
                session.tell(ServerMsg::Info { text: l.into() });
            }
        }
        Ok(LineCommand::Quit) => return false,
        Ok(LineCommand::Hub(msg)) => {
            if let Err(e) = session.handle(msg).await {
                session.report(e);
            }
        }
        Err(e) => session.tell(ServerMsg::error("bad_command", e)),
    }
    true
}

/// Writes what the client is sent, as lines, until the reader ends, the
/// client is disconnected (told why) or the server shuts down.
async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    (mut inbox, ignored): (Inbox, Arc<Ignored>),
    write_timeout: Duration,
    done: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut buf = String::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(write_timeout, async {
                    let _ = wr.write_all(b"ERR shutting_down: server shutting down\n").await;
                    wr.flush().await
                }).await;
                break;
            }
            r = inbox.recv() => r,
            _ = done.cancelled() => {
                // Reader ended: flush what is already queued, then stop.
                while let Some(ev) = inbox.try_recv() {
                    buf.clear();
                    push_line(&mut buf, &ev.msg, &ignored);
                    if tokio::time::timeout(write_timeout, wr.write_all(buf.as_bytes())).await.is_err() {
                        break;
                    }
                }
                let _ = tokio::time::timeout(write_timeout, wr.flush()).await;
                break;
            }
        };
        buf.clear();
        match first {
            Received::Event(ev) => push_line(&mut buf, &ev.msg, &ignored),
            Received::Disconnected(reason) => {
                let line = format!("ERR {}: {reason}\n", reason.code());
                let _ = tokio::time::timeout(write_timeout, async {
                    let _ = wr.write_all(line.as_bytes()).await;
                    wr.flush().await
                })
                .await;
                break;
            }
            Received::Closed => break,
        }
        while buf.len() < 64 * 1024 {
            match inbox.try_recv() {
                Some(ev) => push_line(&mut buf, &ev.msg, &ignored),
                None => break,
            }
        }
        let wrote = tokio::time::timeout(write_timeout, async {
            wr.write_all(buf.as_bytes()).await?;
            wr.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("write failed: {e}");
                break;
            }
            Err(_) => {
                info!(
                    "write timed out after {}; closing",
                    humantime::format_duration(write_timeout)
                );
                break;
            }
        }
    }
    // A clean end: FIN, and over TLS the close_notify the client waits for.
    let _ = tokio::time::timeout(write_timeout.min(Duration::from_secs(1)), wr.shutdown()).await;
    done.cancel();
}

fn push_line(buf: &mut String, msg: &ServerMsg, ignored: &Ignored) {
    if ignored.hides(msg) {
        return;
    }
    buf.push_str(&format_line(msg));
    buf.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_skipped_not_fatal() {
        let input: &[u8] = b"short\nthis line is too long\nok\r\nlast";
        let mut rd = tokio::io::BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            let r = read_line_limited(&mut rd, &mut buf, 8).await.unwrap();
            if r == LineRead::Eof {
                break;
            }
            got.push((r, String::from_utf8_lossy(&buf).to_string()));
        }
        assert_eq!(
            got,
            vec![
                (LineRead::Line, "short".into()),
                (LineRead::TooLong, String::new()),
                (LineRead::Line, "ok\r".into()),
                (LineRead::Line, "last".into()),
            ]
        );
    }
}

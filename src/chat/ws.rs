//! The WebSocket adapter: JSON [`ClientMsg`]s in, [`ServerMsg`]s out, one text
//! frame per message. One task reads and hands requests to the hub, a second
//! writes the client's queue and pings; when either ends the other stops.
//! The writer feeds every queued message as its own frame and flushes once, so
//! the messages of one hub batch share a syscall.
//!
//! Close codes: 1000 normal, 1001 server shutting down, 1009 message too big
//! (over the hard frame cap), 4000 lagging (the client read too slowly), 4001
//! ping timeout, 4002 write timeout.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ConnConfig;
use super::hub::{DisconnectReason, Inbox, Received, Session};
use super::protocol::{ClientMsg, ServerMsg};

/// Close code for a client disconnected because it read too slowly.
pub const CLOSE_LAGGING: u16 = 4000;
/// Close code for a client that answered no ping in time.
pub const CLOSE_PING_TIMEOUT: u16 = 4001;
/// Close code for a client whose socket accepted no data in time.
pub const CLOSE_WRITE_TIMEOUT: u16 = 4002;
/// Close code when the server shuts down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a message over the hard size cap (RFC 6455 "message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;

/// The largest frame the WebSocket layer accepts at all, for a soft limit of
/// `max_msg`: messages between the two get an error reply and the connection
/// stays open; beyond this one the connection is closed with 1009.
pub fn hard_frame_cap(max_msg: usize) -> usize {
    max_msg.saturating_mul(4).max(64 * 1024)
}

/// Serves one upgraded WebSocket for a client already registered with the hub.
pub async fn serve_socket(
    socket: WebSocket,
    mut session: Session,
    inbox: Inbox,
    config: ConnConfig,
    shutdown: CancellationToken,
) {
    let (sink, mut stream) = socket.split();
    let done = CancellationToken::new();
    let (close_tx, close_rx) = oneshot::channel::<CloseFrame>();
    let writer = tokio::spawn(write_loop(
        sink,
        inbox,
        config.clone(),
        close_rx,
        done.clone(),
        // Its own child token: every socket polls it per message, and a shared
        // token would put all of them on one lock.
        shutdown.child_token(),
    ));
    let close = read_loop(&mut stream, &mut session, &config, &done).await;
    if let Some(frame) = close {
        let _ = close_tx.send(frame);
    } else {
        drop(close_tx);
    }
    done.cancel();
    drop(session);
    let _ = writer.await;
}

/// Reads frames until the peer leaves, the writer ends, or a close is due
/// (returned, for the writer to send).
async fn read_loop(
    stream: &mut SplitStream<WebSocket>,
    session: &mut Session,
    config: &ConnConfig,
    done: &CancellationToken,
) -> Option<CloseFrame> {
    let silent_for = config.ping_interval + config.ping_timeout;
    loop {
        let next = tokio::select! {
            _ = done.cancelled() => return None,
            r = tokio::time::timeout(silent_for, stream.next()) => r,
        };
        let msg = match next {
            Err(_) => {
                return Some(close(
                    CLOSE_PING_TIMEOUT,
                    format!(
                        "ping timeout: nothing received for {}",
                        humantime::format_duration(silent_for)
                    ),
                ));
            }
            Ok(None) => return None,
            Ok(Some(Err(e))) => {
                debug!("websocket read failed: {e}");
                let text = e.to_string();
                if text.contains("Space limit exceeded") || text.contains("too long") {
                    return Some(close(
                        CLOSE_TOO_BIG,
                        format!("message too big: the limit is {} bytes", config.max_msg),
                    ));
                }
                return None;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(text) => {
                if text.len() > config.max_msg {
                    session.tell(ServerMsg::error(
                        "too_large",
                        format!(
                            "message of {} bytes ignored: the limit is {} bytes",
                            text.len(),
                            config.max_msg
                        ),
                    ));
                    continue;
                }
                match parse_client_msg(text.as_str()) {
                    Ok(req) => {
                        if let Err(e) = session.handle(req).await {
                            session.tell(e.to_msg());
                        }
                    }
                    Err(err) => session.tell(err),
                }
            }
            Message::Binary(_) => session.tell(ServerMsg::error(
                "binary_unsupported",
                "binary frames are not part of the protocol; send JSON text frames",
            )),
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return None,
        }
    }
}

/// Parses a client's JSON frame, or explains what is wrong with it.
pub fn parse_client_msg(text: &str) -> Result<ClientMsg, ServerMsg> {
    match serde_json::from_str::<ClientMsg>(text) {
        Ok(m) => Ok(m),
        Err(e) => {
            let value: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) => {
                    return Err(ServerMsg::error(
                        "bad_json",
                        format!(
                            "not valid JSON ({e}); send an object like {{\"type\":\"say\",\"room\":\"lobby\",\"text\":\"hi\"}}"
                        ),
                    ));
                }
            };
            let known = [
                "join", "part", "say", "me", "msg", "nick", "topic", "rooms", "who",
            ];
            match value.get("type").and_then(|t| t.as_str()) {
                Some(t) if !known.contains(&t) => Err(ServerMsg::error(
                    "unknown_type",
                    format!(
                        "unknown message type '{}'; known: {}",
                        t.chars().take(40).collect::<String>(),
                        known.join(", ")
                    ),
                )),
                None => Err(ServerMsg::error(
                    "bad_message",
                    "a message is a JSON object with a string field \"type\"",
                )),
                Some(_) => Err(ServerMsg::error(
                    "bad_message",
                    format!("malformed message: {e}"),
                )),
            }
        }
    }
}

fn close(code: u16, reason: String) -> CloseFrame {
    // A close reason must fit a control frame (123 bytes).
    let mut reason = reason;
    while reason.len() > 120 {
        reason.pop();
    }
    CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }
}

/// Most frames fed before one flush.
const MAX_FRAMES_PER_WRITE: usize = 256;

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    config: ConnConfig,
    mut close_rx: oneshot::Receiver<CloseFrame>,
    done: CancellationToken,
    shutdown: CancellationToken,
) {
    let wt = config.write_timeout;
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    // Made once and polled on every wake-up: building them anew per message
    // (each registering with its token) cost more than writing the frame.
    let shutdown_wait = shutdown.cancelled();
    tokio::pin!(shutdown_wait);
    let done_wait = done.cancelled();
    tokio::pin!(done_wait);
    let final_frame: Option<CloseFrame> = loop {
        let got = tokio::select! {
            biased;
            _ = &mut shutdown_wait => break Some(close(CLOSE_GOING_AWAY, "server shutting down".into())),
            r = &mut close_rx => break r.ok(),
            _ = &mut done_wait => break None,
            r = inbox.recv() => r,
            _ = ping.tick() => {
                match tokio::time::timeout(wt, sink.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => break None,
                    Err(_) => break Some(close(CLOSE_WRITE_TIMEOUT, "write timeout".into())),
                }
            }
        };
        match got {
            Received::Event(ev) => {
                let write = async {
                    sink.feed(text_frame(&ev.json)).await?;
                    let mut n = 1;
                    while n < MAX_FRAMES_PER_WRITE {
                        let Some(ev) = inbox.try_recv() else { break };
                        sink.feed(text_frame(&ev.json)).await?;
                        n += 1;
                    }
                    sink.flush().await
                };
                tokio::pin!(write);
                // The socket nearly always takes the bytes at once: arm the
                // write timeout only when it does not.
                let result = match write.as_mut().now_or_never() {
                    Some(r) => Ok(r),
                    None => tokio::time::timeout(wt, write).await,
                };
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        debug!("websocket write failed: {e}");
                        break None;
                    }
                    Err(_) => {
                        debug!("websocket write timed out");
                        break Some(close(CLOSE_WRITE_TIMEOUT, "write timeout".into()));
                    }
                }
            }
            Received::Disconnected(reason) => {
                let code = match reason {
                    DisconnectReason::Lagging { .. } => CLOSE_LAGGING,
                    DisconnectReason::Shutdown => CLOSE_GOING_AWAY,
                };
                let err = ServerMsg::error(reason.code(), reason.to_string());
                let _ =
                    tokio::time::timeout(wt, sink.send(Message::Text(err.to_json().into()))).await;
                break Some(close(code, format!("{}: {reason}", reason.code())));
            }
            Received::Closed => break None,
        }
    };
    if let Some(frame) = final_frame {
        let _ = tokio::time::timeout(wt, sink.send(Message::Close(Some(frame)))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    done.cancel();
}

fn text_frame(json: &bytes::Bytes) -> Message {
    // The hub serialized this from a String, so it is valid UTF-8.
    match Utf8Bytes::try_from(json.clone()) {
        Ok(t) => Message::Text(t),
        Err(_) => Message::Text(Utf8Bytes::from(String::from_utf8_lossy(json).into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<ClientMsg, ServerMsg>) -> String {
        match r {
            Err(ServerMsg::Error { code, .. }) => code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_explained() {
        assert_eq!(code(parse_client_msg("{nope")), "bad_json");
        assert_eq!(
            code(parse_client_msg(r#"{"type":"dance"}"#)),
            "unknown_type"
        );
        assert_eq!(code(parse_client_msg(r#"{"type":"say"}"#)), "bad_message");
        assert_eq!(code(parse_client_msg(r#"[1,2]"#)), "bad_message");
        assert!(parse_client_msg(r#"{"type":"join","room":"a"}"#).is_ok());
    }
}

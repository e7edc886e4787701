//! The WebSocket adapter: JSON [`ClientMsg`]s in, [`ServerMsg`]s out, one text
//! frame per message.
//!
//! The upgrade ([`WsUpgrade`]) is done here rather than by axum's extractor, so
//! that the connection's socket is ours: one task reads it with tungstenite
//! (unmasking, fragments, control frames, size limits), a second writes it.
//! The writer does not go through tungstenite: every [`Event`] carries its
//! message as a finished text frame, built once for all its recipients (server
//! frames are not masked), and the writer hands everything queued for the
//! client to one `writev`. The frames tungstenite itself wants to send (pong,
//! the reply to a close) are handed to the writer, which puts them between two
//! frames of its own.
//!
//! Close codes: 1000 normal, 1001 server shutting down, 1009 message too big
//! (over the hard frame cap), 4000 lagging (the client read too slowly), 4001
//! ping timeout, 4002 write timeout.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf};
use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ConnConfig;
use super::hub::{Inbox, Session};
use super::protocol::{ClientMsg, ServerMsg};

mod socket;
mod write;
use write::write_loop;

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

/// An unmasked frame (control frames, as the server sends them), encoded by tungstenite.
fn encode(frame: Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    // Formatting into a Vec cannot fail.
    let _ = frame.format(&mut out);
    out
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    // A close reason must fit a control frame (125 bytes with the code).
    let mut reason = reason.to_string();
    while reason.len() > 120 {
        reason.pop();
    }
    encode(Frame::close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })))
}

// ---------------------------------------------------------------------------
// The upgrade

/// A request to open a WebSocket (`GET` with `Upgrade: websocket`, RFC 6455
/// §4.2.1), checked; [`WsUpgrade::on_upgrade`] answers 101 and hands the
/// connection over. A request that is not one gets 400 (or 426) saying what
/// is wrong.
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

pub use socket::WsIo;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks the handshake headers of a WebSocket request.
pub fn check_handshake(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, String> {
    if method != Method::GET {
        return Err("a WebSocket is opened with GET".into());
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err("a WebSocket request needs `Connection: Upgrade`".into());
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err("a WebSocket request needs `Upgrade: websocket`".into());
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("a WebSocket request needs `Sec-WebSocket-Version: 13`".into());
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !k.is_empty() && k.len() <= 64 => Ok(k.clone()),
        _ => Err("a WebSocket request needs a `Sec-WebSocket-Key`".into()),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = check_handshake(&parts.method, &parts.headers)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response())?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| {
                (
                    StatusCode::UPGRADE_REQUIRED,
                    "this connection cannot be upgraded to a WebSocket (HTTP/1.1 is needed)\n",
                )
                    .into_response()
            })?;
        Ok(WsUpgrade { key, on_upgrade })
    }
}

impl WsUpgrade {
    /// Answers `101 Switching Protocols`, and runs `serve` on the connection
    /// once hyper has handed it over, as a task of `rt`.
    pub fn on_upgrade<F, Fut>(self, rt: &tokio::runtime::Handle, serve: F) -> Response
    where
        F: FnOnce(WsIo) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        rt.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => match WsIo::take(upgraded) {
                    Ok(io) => serve(io).await,
                    Err(e) => debug!("websocket: cannot take the upgraded socket: {e}"),
                },
                Err(e) => debug!("websocket upgrade failed: {e}"),
            }
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                ),
            ],
        )
            .into_response()
    }
}

// ---------------------------------------------------------------------------
// The connection

/// Most bytes of control frames (pongs, a close reply) waiting for the
/// writer; a client that pings faster than it reads is disconnected.
const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Frames tungstenite's reader wants sent, waiting for the writer.
#[derive(Default)]
struct Control {
    bytes: Mutex<Vec<u8>>,
    ready: Notify,
}

impl Control {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The read half, as tungstenite sees it: reads come from the socket, writes
/// (whole frames: it writes only control frames, and all of its buffer at
/// once) go to the writer task.
struct ReadSide {
    rd: ReadHalf<WsIo>,
    control: Arc<Control>,
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut pending = self.control.bytes.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() + buf.len() > MAX_CONTROL_BYTES {
            return Poll::Ready(Err(io::Error::other(
                "the client sends pings faster than it reads the replies",
            )));
        }
        pending.extend_from_slice(buf);
        drop(pending);
        self.control.ready.notify_one();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves one upgraded WebSocket for a client already registered with the hub.
pub async fn serve_socket(
    io: WsIo,
    mut session: Session,
    inbox: Inbox,
    config: ConnConfig,
    shutdown: CancellationToken,
) {
    let cap = hard_frame_cap(config.max_msg);
    let (rd, wr) = tokio::io::split(io);
    let control = Arc::new(Control::default());
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(cap))
        .max_frame_size(Some(cap));
    let mut stream = WebSocketStream::from_raw_socket(
        ReadSide {
            rd,
            control: control.clone(),
        },
        Role::Server,
        Some(ws_config),
    )
    .await;
    // Cancelled by server shutdown, or by either task when it ends. One token
    // (a child of the shutdown token) so that a wake-up polls one lock, not two.
    let stop = shutdown.child_token();
    let (close_tx, close_rx) = oneshot::channel::<Vec<u8>>();
    let writer = tokio::spawn(write_loop(
        wr,
        inbox,
        control,
        config.clone(),
        close_rx,
        stop.clone(),
        shutdown,
    ));
    let close = read_loop(&mut stream, &mut session, &config, &stop).await;
    // Every request read has taken effect and its replies are queued before
    // the writer is told to finish.
    session.settle().await;
    if let Some(frame) = close {
        let _ = close_tx.send(frame);
    } else {
        drop(close_tx);
    }
    stop.cancel();
    drop(session);
    let _ = writer.await;
}

/// Reads frames until the peer leaves, the writer ends, or a close is due
/// (returned, encoded, for the writer to send).
async fn read_loop(
    stream: &mut WebSocketStream<ReadSide>,
    session: &mut Session,
    config: &ConnConfig,
    stop: &CancellationToken,
) -> Option<Vec<u8>> {
    let silent_for = config.ping_interval + config.ping_timeout;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // The next frame is read only once the replies to the last ones fit
        // the client's queue (backpressure on a client that sends faster
        // than it reads).
        let read = async {
            session.room_for_replies().await;
            tokio::time::timeout(silent_for, stream.next()).await
        };
        let next = tokio::select! {
            biased;
            _ = &mut stopped => return None,
            r = read => r,
        };
        let msg = match next {
            Err(_) => {
                return Some(close_frame(
                    CLOSE_PING_TIMEOUT,
                    &format!(
                        "ping timeout: nothing received for {}",
                        humantime::format_duration(silent_for)
                    ),
                ));
            }
            Ok(None) => return None,
            Ok(Some(Err(tungstenite::Error::Capacity(e)))) => {
                debug!("websocket frame too big: {e}");
                return Some(close_frame(
                    CLOSE_TOO_BIG,
                    &format!("message too big: the limit is {} bytes", config.max_msg),
                ));
            }
            Ok(Some(Err(e))) => {
                debug!("websocket read failed: {e}");
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
                            session.report(e);
                        }
                    }
                    Err(err) => session.tell(err),
                }
            }
            Message::Binary(_) => session.tell(ServerMsg::error(
                "binary_unsupported",
                "binary frames are not part of the protocol; send JSON text frames",
            )),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Close(frame) => {
                // The reply goes out as the last frame, after the replies to
                // what came before the close (tungstenite's own reply would
                // reach the writer as a control frame, ahead of them).
                let frame = frame.map(|f| CloseFrame {
                    code: if f.code.is_allowed() {
                        f.code
                    } else {
                        CloseCode::Protocol
                    },
                    reason: f.reason,
                });
                return Some(encode(Frame::close(frame)));
            }
        }
    }
}

/// Parses a client's JSON frame, or explains what is wrong with it.
#[expect(
    clippy::result_large_err,
    reason = "the error is the reply, sent as it is; a room message with a file made ServerMsg 8 bytes larger than the lint's threshold"
)]
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
                "join",
                "part",
                "say",
                "me",
                "msg",
                "nick",
                "topic",
                "rooms",
                "who",
                "file_ticket",
                "register",
                "login",
                "logout",
                "auth",
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

    #[test]
    fn handshake_checks() {
        let mut h = HeaderMap::new();
        let get = Method::GET;
        assert!(
            check_handshake(&get, &h)
                .unwrap_err()
                .contains("Connection")
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(
            check_handshake(&get, &h)
                .unwrap_err()
                .contains("Upgrade: websocket")
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(check_handshake(&get, &h).unwrap_err().contains("Version"));
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert!(check_handshake(&get, &h).unwrap_err().contains("Version"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert!(check_handshake(&get, &h).unwrap_err().contains("Key"));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(check_handshake(&get, &h).is_ok());
        assert!(check_handshake(&Method::POST, &h).is_err());
        // RFC 6455 §1.3's example.
        assert_eq!(
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}

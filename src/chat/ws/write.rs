//! The writing half of a WebSocket connection: everything queued for the
//! client handed to one `writev`, paced or at once, with pings, the frames
//! tungstenite wants sent (pong, the close reply) put between two of ours,
//! and the close frame that says why the connection ends.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    CLOSE_GOING_AWAY, CLOSE_LAGGING, CLOSE_WRITE_TIMEOUT, Control, WsIo, close_frame, encode,
};
use crate::chat::ConnConfig;
use crate::chat::frame::text_frame;
use crate::chat::hub::{DisconnectReason, Event, Inbox, Received};
use crate::chat::protocol::ServerMsg;

/// Most frames handed to one `writev` (the kernel takes at most 1024 pieces).
const MAX_FRAMES_PER_WRITE: usize = 256;
/// Most bytes gathered for one `writev`.
const MAX_BYTES_PER_WRITE: usize = 256 * 1024;

/// With this much queued, a paced writer writes at once.
const PACE_SKIP_BYTES: usize = 64 * 1024;

/// This connection's write interval: `base` scaled by a random factor in
/// [3/4, 5/4), so that connections which got the same messages at the same
/// moment drift apart instead of all being written to at once (which makes
/// a client with many connections read them in one long burst).
fn paced_interval(base: Duration) -> Duration {
    if base.is_zero() {
        return base;
    }
    base.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// Writes all of `bufs` (pieces of one byte stream, in order).
async fn write_all_vectored(wr: &mut WriteHalf<WsIo>, bufs: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| IoSlice::new(b))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Writes `bufs`, allowing `wt` if the socket does not take them at once
/// (the write timeout is armed only then: nearly every write completes in
/// its first poll). `Err(None)` is a timeout.
async fn write_timed(
    wr: &mut WriteHalf<WsIo>,
    bufs: &[&[u8]],
    wt: Duration,
) -> Result<(), Option<io::Error>> {
    let write = write_all_vectored(wr, bufs);
    tokio::pin!(write);
    let result = match write.as_mut().now_or_never() {
        Some(r) => r,
        None => match tokio::time::timeout(wt, write).await {
            Ok(r) => r,
            Err(_) => return Err(None),
        },
    };
    result.map_err(Some)
}

/// Writes what the client is sent, control frames, and pings, until the
/// client is disconnected, the reader ends or the server shuts down; then
/// the last frames (an error and a close, or a close reply) and a shutdown.
pub(super) async fn write_loop(
    mut wr: WriteHalf<WsIo>,
    mut inbox: Inbox,
    control: Arc<Control>,
    config: ConnConfig,
    mut close_rx: oneshot::Receiver<Vec<u8>>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let wt = config.write_timeout;
    let mut ping = ping_timer(config.ping_interval).await;
    // Made once and polled on every wake-up: building them anew per message
    // (each registering with its token) cost more than writing the frame.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // Stopped by the server's shutdown (say so) or by the reader's end.
    let stopped_frame = || {
        shutdown
            .is_cancelled()
            .then(|| close_frame(CLOSE_GOING_AWAY, "server shutting down"))
    };
    let mut events: Vec<Arc<Event>> = Vec::new();
    let pace = paced_interval(config.write_interval);
    // When to write next while messages keep coming (see `--chat-write-interval`).
    let mut rest: Option<tokio::time::Instant> = None;
    // The last frames to send before closing, if any.
    let final_frames: Option<Vec<u8>> = loop {
        let got = if let Some(until) = rest.take() {
            // The timer first: when it fires, the other branches (each a
            // lock) are not polled.
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(until) => {}
                r = &mut close_rx => break r.ok(),
                _ = &mut stopped => break stopped_frame(),
            }
            match inbox.try_recv() {
                Some(ev) => Some(Received::Event(ev)),
                // Nothing came meanwhile (or the client was disconnected,
                // which the wait below reports): wait for the next message.
                None => continue,
            }
        } else {
            // The queue first: while it has messages the tokens (each a
            // lock) are not polled. A shutdown reaches the queue too: the
            // hub disconnects every client with a reason.
            tokio::select! {
                biased;
                r = inbox.recv() => Some(r),
                _ = control.ready.notified() => None,
                r = &mut close_rx => break r.ok(),
                _ = &mut stopped => break stopped_frame(),
                _ = ping.tick() => match send_ping(&mut wr, &control, wt).await {
                    Ok(()) => continue,
                    Err(last) => break last,
                },
            }
        };
        match got {
            None => {}
            Some(Received::Event(ev)) => gather(&mut inbox, ev, &mut events),
            Some(Received::Disconnected(reason)) => break Some(disconnect_frames(&reason)),
            // The session is gone because the reader ended: send the close
            // it left, if any (the queue is polled before the tokens).
            Some(Received::Closed) => break close_rx.try_recv().ok().or_else(stopped_frame),
        }
        let result = write_events(&mut wr, &control, &mut events, wt).await;
        // Pacing: after a write, whatever comes next waits for the next tick
        // of `pace`, unless plenty is queued already; a message after a quiet
        // spell (nothing queued at the tick) goes out at once.
        if !pace.is_zero() && inbox.queued_bytes() < PACE_SKIP_BYTES {
            rest = Some(tokio::time::Instant::now() + pace);
        }
        if let Err(e) = result {
            break after_failed_write(e);
        }
    };
    finish(&mut wr, &control, final_frames, wt).await;
    stop.cancel();
}

/// The ping timer of a connection, its first (immediate) tick taken.
async fn ping_timer(period: Duration) -> tokio::time::Interval {
    let mut ping = tokio::time::interval(period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    ping
}

/// Sends a ping (after the pending control frames); on failure, the last
/// frames to send: none if the socket broke, a close if it timed out.
async fn send_ping(
    wr: &mut WriteHalf<WsIo>,
    control: &Control,
    wt: Duration,
) -> Result<(), Option<Vec<u8>>> {
    let ping = encode(Frame::ping(Bytes::new()));
    match write_timed(wr, &[&control.take(), &ping], wt).await {
        Ok(()) => Ok(()),
        Err(Some(_)) => Err(None),
        Err(None) => Err(Some(close_frame(CLOSE_WRITE_TIMEOUT, "write timeout"))),
    }
}

/// Sends a close reply tungstenite queued, or our own last frames, then
/// shuts the socket down.
async fn finish(
    wr: &mut WriteHalf<WsIo>,
    control: &Control,
    final_frames: Option<Vec<u8>>,
    wt: Duration,
) {
    let ctl = control.take();
    let last = final_frames.unwrap_or_default();
    if !ctl.is_empty() || !last.is_empty() {
        let _ = write_timed(wr, &[&ctl, &last], wt).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

/// Adds `first` and whatever else is queued (up to one write's worth) to `events`.
fn gather(inbox: &mut Inbox, first: Arc<Event>, events: &mut Vec<Arc<Event>>) {
    let mut bytes = first.frame.len();
    events.push(first);
    while events.len() < MAX_FRAMES_PER_WRITE && bytes < MAX_BYTES_PER_WRITE {
        let Some(ev) = inbox.try_recv() else { break };
        bytes += ev.frame.len();
        events.push(ev);
    }
}

/// Writes the pending control frames, then `events` (emptied, write or not).
async fn write_events(
    wr: &mut WriteHalf<WsIo>,
    control: &Control,
    events: &mut Vec<Arc<Event>>,
    wt: Duration,
) -> Result<(), Option<io::Error>> {
    // Control frames first: they were due before these events were taken.
    let ctl = control.take();
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(events.len() + 1);
    bufs.push(&ctl);
    bufs.extend(events.iter().map(|e| &e.frame[..]));
    let result = write_timed(wr, &bufs, wt).await;
    // Let go of the events now: an idle client would otherwise hold its
    // last ones (a `joined` with its history and member list) for good.
    drop(bufs);
    events.clear();
    result
}

/// The last frames after a failed write: none if the socket broke, a close
/// if it timed out.
fn after_failed_write(error: Option<io::Error>) -> Option<Vec<u8>> {
    match error {
        Some(e) => {
            debug!("websocket write failed: {e}");
            None
        }
        None => {
            debug!("websocket write timed out");
            Some(close_frame(CLOSE_WRITE_TIMEOUT, "write timeout"))
        }
    }
}

/// The error message and close frame that tell a client why the hub disconnected it.
fn disconnect_frames(reason: &DisconnectReason) -> Vec<u8> {
    let code = match reason {
        DisconnectReason::Lagging { .. } => CLOSE_LAGGING,
        DisconnectReason::Shutdown => CLOSE_GOING_AWAY,
    };
    let mut last = text_frame(
        ServerMsg::error(reason.code(), reason.to_string())
            .to_json()
            .as_bytes(),
    )
    .to_vec();
    last.extend_from_slice(&close_frame(code, &format!("{}: {reason}", reason.code())));
    last
}

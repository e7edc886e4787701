//! Broker mode, the reading side: every hub reads the room stream in order
//! with an ordered push consumer from the entry after the last one it
//! stored, and watches that the stream is still the one its store follows
//! and that its consumer delivers (docs/cluster.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{BEHIND_GRACE, Broker, MAX_BACKOFF, STALLED, STREAM, STREAM_CHECK, wire};
use crate::chat::Hub;

/// Reads the stream in order from the entry after the last one the hub has
/// stored, hands each to the hub, and on any failure starts again from the
/// entry after the last one handed over: nothing is skipped, and entries
/// handed over twice die as duplicates in the store.
pub(super) async fn consume(broker: Arc<Broker>, hub: Hub, shutdown: CancellationToken) {
    // The next entry to read: read_from advances it, check_stream watches it.
    let next = AtomicU64::new(hub.last_logged(&broker.origin) + 1);
    let mut backoff = Duration::from_millis(50);
    loop {
        let read = read_from(&broker, &hub, &next, &mut backoff);
        let failure = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = read => r,
            r = check_stream(&broker, &hub, &next) => r,
        };
        match failure {
            ReadEnd::HubGone => return,
            ReadEnd::Replaced(why) => {
                tracing::error!("broker: {why}");
                broker.replaced.send_replace(Some(why));
                return;
            }
            ReadEnd::Failed(e) => {
                let from = next.load(Ordering::Relaxed);
                tracing::warn!("broker: reading the stream from {from} failed ({e}); retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// What the stream's info says about the stream this hub follows.
#[derive(Debug, PartialEq)]
enum Follows {
    /// The same stream, holding at least what the hub applied.
    Yes,
    /// The same stream (created at the same time) ending before what the
    /// hub applied: a leader catching up after a failover, for a moment, or a
    /// store restored from an older copy, if it lasts.
    Behind(String),
    /// Another stream: created at another time (the server's store was
    /// replaced, or the stream deleted and made again).
    No(String),
}

impl Broker {
    /// Whether `info` is the stream this hub has applied up to `applied`.
    fn follows(&self, info: &stream::Info, applied: u64) -> Follows {
        follows(
            self.created,
            &self.servers,
            info.created.unix_timestamp_nanos(),
            info.state.last_sequence,
            applied,
        )
    }
}

fn follows(created: i128, servers: &str, info_created: i128, last: u64, applied: u64) -> Follows {
    if info_created == created && last >= applied {
        return Follows::Yes;
    }
    let why = format!(
        "the stream {STREAM} at {servers} is not the one this hub follows (made again, or a \
         fresh or restored server store; it ends at {last}, this hub applied up to {applied}): \
         positions would mean other messages, so this hub stops sending and delivering; \
         restart it with a fresh --data-dir"
    );
    if info_created == created {
        Follows::Behind(why)
    } else {
        Follows::No(why)
    }
}

/// Checks, at each reconnection and every [`STREAM_CHECK`], that the stream
/// is still the one the hub's store follows; returns when it is not (the
/// consumer alone would wait for its next sequence on a stream made again),
/// or (ending before what the hub applied) has not been for [`BEHIND_GRACE`];
/// or when the consumer has delivered nothing for [`STALLED`] while the
/// stream holds entries past what the hub applied (after a failover the
/// client may keep asking the servers to make its consumer again under the
/// same name, with no answer; a new consumer is made instead).
async fn check_stream(broker: &Broker, hub: &Hub, next: &AtomicU64) -> ReadEnd {
    let mut connected = broker.connected();
    let mut tick = tokio::time::interval(STREAM_CHECK);
    let mut progress = (next.load(Ordering::Relaxed), tokio::time::Instant::now());
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = connected.changed() => {}
        }
        if !*connected.borrow_and_update() {
            continue;
        }
        let Ok(stream) = broker.js.get_stream(STREAM).await else {
            continue; // not there (yet): sends fail; look again later
        };
        let applied = *hub.logged().borrow();
        match broker.follows(stream.cached_info(), applied) {
            Follows::Yes => behind_since = None,
            Follows::No(why) => return ReadEnd::Replaced(why),
            Follows::Behind(why) => {
                let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= BEHIND_GRACE {
                    return ReadEnd::Replaced(why);
                }
                continue; // the consumer waits for what it has not seen
            }
        }
        let (read, last) = (
            next.load(Ordering::Relaxed),
            stream.cached_info().state.last_sequence,
        );
        if read != progress.0 || last < read {
            progress = (read, tokio::time::Instant::now());
        } else if progress.1.elapsed() >= STALLED {
            return ReadEnd::Failed(format!(
                "nothing delivered for {STALLED:?} while the stream holds {} more entries",
                last + 1 - read
            ));
        }
    }
}

/// Why [`read_from`] stopped.
enum ReadEnd {
    /// The hub shut down.
    HubGone,
    /// The stream is another one than the hub's store follows.
    Replaced(String),
    /// The stream could not be read; try again.
    Failed(String),
}

/// One ordered consumer from `next` on, until it fails.
async fn read_from(
    broker: &Broker,
    hub: &Hub,
    next: &AtomicU64,
    backoff: &mut Duration,
) -> ReadEnd {
    let failed = |e: &dyn std::fmt::Display| ReadEnd::Failed(e.to_string());
    let stream = match broker.js.get_stream(STREAM).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    // Ending before `next` is judged by check_stream, over time; the
    // consumer made here waits for the entries it has not seen.
    if let Follows::No(why) = broker.follows(stream.cached_info(), next.load(Ordering::Relaxed) - 1)
    {
        return ReadEnd::Replaced(why);
    }
    // The server pushes entries as they are stored, with flow control and
    // idle beats; the client makes the consumer again on a gap in its
    // sequence, a lost connection or missed beats. Not a pull consumer:
    // nats-server before 2.9.16 (Debian's is 2.9.10) can drop an expired
    // pull request without its 408 when an entry arrives at that moment,
    // and async-nats then waits 5 s past the expiry before pulling again —
    // every entry in between was seconds late on that hub (docs/cluster.md).
    let config = consumer::push::OrderedConfig {
        deliver_subject: broker.client.new_inbox(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: next.load(Ordering::Relaxed),
        },
        ..Default::default()
    };
    let mut messages = match stream.create_consumer(config).await {
        Ok(c) => match c.messages().await {
            Ok(m) => m,
            Err(e) => return failed(&e),
        },
        Err(e) => return failed(&e),
    };
    while let Some(item) = messages.next().await {
        let msg = match item {
            Ok(m) => m,
            Err(e) => return failed(&e),
        };
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(e) => return failed(&e),
        };
        *backoff = Duration::from_millis(50);
        if seq < next.load(Ordering::Relaxed) {
            continue;
        }
        match wire::decode(msg.subject.as_str(), &msg.payload) {
            Ok(post) => {
                if let Err(e) = hub.apply_logged(seq, post).await {
                    if e == crate::chat::hub::HubError::ShuttingDown {
                        return ReadEnd::HubGone;
                    }
                    tracing::warn!("broker: stream entry {seq} skipped: {e}");
                }
            }
            Err(e) => tracing::warn!(
                "broker: stream entry {seq} on {} skipped: {e}",
                msg.subject.as_str().chars().take(80).collect::<String>()
            ),
        }
        // Only once handed over: a read cut short here reads it again (a
        // second copy dies in the store).
        next.store(seq + 1, Ordering::Relaxed);
    }
    failed(&"the consumer ended")
}

#[cfg(test)]
mod tests {
    use super::{Follows, follows};

    #[test]
    fn a_stream_is_followed_by_its_creation_time_and_end() {
        let s = "nats://127.0.0.1:4222";
        assert_eq!(follows(7, s, 7, 10, 10), Follows::Yes);
        assert_eq!(follows(7, s, 7, 12, 10), Follows::Yes);
        // A leader that has yet to apply entries after a failover: judged over time.
        assert!(matches!(follows(7, s, 7, 9, 10), Follows::Behind(w) if w.contains("ends at 9")));
        // Made again: another stream at once, even when it holds more.
        assert!(matches!(follows(7, s, 8, 12, 10), Follows::No(_)));
        assert!(matches!(follows(7, s, 8, 0, 10), Follows::No(_)));
    }
}

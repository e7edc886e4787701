//! An external message log (broker mode): room messages of local clients are
//! appended to it instead of numbered here, and every entry it holds, from any
//! hub, comes back through [`Hub::apply_logged`] with the log's sequence as its id.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use tokio::sync::mpsc;

use super::origin::{REMOTE, RemoteOrigin};
use super::writer::{Post, WriteCmd};
use super::{Hub, HubError, Shared};
use crate::chat::protocol::{FileRef, MessageKind, valid_nick, valid_room};
use crate::chat::store::TopicStamp;

/// Capacity of the queue of topics set here for the broker to carry.
const OUTGOING_TOPICS: usize = 256;

/// Longest topic a hub accepts (from a client or another hub).
pub(super) const MAX_TOPIC: usize = 200;

/// How long a sender waits, after the log acknowledged its message, for this
/// hub to apply it (so the client sees its own message before its next
/// request takes effect). Past that the send still succeeded: the message is
/// in the log and shows once the hub catches up.
const OWN_APPLY_WAIT: Duration = Duration::from_secs(5);

/// A room message as it goes into, and comes out of, the external log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoggedPost {
    /// The room.
    pub room: String,
    /// The author's nick.
    pub from: String,
    /// The text.
    pub text: String,
    /// Say or me.
    #[serde(default)]
    pub kind: MessageKind,
    /// Milliseconds since the Unix epoch, set by the sending hub.
    pub ts: i64,
    /// For a moderation notice: the change it records (JSON), applied by
    /// every hub in log order. Absent from the payload when `None`, so
    /// other posts are encoded as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<String>,
    /// For a file message: the file it shares (fetched on demand by a hub
    /// that does not hold it). Absent when `None`, as `moderation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
}

/// A room topic set on one hub, as the broker or the gossip relay carries
/// it to the others.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicChange {
    /// The room.
    pub room: String,
    /// The new topic.
    pub topic: String,
    /// Who set it.
    pub by: String,
    /// When it was set (ms since the epoch, on the hub that set it; 0 from
    /// a hub older than stamps).
    #[serde(default)]
    pub ms: i64,
    /// The origin of the hub that set it ("" from a hub older than stamps).
    #[serde(default)]
    pub origin: String,
}

/// An append-only log every hub of a deployment shares (a JetStream stream).
pub trait RoomLog: Send + Sync + 'static {
    /// The origin name entries are stored under (their key in this hub's store).
    fn origin(&self) -> &str;
    /// Appends `post`; resolves to its sequence in the log once the log has
    /// acknowledged it (stored), or to why it could not be appended.
    fn append(&self, post: LoggedPost) -> BoxFuture<'static, Result<u64, String>>;
    /// `Ok` while the log is reachable, else why not (for `/healthz`).
    fn health(&self) -> Result<(), String>;
}

impl Hub {
    /// Puts this hub in broker mode: room messages of local clients go to
    /// `log` and are shown (here too) only once they come back from it
    /// through [`Hub::apply_logged`]. Once; returns false if a log is set already.
    pub fn set_room_log(&self, log: Arc<dyn RoomLog>) -> bool {
        let last = self.last_logged(log.origin());
        let set = self.shared.room_log.set(log).is_ok();
        if set {
            // Where notices the writer thread makes are appended from.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let _ = self.shared.log_rt.set(rt);
            }
            self.shared.logged.send_modify(|v| *v = (*v).max(last));
        }
        set
    }

    /// The newest log sequence stored here for `origin` (where a consumer
    /// of the log resumes: the entry after it).
    pub fn last_logged(&self, origin: &str) -> u64 {
        self.shared.reader().last_seq(origin).unwrap_or_else(|e| {
            tracing::warn!("chat: {e}");
            0
        })
    }

    /// Why the external log is unreachable, if it is (`None` without one).
    pub fn log_trouble(&self) -> Option<String> {
        self.shared.room_log.get().and_then(|l| l.health().err())
    }

    /// Queues entry `seq` of the external log for storage with `seq` as its
    /// room id and delivery to the room's local members, in call order. An
    /// entry stored already (same origin and sequence) dies in SQL.
    pub async fn apply_logged(&self, seq: u64, post: LoggedPost) -> Result<(), HubError> {
        let Some(log) = self.shared.room_log.get() else {
            return Err(HubError::Broker("no message log is set".into()));
        };
        if !valid_room(&post.room) {
            return Err(HubError::bad_room(&post.room));
        }
        let origin = Some(RemoteOrigin {
            name: log.origin().to_string(),
            seq,
            id: seq,
            keep_id: true,
        });
        let cmd = WriteCmd::Say(Post {
            client: REMOTE,
            room: post.room,
            from: post.from,
            text: post.text,
            kind: post.kind,
            ts: post.ts,
            origin,
            file: post
                .file
                .map(|f| Box::new(super::files::FileShare::carried(f))),
            moderation: post.moderation,
        });
        self.writer
            .send((cmd, None))
            .await
            .map_err(|_| HubError::ShuttingDown)
    }

    /// The newest log sequence this hub has applied (committed and shown).
    pub fn logged(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.logged.subscribe()
    }

    /// Appends a local client's message to the log (failing fast with
    /// [`HubError::Broker`] when it cannot), then waits a bounded time for
    /// this hub to apply it; returns its sequence (its id in the room).
    pub(super) async fn say_logged(
        &self,
        log: &Arc<dyn RoomLog>,
        post: LoggedPost,
    ) -> Result<u64, HubError> {
        let seq = log.append(post).await.map_err(HubError::Broker)?;
        let mut applied = self.shared.logged.subscribe();
        let _ = tokio::time::timeout(OWN_APPLY_WAIT, applied.wait_for(|&v| v >= seq)).await;
        Ok(seq)
    }

    /// The topics set on this hub from now on, for the broker or the
    /// gossip relay to carry to the others; `None` after the first call.
    pub fn take_outgoing_topics(&self) -> Option<mpsc::Receiver<TopicChange>> {
        let (tx, rx) = mpsc::channel(OUTGOING_TOPICS);
        self.shared.topics_out.set(tx).ok().map(|()| rx)
    }

    /// A topic set on another hub: stored here and announced to the room's
    /// local members as set by `change.by`, in order with this hub's own
    /// writes (nothing when the room has that topic already); returns once
    /// it is applied, so changes given one after the other are compared
    /// with the topic the previous one left.
    pub async fn apply_remote_topic(&self, change: TopicChange) -> Result<(), HubError> {
        self.apply_topic_change(change, false).await
    }

    /// A topic set on another node of a gossip cluster, which may arrive
    /// late, twice or out of order: stored and announced as by
    /// [`Hub::apply_remote_topic`] only if its stamp is later than the
    /// room's (by time, then origin), so every node keeps the same one.
    /// Returns once it is queued: the writer compares stamps in order (in
    /// SQL), so the relay need not wait for each of a member's topics.
    pub async fn apply_gossip_topic(&self, change: TopicChange) -> Result<(), HubError> {
        self.apply_topic_change(change, true).await
    }

    /// Every room topic set with a stamp (since stamps exist), for a
    /// gossip member that comes up or may have missed one.
    pub fn topics(&self) -> Vec<TopicChange> {
        let st = self.shared.lock();
        let mut v: Vec<TopicChange> = st
            .rooms
            .iter()
            .filter(|(_, r)| r.topic_stamp.ms > 0)
            .map(|(name, r)| TopicChange {
                room: name.clone(),
                topic: r.topic.clone(),
                by: r.topic_by.clone(),
                ms: r.topic_stamp.ms,
                origin: r.topic_stamp.origin.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.room.cmp(&b.room));
        v
    }

    async fn apply_topic_change(
        &self,
        change: TopicChange,
        newer_only: bool,
    ) -> Result<(), HubError> {
        if !valid_room(&change.room) {
            return Err(HubError::bad_room(&change.room));
        }
        if change.topic.len() > MAX_TOPIC
            || !valid_nick(&change.by)
            || change.origin.len() > super::remote::MAX_ORIGIN_LEN
        {
            return Err(HubError::Broker("malformed topic change".into()));
        }
        let stamp = TopicStamp {
            ms: change.ms,
            origin: change.origin,
        };
        // A hub (re)starting reads every room's last topic again: one it
        // already has is not announced again (nor an older one, in gossip).
        let skip = self.shared.lock().rooms.get(&change.room).is_some_and(|r| {
            if newer_only {
                r.topic_stamp >= stamp
            } else {
                r.topic == change.topic
            }
        });
        if skip {
            return Ok(());
        }
        let cmd = WriteCmd::Topic {
            client: REMOTE,
            room: change.room,
            topic: change.topic,
            by: change.by,
            stamp,
            newer_only,
        };
        if newer_only {
            // The writer compares stamps in order: nothing to wait for.
            return self
                .writer
                .send((cmd, None))
                .await
                .map_err(|_| HubError::ShuttingDown);
        }
        // The broker's changes: applied before the next one is compared
        // with the room's topic.
        let (done, applied) = tokio::sync::oneshot::channel();
        self.writer
            .send((cmd, Some(done)))
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        applied.await.map_err(|_| HubError::ShuttingDown)
    }
}

impl Shared {
    /// A topic set by a local client was committed: hand it to the broker,
    /// if one takes them (a full queue drops it, with a log line).
    pub(super) fn topic_set_here(&self, room: &str, topic: &str, by: &str, stamp: &TopicStamp) {
        let Some(out) = self.topics_out.get() else {
            return;
        };
        let change = TopicChange {
            room: room.to_string(),
            topic: topic.to_string(),
            by: by.to_string(),
            ms: stamp.ms,
            origin: stamp.origin.clone(),
        };
        if out.try_send(change).is_err() {
            tracing::warn!(
                room,
                "cluster: topic change not carried to other hubs (queue full)"
            );
        }
    }
}

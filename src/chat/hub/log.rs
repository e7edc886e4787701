//! An external message log (broker mode): room messages of local clients are
//! appended to it instead of numbered here, and every entry it holds, from any
//! hub, comes back through [`Hub::apply_logged`] with the log's sequence as its id.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::origin::{REMOTE, RemoteOrigin};
use super::writer::{Post, WriteCmd};
use super::{Hub, HubError};
use crate::chat::protocol::{MessageKind, valid_room};

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
            file: None,
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
    /// this hub to apply it.
    pub(super) async fn say_logged(
        &self,
        log: &Arc<dyn RoomLog>,
        post: LoggedPost,
    ) -> Result<(), HubError> {
        let seq = log.append(post).await.map_err(HubError::Broker)?;
        let mut applied = self.shared.logged.subscribe();
        let _ = tokio::time::timeout(OWN_APPLY_WAIT, applied.wait_for(|&v| v >= seq)).await;
        Ok(())
    }
}

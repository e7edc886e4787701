//! Posting into chat rooms from the drop: a sender that opens its session
//! with a `Room` frame has each stored file taken into that room's store and
//! posted there. The drop knows nothing of chat; `netkit serve` supplies the
//! [`RoomDoor`] that checks the ticket and does the posting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::BoxFuture;

/// What the drop asks of the chat side when a sender names a room.
pub trait RoomDoor: Send + Sync + std::fmt::Debug {
    /// Checks `ticket` for `room`; `Err` is the reason, for the sender.
    fn open(&self, room: &str, ticket: &str) -> Result<Arc<dyn RoomShare>, String>;
}

/// One sender's way into one room.
pub trait RoomShare: Send + Sync {
    /// The folder this session's files are received into (partial files
    /// stay there for a resume).
    fn incoming(&self) -> &Path;
    /// Takes the durable file at `path` (named `name`, `size` bytes, BLAKE3
    /// `hash`) into the room and posts its message; returns its link, or
    /// the reason it was not posted (the file is then removed).
    fn share(
        &self,
        path: PathBuf,
        name: String,
        size: u64,
        hash: blake3::Hash,
    ) -> BoxFuture<'static, Result<String, String>>;
}

/// Where one session stores its entries: the receiver's folder, or a room's.
#[derive(Clone)]
pub(super) struct Dest {
    /// Folder entries are stored in.
    pub(super) dir: PathBuf,
    /// The room each stored file is posted into, if the sender named one.
    pub(super) share: Option<Arc<dyn RoomShare>>,
}

impl Dest {
    /// The receiver's own folder.
    pub(super) fn folder(dir: &Path) -> Dest {
        Dest {
            dir: dir.to_path_buf(),
            share: None,
        }
    }

    /// A room's incoming folder.
    pub(super) fn room(share: Arc<dyn RoomShare>) -> Dest {
        Dest {
            dir: share.incoming().to_path_buf(),
            share: Some(share),
        }
    }
}

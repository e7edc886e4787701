//! The file drop's way into chat rooms: a `netkit send --room R --ticket T`
//! session to the drop of `netkit serve` has each stored file taken into R's
//! store and posted there as the member who holds the ticket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::FileStore;
use crate::chat::Hub;
use crate::chat::hub::Uploader;
use crate::transfer::recv::{RoomDoor, RoomShare};

/// The drop's [`RoomDoor`]: tickets checked by the hub, files kept in the store.
#[derive(Clone)]
pub struct RoomDrop {
    hub: Hub,
    store: Arc<FileStore>,
    /// Base of download links, without a trailing `/`.
    base: String,
}

impl std::fmt::Debug for RoomDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomDrop")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl RoomDrop {
    /// Posts through `hub` into the rooms of `store`, with links under `base`.
    pub fn new(hub: Hub, store: Arc<FileStore>, base: &str) -> RoomDrop {
        RoomDrop {
            hub,
            store,
            base: base.trim_end_matches('/').to_string(),
        }
    }
}

/// One sender's session into one room.
struct RoomSender {
    door: RoomDrop,
    by: Uploader,
    incoming: PathBuf,
}

impl RoomDoor for RoomDrop {
    fn open(&self, room: &str, ticket: &str) -> Result<Arc<dyn RoomShare>, String> {
        let by = self
            .hub
            .file_uploader(ticket, room)
            .map_err(|e| e.to_string())?;
        self.store.check_room(room).map_err(|e| e.to_string())?;
        let incoming = self.store.drop_dir(room);
        std::fs::create_dir_all(&incoming)
            .map_err(|e| format!("cannot prepare room '{room}' for files: {e}"))?;
        Ok(Arc::new(RoomSender {
            door: self.clone(),
            by,
            incoming,
        }))
    }
}

impl RoomShare for RoomSender {
    fn incoming(&self) -> &Path {
        &self.incoming
    }

    fn share(
        &self,
        path: PathBuf,
        name: String,
        size: u64,
        hash: blake3::Hash,
    ) -> BoxFuture<'static, Result<String, String>> {
        let (door, by) = (self.door.clone(), self.by.clone());
        Box::pin(async move {
            let stored = door
                .store
                .adopt(&by.room, &by.nick, &name, &path, size, hash)
                .await
                .map_err(|e| e.to_string())?;
            let file = stored.file_ref(&door.base);
            let url = file.url.clone();
            let id = door
                .hub
                .post_file(&by, file)
                .await
                .map_err(|e| format!("stored but not posted: {e}"))?;
            tracing::info!(room = %by.room, nick = %by.nick, id, "files: {name} posted from the drop");
            Ok(url)
        })
    }
}

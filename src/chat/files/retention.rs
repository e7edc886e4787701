//! Retention (`--room-files-retention-days`): a stored file older than the
//! retention that no message shared within it is removed, and the messages
//! that shared it are marked expired first (so none points to a missing file).
//! What the drop left unfinished in a room goes after the same time.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{DROP_DIR, FILES_DIR, FileStore, lock};
use crate::chat::store::Store;

/// How often the sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

impl FileStore {
    /// Removes every room's files older than `retention` (by their time in
    /// the store) that no message of the room shared since `now_ms -
    /// retention`, after marking their messages in `history` expired;
    /// returns how many it removed.
    pub fn sweep(
        &self,
        history: &mut Store,
        now_ms: i64,
        retention: Duration,
    ) -> io::Result<usize> {
        let cutoff = now_ms.saturating_sub(retention.as_millis() as i64);
        let mut removed = 0;
        for room in std::fs::read_dir(&self.root)? {
            let room = room?;
            let Some(name) = room.file_name().to_str().map(str::to_string) else {
                continue;
            };
            removed_drop_leftovers(&room.path().join(FILES_DIR).join(DROP_DIR), cutoff);
            for entry in std::fs::read_dir(room.path().join(FILES_DIR))
                .into_iter()
                .flatten()
            {
                let entry = entry?;
                let Some(hex) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if self.stored(&name, &hex).is_ok()
                    && self.sweep_one(history, &name, &hex, cutoff)?
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Removes `room`'s file `hex` if it and its last sharing are older than `cutoff`.
    fn sweep_one(
        &self,
        history: &mut Store,
        room: &str,
        hex: &str,
        cutoff: i64,
    ) -> io::Result<bool> {
        let path = self.files_dir(room).join(hex);
        let shared = history
            .file_last_shared(room, hex)
            .map_err(io::Error::other)?;
        if shared.is_some_and(|t| t >= cutoff) {
            return Ok(false);
        }
        // Under the lock an identical upload takes to reuse the file (and
        // touch it), so a file being reshared right now is never removed.
        let mut used = lock(&self.used);
        let meta = std::fs::metadata(&path)?;
        if ms_of(meta.modified()?) >= cutoff {
            return Ok(false);
        }
        history.expire_file(room, hex).map_err(io::Error::other)?;
        std::fs::remove_file(&path)?;
        super::thumbs::remove(&self.files_dir(room), hex)?;
        if let Some(n) = used.get_mut(room) {
            *n = n.saturating_sub(meta.len());
        }
        tracing::info!(room, blake3 = hex, "files: expired and removed");
        Ok(true)
    }
}

/// Removes what the drop left in a room's incoming folder (partial files
/// never resumed, emptied folders of trees) untouched since `cutoff`.
fn removed_drop_leftovers(incoming: &std::path::Path, cutoff: i64) {
    for entry in std::fs::read_dir(incoming).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.modified().map(ms_of).unwrap_or(i64::MAX) >= cutoff {
            continue;
        }
        let gone = if meta.is_dir() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        if let Err(e) = gone {
            tracing::warn!("files: cannot remove {}: {e}", entry.path().display());
        }
    }
}

fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sweeps at start and every hour until `shutdown`, on a history
/// connection of its own opened in `data_dir`.
pub async fn run_retention(
    files: Arc<FileStore>,
    data_dir: PathBuf,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let mut history = match Store::open_in(&data_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("files: retention is off: {e}");
            return;
        }
    };
    loop {
        let f = files.clone();
        let now = crate::chat::protocol::now_ms();
        let swept = tokio::task::spawn_blocking(move || {
            let r = f.sweep(&mut history, now, retention);
            (history, r)
        })
        .await;
        match swept {
            Ok((h, r)) => {
                history = h;
                if let Err(e) = r {
                    tracing::warn!("files: retention sweep: {e}");
                }
            }
            Err(e) => {
                tracing::error!("files: retention sweep failed: {e}");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

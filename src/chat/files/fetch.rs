//! The store's side of fetching a room file from another hub of the
//! cluster: where the bytes arrive (a part file that a restart removes) and
//! how a verified copy takes its content-addressed name. The fetch itself
//! speaks HTTP and lives in `http::files_fetch`.

use std::path::{Path, PathBuf};

use super::{FileError, FileStore, PARTIAL_DIR, lock};

impl FileStore {
    /// Checks that `room` takes files and that a copy of `size` bytes fits
    /// (the largest file, the room's quota, the free space), then names a
    /// fresh part file for fetching blob `hex` into (not created yet).
    pub fn fetch_part(&self, room: &str, hex: &str, size: u64) -> Result<PathBuf, FileError> {
        self.check_room(room)?;
        self.check_size(size)?;
        let dir = self.files_dir(room);
        std::fs::create_dir_all(dir.join(PARTIAL_DIR))?;
        let uploads = lock(&self.uploads);
        self.check_free(&uploads, &dir, size, None)?;
        self.check_quota(&uploads, room, size)?;
        drop(uploads);
        let tag = format!("{:016x}", rand::random::<u64>());
        Ok(dir
            .join(PARTIAL_DIR)
            .join(format!("fetch-{hex}-{tag}.part")))
    }

    /// Gives the fetched, verified and durable file `part` (`size` bytes
    /// whose BLAKE3 is `hex`) its name in `room`'s store.
    pub fn adopt_fetched(
        &self,
        room: &str,
        part: &Path,
        hex: &str,
        size: u64,
    ) -> Result<(), FileError> {
        self.commit(room, part, hex, size)?;
        Ok(())
    }
}

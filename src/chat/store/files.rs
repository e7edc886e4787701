//! The history's side of room-file retention: when a file was last shared
//! in a room, and marking the messages that shared it expired.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::chat::protocol::FileRef;

impl Store {
    /// The newest time (ms since the epoch) a message of `room` shared the
    /// file with BLAKE3 `blake3`; `None` when no message did.
    pub fn file_last_shared(&self, room: &str, blake3: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT max(ts_ms) FROM messages WHERE room = ?1 AND file IS NOT NULL
                 AND json_extract(file, '$.blake3') = ?2",
                params![room, blake3],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    /// Marks every message of `room` that shares `blake3` expired: its file
    /// says so and its text reads `shared NAME (SIZE), expired…`. Returns
    /// how many it changed (in one transaction).
    pub fn expire_file(&mut self, room: &str, blake3: &str) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let rows: Vec<(i64, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT id, file FROM messages WHERE room = ?1 AND file IS NOT NULL
                     AND json_extract(file, '$.blake3') = ?2",
                )
                .map_err(err)?;
            stmt.query_map(params![room, blake3], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?
        };
        let mut changed = 0;
        for (id, json) in rows {
            let Ok(mut file) = serde_json::from_str::<FileRef>(&json) else {
                continue;
            };
            if file.expired {
                continue;
            }
            file.expired = true;
            file.thumb = None;
            let json = serde_json::to_string(&file).expect("a file always serializes");
            tx.execute(
                "UPDATE messages SET file = ?1, text = ?2 WHERE room = ?3 AND id = ?4",
                params![json, file.summary(), room, id],
            )
            .map_err(err)?;
            changed += 1;
        }
        tx.commit().map_err(err)?;
        super::messages_committed();
        Ok(changed)
    }
}

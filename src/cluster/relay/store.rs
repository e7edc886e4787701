//! The relay store: every relayed message by `(origin, seq)`, this node's
//! own included, in `<data-dir>/relay.sqlite3`; its errors are [`StoreError`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::packet::RelayedMessage;
use crate::chat::protocol::MessageKind;

/// A relay store failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("cannot open the relay store {}: {cause} — check that --data-dir is writable", path.display())]
    Open {
        /// The store's file.
        path: PathBuf,
        /// What SQLite said.
        cause: rusqlite::Error,
    },
    /// A statement failed.
    #[error("relay store {}: {cause}", path.display())]
    Sqlite {
        /// The store's file.
        path: PathBuf,
        /// What SQLite said.
        cause: rusqlite::Error,
    },
}

/// Where a node keeps every relayed message by `(origin, seq)`, its own
/// included: `<data-dir>/relay.sqlite3`. It answers `Serve` and rebuilds the
/// `have` map at start.
pub struct RelayStore {
    conn: rusqlite::Connection,
    path: PathBuf,
}

impl RelayStore {
    /// Opens (or creates) the relay store in `dir`.
    pub fn open_in(dir: &Path) -> Result<RelayStore, StoreError> {
        let path = dir.join("relay.sqlite3");
        let conn = match rusqlite::Connection::open(&path) {
            Ok(conn) => conn,
            Err(cause) => return Err(StoreError::Open { path, cause }),
        };
        let store = RelayStore { conn, path };
        store.create_schema().map_err(|e| store.error(e))?;
        Ok(store)
    }

    /// Sets the journal mode, creates the tables and adds columns that older
    /// stores lack.
    fn create_schema(&self) -> rusqlite::Result<()> {
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS relay_messages (
                 origin TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 room TEXT NOT NULL,
                 nick TEXT NOT NULL,
                 text TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 ts_ms INTEGER NOT NULL,
                 done INTEGER NOT NULL DEFAULT 1,
                 PRIMARY KEY (origin, seq)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS relay_meta (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             );",
        )?;
        // Stores made before origin ids: their rows keep 0 (unknown).
        let has: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('relay_messages') WHERE name = 'origin_id'",
            [],
            |r| r.get(0),
        )?;
        if has == 0 {
            self.conn.execute_batch(
                "ALTER TABLE relay_messages ADD COLUMN origin_id INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        Ok(())
    }

    fn error(&self, cause: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            cause,
        }
    }

    /// This store's origin name for node `name`: `name/TAG`, where TAG is
    /// random and made once per store. A node that restarts with an empty
    /// data dir is thus a new origin, and its sequence numbers, starting again
    /// at 1, are not taken for duplicates of its previous life's.
    pub fn origin(&self, name: &str) -> Result<String, StoreError> {
        let tag = format!("{:08x}", rand::random::<u32>());
        self.conn
            .execute(
                "INSERT OR IGNORE INTO relay_meta (key, value) VALUES ('origin_tag', ?1)",
                [&tag],
            )
            .map_err(|e| self.error(e))?;
        let tag: String = self
            .conn
            .query_row(
                "SELECT value FROM relay_meta WHERE key = 'origin_tag'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.error(e))?;
        Ok(format!("{name}/{tag}"))
    }

    /// The highest sequence stored per origin. Messages are stored gap-free
    /// per origin (in apply order), so it is the `have` map.
    pub fn have(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let read = || {
            let mut stmt = self
                .conn
                .prepare("SELECT origin, MAX(seq) FROM relay_messages GROUP BY origin")?;
            stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<BTreeMap<_, _>, _>>()
        };
        read().map_err(|e| self.error(e))
    }

    /// Stores `msgs` in one transaction (a message already stored is kept);
    /// `done: false` marks them as not yet known to be in the hub's history.
    pub fn insert(&mut self, msgs: &[RelayedMessage], done: bool) -> Result<(), StoreError> {
        let write = |conn: &mut rusqlite::Connection| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO relay_messages (origin, seq, room, nick, text, kind, ts_ms, done, origin_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for m in msgs {
                    stmt.execute(rusqlite::params![
                        m.origin,
                        m.seq as i64,
                        m.room,
                        m.from,
                        m.text,
                        m.kind.as_str(),
                        m.ts,
                        done,
                        i64::try_from(m.origin_id).unwrap_or(i64::MAX)
                    ])?;
                }
            }
            tx.commit()
        };
        write(&mut self.conn).map_err(|e| self.error(e))
    }

    /// Records that `msgs` are in the hub's history.
    pub fn mark_done(&mut self, msgs: &[RelayedMessage]) -> Result<(), StoreError> {
        let write = |conn: &mut rusqlite::Connection| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE relay_messages SET done = 1 WHERE origin = ?1 AND seq = ?2",
                )?;
                for m in msgs {
                    stmt.execute(rusqlite::params![m.origin, m.seq as i64])?;
                }
            }
            tx.commit()
        };
        write(&mut self.conn).map_err(|e| self.error(e))
    }

    /// Messages stored but not known to be in the hub's history (a crash
    /// came between the two commits), in order.
    pub fn not_done(&self) -> Result<Vec<RelayedMessage>, StoreError> {
        let read = || {
            let mut stmt = self.conn.prepare(
                "SELECT origin, seq, room, nick, text, kind, ts_ms, origin_id FROM relay_messages
                 WHERE done = 0 ORDER BY origin, seq",
            )?;
            stmt.query_map([], message_row)?
                .collect::<Result<Vec<_>, _>>()
        };
        read().map_err(|e| self.error(e))
    }

    /// `origin`'s stored messages with a sequence above `after`, at most `limit`, in order.
    pub fn after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RelayedMessage>, StoreError> {
        let read = || {
            let mut stmt = self.conn.prepare_cached(
                "SELECT origin, seq, room, nick, text, kind, ts_ms, origin_id FROM relay_messages
                 WHERE origin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            stmt.query_map(
                rusqlite::params![origin, after as i64, limit as i64],
                message_row,
            )?
            .collect::<Result<Vec<_>, _>>()
        };
        read().map_err(|e| self.error(e))
    }
}

/// A `relay_messages` row selected as `origin, seq, room, nick, text, kind,
/// ts_ms, origin_id`.
fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RelayedMessage> {
    Ok(RelayedMessage {
        origin: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        room: r.get(2)?,
        from: r.get(3)?,
        text: r.get(4)?,
        kind: MessageKind::from_db(&r.get::<_, String>(5)?),
        ts: r.get(6)?,
        origin_id: r.get::<_, i64>(7)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay store made before origin ids opens; its rows read as 0.
    #[test]
    fn old_relay_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("relay.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE relay_messages (origin TEXT NOT NULL, seq INTEGER NOT NULL,
                     room TEXT NOT NULL, nick TEXT NOT NULL, text TEXT NOT NULL, kind TEXT NOT NULL,
                     ts_ms INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 1,
                     PRIMARY KEY (origin, seq)) WITHOUT ROWID;
                 INSERT INTO relay_messages VALUES ('b/1', 1, 'r', 'bob', 'old', 'say', 5, 1);",
            )
            .unwrap();
        }
        let mut store = RelayStore::open_in(dir.path()).unwrap();
        let old = store.after("b/1", 0, 10).unwrap();
        assert_eq!((old[0].text.as_str(), old[0].origin_id), ("old", 0));
        let new = RelayedMessage {
            origin: "b/1".into(),
            seq: 2,
            room: "r".into(),
            from: "bob".into(),
            text: "new".into(),
            kind: MessageKind::Say,
            ts: 6,
            origin_id: 4,
        };
        store.insert(std::slice::from_ref(&new), true).unwrap();
        drop(store);
        let store = RelayStore::open_in(dir.path()).unwrap();
        assert_eq!(store.after("b/1", 1, 10).unwrap(), vec![new]);
    }
}

//! Upgrades of a data dir's history: the origin columns added to databases
//! made before them, and the one-time import of the relay store that
//! versions before the one log kept beside it (`relay.sqlite3`).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Store, StoreError};
use crate::chat::protocol::valid_room;

/// File name of the relay store that versions before the one log kept in
/// the data dir; [`Store::import_relay_store`] moves it into the history.
pub const RELAY_STORE_FILE: &str = "relay.sqlite3";

/// What the relay store became; it is renamed to this once imported.
const RETIRED_FILE: &str = "relay.sqlite3.migrated";

/// Columns the history gained over time, with their types: a database made
/// before one gets it at start (its old rows hold `NULL`).
const ORIGIN_COLUMNS: [(&str, &str); 5] = [
    ("origin", "TEXT"),
    ("origin_id", "INTEGER"),
    ("origin_seq", "INTEGER"),
    // Not an origin column: the file a file message shares (JSON), added by
    // the same upgrade path.
    ("file", "TEXT"),
    // The moderation change a notice carries (JSON), for the other nodes.
    ("moderation", "TEXT"),
];

/// Columns a room gained for topics across the cluster: when and on which
/// node its topic was set, and by whom (rooms made before them read as a
/// topic set at time 0, which any later setting replaces).
const TOPIC_COLUMNS: [(&str, &str); 3] = [
    ("topic_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("topic_origin", "TEXT NOT NULL DEFAULT ''"),
    ("topic_by", "TEXT NOT NULL DEFAULT ''"),
];

/// Adds the topic stamp columns to a rooms table made before them.
pub(super) fn add_topic_columns(conn: &Connection) -> rusqlite::Result<()> {
    add_missing_columns(conn, "rooms", &TOPIC_COLUMNS)
}

/// Adds to `table` those of `columns` (name, type) it lacks, in one
/// transaction: several connections open the file, and the first one migrates.
fn add_missing_columns(
    conn: &Connection,
    table: &str,
    columns: &[(&str, &str)],
) -> rusqlite::Result<()> {
    let missing = |conn: &Connection| -> rusqlite::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (name, ty) in columns {
            let has: i64 = conn.query_row(
                "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
                [table, name],
                |r| r.get(0),
            )?;
            if has == 0 {
                out.push((name.to_string(), ty.to_string()));
            }
        }
        Ok(out)
    };
    if missing(conn)?.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let done = missing(conn).and_then(|cols| {
        cols.iter().try_for_each(|(name, ty)| {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {ty}"))
        })
    });
    match done {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// What importing an old relay store did, row by row of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayImport {
    /// Rows found in the history by room, origin and origin id: the
    /// message got its sequence number.
    pub keyed: u64,
    /// Rows without an origin id (relayed by a version before it) found by
    /// room, author, text, kind and time among messages without an origin.
    pub legacy: u64,
    /// Rows the history lacked (a crash between the relay's record and the
    /// hub's commit): stored as new messages of their room.
    pub added: u64,
    /// Rows already in the history with their sequence (an import that
    /// stopped before the file was retired).
    pub present: u64,
    /// Rows whose room name is not valid (never shown by any hub).
    pub skipped: u64,
}

/// Adds the cluster origin columns to a database made before them and the
/// indexes that resume by origin and the log use. `UNIQUE(origin, origin_seq)`
/// is what makes a message relayed twice a no-op.
pub(super) fn add_origin_columns(conn: &Connection) -> rusqlite::Result<()> {
    add_missing_columns(conn, "messages", &ORIGIN_COLUMNS)?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS messages_by_origin
             ON messages (room, origin, origin_id) WHERE origin IS NOT NULL;
         CREATE UNIQUE INDEX IF NOT EXISTS messages_by_seq
             ON messages (origin, origin_seq) WHERE origin_seq IS NOT NULL;",
    )
}

/// One row of the old relay store.
struct OldRow {
    origin: String,
    seq: i64,
    room: String,
    nick: String,
    text: String,
    kind: String,
    ts: i64,
    origin_id: i64,
}

impl Store {
    /// Moves the relay store of an older version (`relay.sqlite3` in `dir`)
    /// into this history, once: every message there gets its sequence number
    /// in the history (messages keep their ids and origins), messages the
    /// history lacks are added, and the origin tag comes along. All in one
    /// transaction; only after its commit is the file renamed to
    /// `relay.sqlite3.migrated` (kept, not deleted). A crash before the rename
    /// runs it again at the next start, which finds everything present.
    /// `Ok(None)` when there is no such file.
    pub fn import_relay_store(&mut self, dir: &Path) -> Result<Option<RelayImport>, StoreError> {
        let old = dir.join(RELAY_STORE_FILE);
        if !old.exists() {
            return Ok(None);
        }
        let Some(old_path) = old.to_str() else {
            return Err(self.err(rusqlite::Error::InvalidPath(old.clone())));
        };
        self.conn
            .execute("ATTACH DATABASE ?1 AS old", [old_path])
            .map_err(|e| self.err(e))?;
        let imported = import(&mut self.conn);
        let detached = self.conn.execute_batch("DETACH DATABASE old");
        let report = imported.and_then(|r| detached.map(|()| r));
        let report = report.map_err(|e| self.err(e))?;
        retire(dir).map_err(|source| StoreError::Retire { path: old, source })?;
        Ok(Some(report))
    }
}

/// The import itself, in one transaction on a connection with the old store
/// attached as `old`.
fn import(conn: &mut Connection) -> rusqlite::Result<RelayImport> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has_table = |name: &str| -> rusqlite::Result<bool> {
        tx.query_row(
            "SELECT COUNT(*) FROM old.sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
    };
    if has_table("relay_meta")? {
        tx.execute(
            "INSERT OR IGNORE INTO main.meta (key, value)
             SELECT key, value FROM old.relay_meta WHERE key = 'origin_tag'",
            [],
        )?;
    }
    let mut report = RelayImport::default();
    if has_table("relay_messages")? {
        // Stores made before origin ids have no such column: 0 (unknown).
        let has_origin_id: bool = tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('relay_messages', 'old') WHERE name = 'origin_id'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        let origin_id = if has_origin_id { "origin_id" } else { "0" };
        let mut rows = tx.prepare(&format!(
            "SELECT origin, seq, room, nick, text, kind, ts_ms, {origin_id}
             FROM old.relay_messages ORDER BY origin, seq"
        ))?;
        let rows = rows.query_map([], |r| {
            Ok(OldRow {
                origin: r.get(0)?,
                seq: r.get(1)?,
                room: r.get(2)?,
                nick: r.get(3)?,
                text: r.get(4)?,
                kind: r.get(5)?,
                ts: r.get(6)?,
                origin_id: r.get(7)?,
            })
        })?;
        for row in rows {
            import_row(&tx, &row?, &mut report)?;
        }
    }
    tx.commit()?;
    super::messages_committed();
    Ok(report)
}

/// One row of the old store: already there, found by key, found by content
/// (rows without an origin id only), or added.
fn import_row(conn: &Connection, row: &OldRow, report: &mut RelayImport) -> rusqlite::Result<()> {
    let present: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM messages WHERE origin = ?1 AND origin_seq = ?2")?
        .query_row(params![row.origin, row.seq], |r| r.get(0))
        .optional()?;
    if present.is_some() {
        report.present += 1;
        return Ok(());
    }
    if row.origin_id > 0 {
        let keyed = conn
            .prepare_cached(
                "UPDATE messages SET origin_seq = ?1
                 WHERE room = ?2 AND origin = ?3 AND origin_id = ?4 AND origin_seq IS NULL",
            )?
            .execute(params![row.seq, row.room, row.origin, row.origin_id])?;
        if keyed > 0 {
            report.keyed += 1;
            return Ok(());
        }
    } else {
        // Relayed before origin ids: the history stored it without an
        // origin, and its content is the only key it has.
        let legacy = conn
            .prepare_cached(
                "UPDATE messages SET origin = ?1, origin_seq = ?2
                 WHERE room = ?3 AND id = (
                     SELECT id FROM messages
                     WHERE room = ?3 AND origin IS NULL AND nick = ?4 AND text = ?5
                       AND ts_ms = ?6 AND kind = ?7
                     ORDER BY id LIMIT 1)",
            )?
            .execute(params![
                row.origin, row.seq, row.room, row.nick, row.text, row.ts, row.kind
            ])?;
        if legacy > 0 {
            report.legacy += 1;
            return Ok(());
        }
    }
    if !valid_room(&row.room) {
        report.skipped += 1;
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO rooms (name, topic, created_ms) VALUES (?1, '', ?2)",
    )?
    .execute(params![row.room, row.ts])?;
    conn.prepare_cached(
        "INSERT INTO messages (room, id, nick, text, ts_ms, kind, origin, origin_id, origin_seq)
         SELECT ?1, COALESCE(MAX(id), 0) + 1, ?2, ?3, ?4, ?5, ?6, NULLIF(?7, 0), ?8
         FROM messages WHERE room = ?1",
    )?
    .execute(params![
        row.room,
        row.nick,
        row.text,
        row.ts,
        row.kind,
        row.origin,
        row.origin_id,
        row.seq
    ])?;
    report.added += 1;
    Ok(())
}

/// Renames the imported relay store (and its write-ahead log, if a killed
/// process left one) out of the way; its shared-memory index is rebuilt
/// from those and is removed.
fn retire(dir: &Path) -> std::io::Result<()> {
    let (old, new) = (dir.join(RELAY_STORE_FILE), dir.join(RETIRED_FILE));
    let wal = |p: &Path, suffix: &str| {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        std::path::PathBuf::from(s)
    };
    if wal(&old, "-wal").exists() {
        std::fs::rename(wal(&old, "-wal"), wal(&new, "-wal"))?;
    }
    match std::fs::remove_file(wal(&old, "-shm")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::rename(&old, &new)
}

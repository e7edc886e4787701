//! Chat history in SQLite, and in a cluster the one message log: room
//! messages keyed by (room, id) and, when they have an origin, by
//! (origin, origin_seq); rooms with their topics. Only the hub's writer thread
//! writes; readers open their own connection (WAL mode lets them read while it writes).

mod batch;
mod files;
mod migrate;
mod moderation;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::protocol::{ChatMessage, FileRef, MessageKind};

pub use batch::Batch;
pub use migrate::{RELAY_STORE_FILE, RelayImport};
pub use moderation::{Role, StoredBan, StoredRules};

/// File name of the chat database inside the data dir.
pub const DB_FILE: &str = "chat.sqlite3";

/// A failure of the history database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("chat history database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// An imported relay store could not be renamed out of the way.
    #[error("cannot rename {path} after moving it into the history: {source}")]
    Retire {
        /// The relay store's file.
        path: PathBuf,
        /// What the rename said.
        source: std::io::Error,
    },
}

/// A connection to the chat history database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A message about to be stored, with its id already assigned.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// Room name.
    pub room: &'a str,
    /// Per-room id.
    pub id: u64,
    /// Author nick.
    pub from: &'a str,
    /// The text.
    pub text: &'a str,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    /// Plain or action.
    pub kind: MessageKind,
    /// The cluster origin that posted it, with its place in the log
    /// (`None` with clustering off, and for rows older than the columns).
    pub origin: Option<Origin<'a>>,
    /// The file a file message shares (stored as JSON).
    pub file: Option<&'a FileRef>,
    /// For a moderation notice: the change it records (JSON), which every
    /// node storing the notice applies ([`LogMessage::moderation`]).
    pub moderation: Option<&'a str>,
}

/// Where a message comes from in the cluster log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The origin (`node/TAG`).
    pub name: &'a str,
    /// Its sequence number there (1, 2, 3, … per origin): with `name`, the
    /// message's key in the log; a second message with the same key is a
    /// duplicate and is not stored.
    pub seq: u64,
    /// Its id in the room on the origin node (what clients resume by); 0 if
    /// unknown (relayed by a version that did not carry it).
    pub id: u64,
}

/// A message of the cluster log: what one node reads from its store and
/// another stores with [`Origin`] (the relay carries it as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMessage {
    /// The origin (`node/TAG`) where it was posted.
    pub origin: String,
    /// Its sequence number at the origin, from 1.
    pub seq: u64,
    /// Room name.
    pub room: String,
    /// Author nick.
    pub from: String,
    /// The text.
    pub text: String,
    /// Plain message or `/me` action.
    pub kind: MessageKind,
    /// Milliseconds since the Unix epoch, at the origin.
    pub ts: i64,
    /// Its id in the room on the origin node (what clients resume by, with
    /// `origin`); 0 if unknown (relayed before this field existed).
    /// Appended last: nodes that predate it cannot decode messages from
    /// nodes that have it, and the reverse; upgrade every node together.
    pub origin_id: u64,
    /// For a moderation notice: the change it records, as JSON, applied by
    /// every node that stores the notice. Appended after `origin_id`: a node
    /// that predates it decodes these messages (postcard ignores the
    /// trailing bytes) and drops the change; messages from such a node lack
    /// it and are read as `None` (see the relay's packet decoding).
    pub moderation: Option<String>,
    /// For a file message: the file it shares, as JSON (the `file` column).
    /// Appended after `moderation`, the same way: older nodes ignore it,
    /// and a message from them is read as `None`.
    pub file: Option<String>,
}

/// What a resume by origin vector ([`Store::since`]) finds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinceResume {
    /// The newest `limit` messages the client has not seen, oldest first.
    pub messages: Vec<ChatMessage>,
    /// True when more than `limit` were missed.
    pub truncated: bool,
    /// Entries of the vector this store is behind on: `(origin, n)` where
    /// the room's newest message of `origin` here has an origin id below `n`.
    pub behind: Vec<(String, u64)>,
}

/// Columns read for a [`ChatMessage`].
const MSG_COLUMNS: &str = "id, nick, text, ts_ms, kind, origin, origin_id, file";

/// A room as stored: name, topic and newest message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoom {
    /// Room name.
    pub name: String,
    /// Topic (may be empty).
    pub topic: String,
    /// Who set the topic ("" if unknown).
    pub topic_by: String,
    /// When and where the topic was set.
    pub topic_stamp: TopicStamp,
    /// Newest message id (0 if none).
    pub last_id: u64,
}

/// When and on which node a room's topic was set. Across a gossip cluster
/// the later setting wins: by time, then by origin name, so every node
/// picks the same one whatever order the settings arrive in. A topic from
/// before stamps existed has time 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopicStamp {
    /// Milliseconds since the Unix epoch, on the node that set it.
    pub ms: i64,
    /// That node's origin (`name/TAG`), or "" outside a cluster.
    pub origin: String,
}

/// Transactions this process committed that changed stored messages (any
/// store, any connection), counted after each commit: a cache of what the
/// messages table held is current while this is unchanged, as far as this
/// process's own writes go ([`Store::data_version`] covers other processes).
static MESSAGE_COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// [`MESSAGE_COMMITS`] now.
pub fn message_commits() -> u64 {
    MESSAGE_COMMITS.load(std::sync::atomic::Ordering::Acquire)
}

/// Counts a committed change of stored messages.
pub(crate) fn messages_committed() {
    MESSAGE_COMMITS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

impl Store {
    /// Opens (creating if needed) the database `chat.sqlite3` in `dir`.
    pub fn open_in(dir: &Path) -> Result<Store, StoreError> {
        Store::open(&dir.join(DB_FILE))
    }

    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        // WAL + NORMAL: a commit is in the OS once `commit` returns, so a killed
        // process loses nothing it committed (only a power loss could).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // A cached statement keeps its plan whatever values are bound. Without
        // this, the bundled SQLite (built with STAT4) compiled the page query
        // again on every run: 10 % of a history request's CPU.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rooms (
                 name TEXT PRIMARY KEY,
                 topic TEXT NOT NULL DEFAULT '',
                 created_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS messages (
                 room TEXT NOT NULL,
                 id INTEGER NOT NULL,
                 nick TEXT NOT NULL,
                 text TEXT NOT NULL,
                 ts_ms INTEGER NOT NULL,
                 kind TEXT NOT NULL DEFAULT 'say',
                 PRIMARY KEY (room, id)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        migrate::add_origin_columns(&conn).map_err(err)?;
        migrate::add_topic_columns(&conn).map_err(err)?;
        moderation::create_tables(&conn).map_err(err)?;
        Ok(Store { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Leaves WAL checkpoints (and their fsyncs) to [`Store::checkpoint`] on
    /// another connection, so that committing a batch never waits on the disk.
    pub fn disable_autocheckpoint(&self) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| self.err(e))?;
        self.conn
            .pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(|e| self.err(e))
    }

    /// Copies committed WAL pages into the database without blocking writers.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }

    /// Every known room with its topic and newest id, sorted by name.
    pub fn rooms(&self) -> Result<Vec<StoredRoom>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT r.name, r.topic, COALESCE((SELECT MAX(id) FROM messages m WHERE m.room = r.name), 0),
                        r.topic_by, r.topic_ms, r.topic_origin
                 FROM rooms r ORDER BY r.name",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredRoom {
                    name: r.get(0)?,
                    topic: r.get(1)?,
                    last_id: r.get::<_, i64>(2)? as u64,
                    topic_by: r.get(3)?,
                    topic_stamp: TopicStamp {
                        ms: r.get(4)?,
                        origin: r.get(5)?,
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// This store's cluster origin for node `name`: `name/TAG`, where TAG
    /// is random and made once per database. A node that restarts with an
    /// empty data dir is thus a new origin, and its sequence numbers,
    /// starting again at 1, are not taken for duplicates of its previous life's.
    pub fn origin(&self, name: &str) -> Result<String, StoreError> {
        let tag = format!("{:08x}", rand::random::<u32>());
        self.conn
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('origin_tag', ?1)",
                [&tag],
            )
            .map_err(|e| self.err(e))?;
        let tag: String = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'origin_tag'", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        Ok(format!("{name}/{tag}"))
    }

    /// The highest sequence stored per origin: what this node holds of the
    /// cluster log (the relay's `have` map at start).
    pub fn log_heads(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT origin, MAX(origin_seq) FROM messages
                 WHERE origin_seq IS NOT NULL GROUP BY origin",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// `origin`'s messages with a sequence above `after`, at most `limit`,
    /// in sequence order (one index range read).
    pub fn log_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogMessage>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT origin, origin_seq, room, nick, text, kind, ts_ms, origin_id, moderation, file FROM messages
                 WHERE origin = ?1 AND origin_seq > ?2 ORDER BY origin_seq LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![origin, clamp(after), clamp(limit as u64)], |r| {
                Ok(LogMessage {
                    origin: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    room: r.get(2)?,
                    from: r.get(3)?,
                    text: r.get(4)?,
                    kind: MessageKind::from_db(&r.get::<_, String>(5)?),
                    ts: r.get(6)?,
                    origin_id: r.get::<_, Option<i64>>(7)?.unwrap_or(0).max(0) as u64,
                    moderation: r.get(8)?,
                    file: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The highest sequence stored for `origin` (0 if none).
    pub fn last_seq(&self, origin: &str) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT MAX(origin_seq) FROM messages WHERE origin = ?1",
                [origin],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|n| n.unwrap_or(0).max(0) as u64)
            .map_err(|e| self.err(e))
    }

    /// SQLite's `data_version` on this connection: it changes when any other
    /// connection or process committed since this one last looked, so an
    /// unchanged value means nothing stored changed.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// The newest `limit` messages of `room` with `after < id <= upto`, oldest first.
    pub fn latest(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.range(room, after, upto, limit, true)
    }

    /// The oldest `limit` messages of `room` with `after < id <= upto`, oldest first.
    pub fn earliest(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.range(room, after, upto, limit, false)
    }

    /// `limit` messages of `room` with `after < id <= upto` from the newest or
    /// the oldest end, returned oldest first.
    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let order = if newest { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT {MSG_COLUMNS} FROM messages
             WHERE room = ?1 AND id > ?2 AND id <= ?3 ORDER BY id {order} LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let mut out = self.collect(&mut stmt, room, after, upto, limit)?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    fn collect(
        &self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![room, after, upto, limit], |r| row_message(room, r))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Resume by origin vector: the messages of `room` with `id <= upto`
    /// that a client who has seen, for each origin `o`, every message of `o`
    /// up to origin id `seen[o]` has not seen (the newest `limit`, oldest
    /// first, in this store's order). Rows without an origin (clustering
    /// off, or older than the columns) are never included. Cost: one index
    /// seek per origin present in the room and per entry of `seen`, and at
    /// most `limit + 1` rows read per origin.
    pub fn since(
        &self,
        room: &str,
        seen: &std::collections::BTreeMap<String, u64>,
        upto: u64,
        limit: usize,
    ) -> Result<SinceResume, StoreError> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let upto = clamp(upto);
        let origins: Vec<String> = {
            // A skip-scan over the (room, origin, origin_id) index.
            let mut stmt = self
                .conn
                .prepare_cached(
                    "WITH RECURSIVE o(origin) AS (
                         SELECT MIN(origin) FROM messages WHERE room = ?1 AND origin IS NOT NULL
                         UNION ALL
                         SELECT (SELECT MIN(origin) FROM messages WHERE room = ?1 AND origin > o.origin)
                         FROM o WHERE o.origin IS NOT NULL)
                     SELECT origin FROM o WHERE origin IS NOT NULL",
                )
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([room], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let mut out = SinceResume::default();
        {
            let sql = format!(
                "SELECT {MSG_COLUMNS} FROM messages
                 WHERE room = ?1 AND origin = ?2 AND origin_id > ?3 AND id <= ?4
                 ORDER BY origin_id DESC LIMIT ?5"
            );
            let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
            let per_origin = clamp(limit.saturating_add(1) as u64);
            for origin in &origins {
                let after = clamp(seen.get(origin).copied().unwrap_or(0));
                let rows = stmt
                    .query_map(params![room, origin, after, upto, per_origin], |r| {
                        row_message(room, r)
                    })
                    .map_err(|e| self.err(e))?;
                for m in rows {
                    out.messages.push(m.map_err(|e| self.err(e))?);
                }
            }
        }
        out.messages.sort_by_key(|m| m.id);
        if out.messages.len() > limit {
            out.truncated = true;
            out.messages.drain(..out.messages.len() - limit);
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                // Newest first along the index: origin ids and ids grow together
                // for one origin, so this stops at once.
                "SELECT origin_id FROM messages WHERE room = ?1 AND origin = ?2 AND id <= ?3
                 ORDER BY origin_id DESC LIMIT 1",
            )
            .map_err(|e| self.err(e))?;
        for (origin, &n) in seen {
            if n == 0 {
                continue;
            }
            let have: Option<i64> = if origins.binary_search(origin).is_ok() {
                stmt.query_row(params![room, origin, upto], |r| r.get::<_, Option<i64>>(0))
                    .optional()
                    .map_err(|e| self.err(e))?
                    .flatten()
            } else {
                None
            };
            if have.unwrap_or(0) < clamp(n) {
                out.behind.push((origin.clone(), n));
            }
        }
        Ok(out)
    }

    /// Number of messages stored in `room`.
    pub fn count(&self, room: &str) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE room = ?1",
                [room],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0) as u64)
            .map_err(|e| self.err(e))
    }
}

/// One row of [`MSG_COLUMNS`] as a message of `room`.
fn row_message(room: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<ChatMessage> {
    let origin: Option<String> = r.get(5)?;
    let origin = origin.map(String::into_boxed_str);
    let origin_id: Option<i64> = r.get(6)?;
    let (origin, origin_id) = match (origin, origin_id) {
        (Some(o), Some(n)) if n > 0 => (Some(o), n as u64),
        _ => (None, 0),
    };
    Ok(ChatMessage {
        room: room.to_string(),
        id: r.get::<_, i64>(0)? as u64,
        from: r.get(1)?,
        text: r.get(2)?,
        ts: r.get(3)?,
        kind: MessageKind::from_db(&r.get::<_, String>(4)?),
        origin,
        origin_id,
        // A row whose JSON does not parse (never written so) reads as plain text.
        file: r
            .get::<_, Option<String>>(7)?
            .and_then(|j| serde_json::from_str(&j).ok())
            .map(Box::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(room: &'a str, id: u64, text: &'a str) -> NewMessage<'a> {
        NewMessage {
            room,
            id,
            from: "ann",
            text,
            ts: id as i64,
            kind: MessageKind::Say,
            origin: None,
            file: None,
            moderation: None,
        }
    }

    #[test]
    fn a_topic_from_another_node_replaces_only_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let at = |ms, origin: &str| TopicStamp {
            ms,
            origin: origin.into(),
        };
        let set = |s: &mut Store, topic: &str, stamp: TopicStamp, newer_only| {
            let b = s.batch().unwrap();
            let stored = b
                .set_topic("r", topic, "ann", &stamp, newer_only, 1)
                .unwrap();
            b.commit().unwrap();
            stored
        };
        let topic = |s: &Store| {
            let r = s.rooms().unwrap().remove(0);
            (r.topic, r.topic_stamp)
        };
        assert!(
            set(&mut s, "first", at(100, "a/1"), true),
            "a new room takes it"
        );
        assert!(!set(&mut s, "older", at(99, "b/1"), true));
        assert!(!set(
            &mut s,
            "same time, lower origin",
            at(100, "a/0"),
            true
        ));
        assert_eq!(topic(&s), ("first".into(), at(100, "a/1")));
        assert!(set(
            &mut s,
            "same time, higher origin",
            at(100, "b/1"),
            true
        ));
        assert!(set(&mut s, "later", at(101, "a/1"), true));
        assert_eq!(topic(&s), ("later".into(), at(101, "a/1")));
        // A local setting (or the broker's order) is not compared.
        assert!(set(&mut s, "local", at(5, ""), false));
        drop(s);
        let s = Store::open_in(dir.path()).unwrap();
        assert_eq!(
            topic(&s),
            ("local".into(), at(5, "")),
            "kept across a reopen"
        );
    }

    #[test]
    fn batches_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let texts: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
        let batch: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| msg("r", i as u64 + 1, t))
            .collect();
        s.write_batch(&["r"], &batch, &[("r", "hello")], 0).unwrap();
        let ids = |v: Vec<ChatMessage>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(s.latest("r", 0, u64::MAX, 3).unwrap()), vec![8, 9, 10]);
        assert_eq!(ids(s.latest("r", 0, 5, 3).unwrap()), vec![3, 4, 5]);
        assert_eq!(ids(s.earliest("r", 6, u64::MAX, 2).unwrap()), vec![7, 8]);
        assert_eq!(
            s.rooms().unwrap(),
            vec![StoredRoom {
                name: "r".into(),
                topic: "hello".into(),
                topic_by: String::new(),
                topic_stamp: TopicStamp::default(),
                last_id: 10
            }]
        );
        // A failing batch (duplicate id) leaves nothing behind.
        let bad = [msg("r", 11, "x"), msg("r", 3, "dup")];
        assert!(s.write_batch(&[], &bad, &[], 0).is_err());
        assert_eq!(s.count("r").unwrap(), 10);
        drop(s);
        let s = Store::open_in(dir.path()).unwrap();
        assert_eq!(s.count("r").unwrap(), 10);
    }
}

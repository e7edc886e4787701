//! Writing to the history: one transaction per batch of the hub's writer
//! ([`Batch`]), in which a message from the cluster that is stored already
//! (same origin and sequence) is dropped.

use std::path::Path;

use rusqlite::params;

use super::{NewMessage, Store, StoreError};

impl Store {
    /// Writes a batch in one transaction: rooms to create, messages, topic changes.
    /// Either all of it is committed or none.
    pub fn write_batch(
        &mut self,
        new_rooms: &[&str],
        messages: &[NewMessage<'_>],
        topics: &[(&str, &str)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let batch = self.batch()?;
        for room in new_rooms {
            batch.create_room(room, now_ms)?;
        }
        for m in messages {
            batch.insert(m)?;
        }
        let stamp = super::TopicStamp {
            ms: now_ms,
            origin: String::new(),
        };
        for (room, topic) in topics {
            batch.set_topic(room, topic, "", &stamp, false, now_ms)?;
        }
        batch.commit()
    }

    /// Starts a write transaction; nothing of it is stored before
    /// [`Batch::commit`] (dropping it rolls back).
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction()
            .map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
        Ok(Batch { tx, path })
    }
}

/// One write transaction of the hub's writer ([`Store::batch`]).
pub struct Batch<'c> {
    pub(super) tx: rusqlite::Transaction<'c>,
    path: &'c Path,
}

impl Batch<'_> {
    pub(super) fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// Creates `room` (with no topic) unless it exists.
    pub fn create_room(&self, room: &str, now_ms: i64) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO rooms (name, topic, created_ms) VALUES (?1, '', ?2)",
            )
            .and_then(|mut stmt| stmt.execute(params![room, now_ms]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Stores a message; false if a message with its `(origin, seq)` is
    /// stored already (a duplicate from the cluster: it dies here, in SQL).
    /// Any other conflict (a room id used twice) is an error.
    pub fn insert(&self, m: &NewMessage<'_>) -> Result<bool, StoreError> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let origin = m.origin.as_ref();
        self.tx
            .prepare_cached(
                "INSERT INTO messages (room, id, nick, text, ts_ms, kind, origin, origin_id, origin_seq, file, moderation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (origin, origin_seq) WHERE origin_seq IS NOT NULL DO NOTHING",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    m.room,
                    clamp(m.id),
                    m.from,
                    m.text,
                    m.ts,
                    m.kind.as_str(),
                    origin.map(|o| o.name),
                    origin.filter(|o| o.id > 0).map(|o| clamp(o.id)),
                    origin.map(|o| clamp(o.seq)),
                    m.file
                        .map(|f| serde_json::to_string(f).expect("a file always serializes")),
                    m.moderation,
                ])
            })
            .map(|changed| changed == 1)
            .map_err(|e| self.err(e))
    }

    /// Sets `room`'s topic (creating the room if needed), set by `by` at
    /// `stamp`. With `newer_only` (a topic from another node of a gossip
    /// cluster) it replaces only a topic with an older stamp; returns whether
    /// it was stored.
    pub fn set_topic(
        &self,
        room: &str,
        topic: &str,
        by: &str,
        stamp: &super::TopicStamp,
        newer_only: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO rooms (name, topic, created_ms, topic_by, topic_ms, topic_origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET topic = excluded.topic,
                     topic_by = excluded.topic_by, topic_ms = excluded.topic_ms,
                     topic_origin = excluded.topic_origin
                 WHERE NOT ?7 OR (excluded.topic_ms, excluded.topic_origin) > (topic_ms, topic_origin)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    room,
                    topic,
                    now_ms,
                    by,
                    stamp.ms,
                    stamp.origin,
                    newer_only
                ])
            })
            .map(|changed| changed == 1)
            .map_err(|e| self.err(e))
    }

    /// Commits everything written in this batch.
    pub fn commit(self) -> Result<(), StoreError> {
        let path = self.path.to_path_buf();
        self.tx
            .commit()
            .map_err(|source| StoreError::Sqlite { path, source })?;
        super::messages_committed();
        Ok(())
    }
}

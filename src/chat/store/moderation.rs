//! Room moderation in SQLite: operators and voiced accounts, mutes, bans,
//! invited accounts and modes per room. The hub's writer writes them in its batches
//! ([`Batch`]); the hub reads them all once at start ([`Store::room_rules`]).

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::{Batch, Store, StoreError};

/// Creates the moderation tables if they are missing.
pub(super) fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS room_roles (
             room TEXT NOT NULL,
             key TEXT NOT NULL,
             role TEXT NOT NULL,
             PRIMARY KEY (room, key, role)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS room_mutes (
             room TEXT NOT NULL,
             key TEXT NOT NULL,
             until_ms INTEGER,
             PRIMARY KEY (room, key)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS room_bans (
             room TEXT NOT NULL,
             key TEXT NOT NULL,
             addr TEXT,
             until_ms INTEGER,
             reason TEXT NOT NULL DEFAULT '',
             by TEXT NOT NULL DEFAULT '',
             PRIMARY KEY (room, key)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS room_invites (
             room TEXT NOT NULL,
             key TEXT NOT NULL,
             PRIMARY KEY (room, key)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS room_rule_clock (
             room TEXT NOT NULL,
             rule TEXT NOT NULL,
             ts_ms INTEGER NOT NULL,
             origin TEXT NOT NULL,
             PRIMARY KEY (room, rule)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS room_modes (
             room TEXT PRIMARY KEY,
             moderated INTEGER NOT NULL DEFAULT 0,
             invite_only INTEGER NOT NULL DEFAULT 0
         );",
    )
}

/// A role an account holds in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Operator: may moderate the room.
    Op,
    /// Voiced: may speak when the room is moderated.
    Voice,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Op => "op",
            Role::Voice => "voice",
        }
    }
}

/// A ban as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBan {
    /// The banned account's or nick's name key.
    pub key: String,
    /// The banned address, if the ban covers it.
    pub addr: Option<String>,
    /// When it ends (ms since the epoch); `None`: until lifted.
    pub until_ms: Option<i64>,
    /// Why.
    pub reason: String,
    /// Who banned.
    pub by: String,
}

/// A room's stored moderation state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRules {
    /// Operator accounts (name keys).
    pub ops: Vec<String>,
    /// Voiced accounts (name keys).
    pub voices: Vec<String>,
    /// Muted accounts or nicks (name keys) and until when.
    pub mutes: Vec<(String, Option<i64>)>,
    /// Bans.
    pub bans: Vec<StoredBan>,
    /// Accounts (name keys) invited to the room (`+i`).
    pub invites: Vec<String>,
    /// `+m`.
    pub moderated: bool,
    /// `+i`.
    pub invite_only: bool,
}

impl Store {
    /// Every room's moderation state, by room name.
    pub fn room_rules(&self) -> Result<HashMap<String, StoredRules>, StoreError> {
        let mut out: HashMap<String, StoredRules> = HashMap::new();
        let conn = &self.conn;
        let e = |e| self.err(e);
        let mut stmt = conn
            .prepare("SELECT room, key, role FROM room_roles")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (room, key, role) = row.map_err(e)?;
            let rules = out.entry(room).or_default();
            match role.as_str() {
                "op" => rules.ops.push(key),
                _ => rules.voices.push(key),
            }
        }
        let mut stmt = conn
            .prepare("SELECT room, key, until_ms FROM room_mutes")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))
            .map_err(e)?;
        for row in rows {
            let (room, key, until) = row.map_err(e)?;
            out.entry(room).or_default().mutes.push((key, until));
        }
        let mut stmt = conn
            .prepare("SELECT room, key, addr, until_ms, reason, by FROM room_bans")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    StoredBan {
                        key: r.get(1)?,
                        addr: r.get(2)?,
                        until_ms: r.get(3)?,
                        reason: r.get(4)?,
                        by: r.get(5)?,
                    },
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (room, ban) = row.map_err(e)?;
            out.entry(room).or_default().bans.push(ban);
        }
        let mut stmt = conn
            .prepare("SELECT room, key FROM room_invites")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))
            .map_err(e)?;
        for row in rows {
            let (room, key) = row.map_err(e)?;
            out.entry(room).or_default().invites.push(key);
        }
        let mut stmt = conn
            .prepare("SELECT room, moderated, invite_only FROM room_modes")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (room, moderated, invite_only) = row.map_err(e)?;
            let rules = out.entry(room).or_default();
            rules.moderated = moderated;
            rules.invite_only = invite_only;
        }
        Ok(out)
    }
}

impl Batch<'_> {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(params))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Gives (`on`) or takes an account's role in a room.
    pub fn set_role(&self, room: &str, key: &str, role: Role, on: bool) -> Result<(), StoreError> {
        if on {
            self.exec(
                "INSERT OR IGNORE INTO room_roles (room, key, role) VALUES (?1, ?2, ?3)",
                params![room, key, role.as_str()],
            )
        } else {
            self.exec(
                "DELETE FROM room_roles WHERE room = ?1 AND key = ?2 AND role = ?3",
                params![room, key, role.as_str()],
            )
        }
    }

    /// Mutes (`Some(until)`, where `until` may be open) or unmutes (`None`) a key in a room.
    pub fn set_mute(
        &self,
        room: &str,
        key: &str,
        mute: Option<Option<i64>>,
    ) -> Result<(), StoreError> {
        match mute {
            Some(until) => self.exec(
                "INSERT INTO room_mutes (room, key, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room, key) DO UPDATE SET until_ms = excluded.until_ms",
                params![room, key, until],
            ),
            None => self.exec(
                "DELETE FROM room_mutes WHERE room = ?1 AND key = ?2",
                params![room, key],
            ),
        }
    }

    /// Stores a ban (replacing one of the same key).
    pub fn set_ban(&self, room: &str, ban: &StoredBan) -> Result<(), StoreError> {
        self.exec(
            "INSERT OR REPLACE INTO room_bans (room, key, addr, until_ms, reason, by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![room, ban.key, ban.addr, ban.until_ms, ban.reason, ban.by],
        )
    }

    /// Lifts the ban of `key` in `room`.
    pub fn remove_ban(&self, room: &str, key: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM room_bans WHERE room = ?1 AND key = ?2",
            params![room, key],
        )
    }

    /// Invites an account (name key) to a room.
    pub fn add_invite(&self, room: &str, key: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT OR IGNORE INTO room_invites (room, key) VALUES (?1, ?2)",
            params![room, key],
        )
    }

    /// Sets a room's modes.
    pub fn set_modes(
        &self,
        room: &str,
        moderated: bool,
        invite_only: bool,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO room_modes (room, moderated, invite_only) VALUES (?1, ?2, ?3)
             ON CONFLICT (room) DO UPDATE SET moderated = excluded.moderated,
                                              invite_only = excluded.invite_only",
            params![room, moderated, invite_only],
        )
    }

    /// Takes every operator account of a room away (a closed room).
    pub fn clear_ops(&self, room: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM room_roles WHERE room = ?1 AND role = 'op'",
            params![room],
        )
    }

    /// Takes back every invitation to a room (a closed room).
    pub fn clear_invites(&self, room: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM room_invites WHERE room = ?1", params![room])
    }

    /// Last writer wins: records that `rule` of `room` (e.g. `ban:KEY`) was
    /// last changed at `(ts_ms, origin)` and returns true, unless a change
    /// stored before is later (or the same), then returns false.
    pub fn newer_rule(
        &self,
        room: &str,
        rule: &str,
        ts_ms: i64,
        origin: &str,
    ) -> Result<bool, StoreError> {
        let changed = self
            .tx
            .prepare_cached(
                "INSERT INTO room_rule_clock (room, rule, ts_ms, origin) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (room, rule) DO UPDATE SET ts_ms = excluded.ts_ms,
                                                       origin = excluded.origin
                 WHERE (excluded.ts_ms, excluded.origin) > (room_rule_clock.ts_ms, room_rule_clock.origin)",
            )
            .and_then(|mut stmt| stmt.execute(params![room, rule, ts_ms, origin]))
            .map_err(|e| self.err(e))?;
        Ok(changed == 1)
    }
}

//! Reading the stored history through the hub's reader connection: pages of
//! a room ([`Hub::history`]), and the version of the stored messages, so that
//! a cache of pages can tell when one is stale ([`Hub::history_versioned`],
//! [`Hub::history_version_now`]).

use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::{Hub, Store};
use crate::chat::protocol::ChatMessage;
use crate::chat::store::{StoreError, message_commits};

impl Hub {
    /// Stored messages of `room`, oldest first. With `after` alone it pages
    /// forward (the oldest `limit` after it); otherwise it returns the newest
    /// `limit` below `before` (exclusive) and above `after`. Blocking: call it
    /// from `spawn_blocking`.
    pub fn history(
        &self,
        room: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        page(&self.shared.reader(), room, after, before, limit)
    }

    /// [`Hub::history`] and the version of the stored messages read just
    /// before it: the page holds everything committed up to that version (and
    /// perhaps more), so a page kept with it is current while
    /// [`Hub::history_version_now`] returns the same. Blocking: call it from
    /// `spawn_blocking`.
    pub fn history_versioned(
        &self,
        room: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(HistoryVersion, Vec<ChatMessage>), StoreError> {
        let commits = message_commits();
        let data = self.probe().ask()?;
        let version = HistoryVersion { commits, data };
        Ok((version, self.history(room, after, before, limit)?))
    }

    /// The version of the stored messages now. This process's own commits
    /// count at once (an atomic load); SQLite's `data_version`, which also
    /// sees other processes, is asked at most once per [`RECHECK`]. Cheap
    /// enough for async code: no query of the data, and its own connection,
    /// which no page holds.
    pub fn history_version_now(&self) -> Result<HistoryVersion, StoreError> {
        let commits = message_commits();
        let mut probe = self.probe();
        let data = match probe.last {
            Some((at, d)) if at.elapsed() < RECHECK => d,
            _ => probe.ask()?,
        };
        Ok(HistoryVersion { commits, data })
    }

    fn probe(&self) -> MutexGuard<'_, VersionProbe> {
        self.shared
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// How stale a kept page may be after another process (not this one)
/// committed: the longest [`Hub::history_version_now`] goes without asking SQLite.
pub const RECHECK: Duration = Duration::from_millis(1);

/// What a kept page of history is checked against: this process's commits
/// of messages and SQLite's `data_version` (see [`Hub::history_version_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryVersion {
    commits: u64,
    data: i64,
}

/// A connection only for `PRAGMA data_version`, and its last answer.
pub(super) struct VersionProbe {
    store: Store,
    last: Option<(Instant, i64)>,
}

impl VersionProbe {
    pub(super) fn new(store: Store) -> Self {
        VersionProbe { store, last: None }
    }

    fn ask(&mut self) -> Result<i64, StoreError> {
        let d = self.store.data_version()?;
        self.last = Some((Instant::now(), d));
        Ok(d)
    }
}

fn page(
    store: &Store,
    room: &str,
    after: Option<u64>,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<ChatMessage>, StoreError> {
    let upto = before.map(|b| b.saturating_sub(1)).unwrap_or(u64::MAX);
    match (after, before) {
        (Some(a), None) => store.earliest(room, a, upto, limit),
        (a, _) => store.latest(room, a.unwrap_or(0), upto, limit),
    }
}

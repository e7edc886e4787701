//! Reading the stored history through the hub's reader connection: pages of
//! a room ([`Hub::history`]), and the store's data version, so that a cache
//! of pages can tell when one is stale ([`Hub::history_versioned`],
//! [`Hub::data_version_now`]).

use std::sync::MutexGuard;

use super::{Hub, Store};
use crate::chat::protocol::ChatMessage;
use crate::chat::store::StoreError;

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

    /// [`Hub::history`] and the store's data version read just before it:
    /// the page holds everything committed up to that version (and perhaps
    /// more), so a page kept with it is current while the version is the same.
    /// Blocking: call it from `spawn_blocking`.
    pub fn history_versioned(
        &self,
        room: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(i64, Vec<ChatMessage>), StoreError> {
        // Read first, on the connection that [`Hub::data_version_now`] asks.
        let version = self.versions().data_version()?;
        Ok((version, self.history(room, after, before, limit)?))
    }

    /// The store's data version now ([`Store::data_version`]), as
    /// [`Hub::history_versioned`] reads it. Cheap (no query of the data, on a
    /// connection of its own that no page holds), so it is asked from async code.
    pub fn data_version_now(&self) -> Result<i64, StoreError> {
        self.versions().data_version()
    }

    fn versions(&self) -> MutexGuard<'_, Store> {
        self.shared
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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

//! The newest page of each room's history as the JSON API last served it,
//! kept with the store's data version it was read at: while SQLite reports
//! the same version (nothing committed since, by any connection or process),
//! `GET /api/rooms/{room}/messages` answers from here, without a blocking
//! thread or a query. Bounded in bytes; past the bound it starts over.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::chat::hub::HistoryVersion;

/// Most bytes of JSON kept for all rooms together.
const MAX_BYTES: usize = 32 << 20;

/// The cached newest pages, by room, each with the version (`V`) it was read at.
#[derive(Debug)]
pub struct PageCache<V = HistoryVersion> {
    inner: Mutex<Inner<V>>,
}

impl<V> Default for PageCache<V> {
    fn default() -> Self {
        PageCache {
            inner: Mutex::new(Inner {
                rooms: HashMap::new(),
                bytes: 0,
            }),
        }
    }
}

#[derive(Debug)]
struct Inner<V> {
    rooms: HashMap<String, Page<V>>,
    bytes: usize,
}

#[derive(Debug)]
struct Page<V> {
    limit: usize,
    version: V,
    body: Bytes,
}

impl<V: PartialEq> PageCache<V> {
    /// The body of `room`'s newest `limit` messages if it was read at `version`.
    pub fn get(&self, room: &str, limit: usize, version: V) -> Option<Bytes> {
        let inner = self.lock();
        let p = inner.rooms.get(room)?;
        (p.limit == limit && p.version == version).then(|| p.body.clone())
    }

    /// Keeps `body`, `room`'s newest `limit` messages read at `version`.
    pub fn put(&self, room: &str, limit: usize, version: V, body: Bytes) {
        let mut inner = self.lock();
        if body.len() > MAX_BYTES / 4 {
            return;
        }
        if let Some(old) = inner.rooms.remove(room) {
            inner.bytes -= old.body.len();
        }
        if inner.bytes + body.len() > MAX_BYTES {
            inner.rooms.clear();
            inner.bytes = 0;
        }
        inner.bytes += body.len();
        inner.rooms.insert(
            room.to_string(),
            Page {
                limit,
                version,
                body,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_served_only_at_its_version_and_limit() {
        let c = PageCache::<u32>::default();
        assert!(c.get("r", 50, 1).is_none());
        c.put("r", 50, 1, Bytes::from_static(b"one"));
        assert_eq!(c.get("r", 50, 1).unwrap(), "one");
        assert!(c.get("r", 50, 2).is_none(), "another version");
        assert!(c.get("r", 20, 1).is_none(), "another limit");
        assert!(c.get("s", 50, 1).is_none(), "another room");
        c.put("r", 50, 2, Bytes::from_static(b"two"));
        assert_eq!(c.get("r", 50, 2).unwrap(), "two");
        assert_eq!(c.lock().bytes, 3);
    }

    #[test]
    fn the_bytes_stay_bounded() {
        let c = PageCache::<u32>::default();
        let big = Bytes::from(vec![b'x'; MAX_BYTES / 4]);
        for i in 0..10 {
            c.put(&format!("room{i}"), 50, 1, big.clone());
            assert!(c.lock().bytes <= MAX_BYTES);
        }
        c.put("huge", 50, 1, Bytes::from(vec![b'x'; MAX_BYTES / 4 + 1]));
        assert!(c.get("huge", 50, 1).is_none(), "too big to keep");
    }
}

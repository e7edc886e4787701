//! The hubs as the engine shows them (broker mode): every hub heard on the
//! presence subjects, with when it was last heard, its doors and its users;
//! what `/api/cluster` and `netkit members` report instead of gossip members.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::cluster::NodeMeta;

/// One other hub, as its last presence beat described it.
#[derive(Debug, Clone)]
pub struct SeenHub {
    /// When its last beat arrived here.
    pub heard: Instant,
    /// Where its HTTP server and line chat listen, as it says.
    pub meta: NodeMeta,
    /// Nicknames connected to it, sorted.
    pub users: Vec<String>,
}

/// This hub's name and the other live hubs, shared between the presence
/// task (which fills it) and the HTTP server (which reports it).
#[derive(Debug, Clone)]
pub struct HubsView {
    me: String,
    others: Arc<Mutex<BTreeMap<String, SeenHub>>>,
}

impl HubsView {
    /// An empty view for the hub named `me`.
    pub fn new(me: impl Into<String>) -> HubsView {
        HubsView {
            me: me.into(),
            others: Arc::default(),
        }
    }

    /// This hub's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SeenHub>> {
        self.others.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hub `node` was heard now, with these doors and users.
    pub fn heard(&self, node: &str, meta: NodeMeta, users: Vec<String>) {
        let seen = SeenHub {
            heard: Instant::now(),
            meta,
            users,
        };
        self.lock().insert(node.to_string(), seen);
    }

    /// Hub `node` was heard now, saying nothing new; false if it is not
    /// shown (then [`HubsView::heard`] must say what it is).
    pub fn touch(&self, node: &str) -> bool {
        match self.lock().get_mut(node) {
            Some(seen) => {
                seen.heard = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Hub `node` is taken as down: it is no longer shown.
    pub fn gone(&self, node: &str) {
        self.lock().remove(node);
    }

    /// Every other live hub by name, sorted.
    pub fn others(&self) -> Vec<(String, SeenHub)> {
        self.lock()
            .iter()
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect()
    }
}

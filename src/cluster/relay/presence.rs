//! Presence across nodes, sans-IO: who is connected to which node and in
//! which rooms, so that member lists and join/leave/nick events span the
//! cluster.
//!
//! The design is state-based. Each node sends its whole presence as a
//! [`Snapshot`] (every connected user with a per-connection id, its nick and
//! its rooms) with a version that grows with every change; a receiver keeps,
//! per sending node, the newest snapshot it has seen and replaces it whole.
//! Events are the differences between the held snapshot and the new one, so
//! a lost or reordered datagram cannot duplicate or reorder them: an older
//! snapshot is ignored, a resent one changes nothing, and the next one
//! repairs whatever was lost. Snapshots are ordered by the sender's
//! membership generation (its `NodeId::bump`, which grows across restarts and
//! renewals) and then by version.
//!
//! When membership declares a node down (or it leaves), [`PresenceTable::remove_node`]
//! drops its users and yields their leaves; the generation is remembered, so
//! a snapshot of that life arriving late is refused. A node that comes back
//! does so with a higher generation, and its next snapshot is taken as new.
//!
//! The one table is shared ([`SharedPresence`]): the relay's presence link
//! writes it, and `GET /api/cluster` reads each node's users from it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::chat::hub::{LocalUser, RemotePresence};
use crate::chat::protocol::{RemoteMember, valid_nick, valid_room};

/// Most users a snapshot may list.
pub const MAX_USERS: usize = 50_000;
/// Most rooms one user of a snapshot may be in.
pub const MAX_ROOMS_PER_USER: usize = 256;

/// One node's whole presence, as sent to the other nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Grows with every change of the sender's presence (within one generation).
    pub version: u64,
    /// Every user connected to the sender.
    pub users: Vec<SnapshotUser>,
}

/// One user in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUser {
    /// Per-connection id on the sender (tells a rename from a leave and a join).
    pub id: u64,
    /// Nickname.
    pub nick: String,
    /// Rooms the user is in.
    pub rooms: Vec<String>,
}

impl Snapshot {
    /// The snapshot of a hub's local users at `version`.
    pub fn of(version: u64, users: Vec<LocalUser>) -> Snapshot {
        Snapshot {
            version,
            users: users
                .into_iter()
                .map(|u| SnapshotUser {
                    id: u.id,
                    nick: u.nick,
                    rooms: u.rooms,
                })
                .collect(),
        }
    }

    /// The same presence (versions aside).
    pub fn same_users(&self, other: &Snapshot) -> bool {
        self.users == other.users
    }

    /// Checks what an untrusted snapshot claims: bounded sizes, valid
    /// nicks and room names, no id or nick twice.
    pub fn validate(&self) -> Result<(), Rejected> {
        self.validate_against(None)
    }

    /// [`Snapshot::validate`], taking as valid the nicks and rooms `held`
    /// already holds for the same user id (checked when they came: names
    /// are Unicode work, and a snapshot repeats hundreds of them every
    /// second).
    fn validate_against(&self, held: Option<&HeldUsers>) -> Result<(), Rejected> {
        if self.users.len() > MAX_USERS {
            return Err(Rejected::TooLarge(self.users.len()));
        }
        let mut ids = HashSet::with_capacity(self.users.len());
        let mut nicks = HashSet::with_capacity(self.users.len());
        for u in &self.users {
            let before = held.and_then(|h| h.get(&u.id));
            if before.is_none_or(|(nick, _)| *nick != u.nick) && !valid_nick(&u.nick) {
                return Err(Rejected::Invalid("a nickname is not valid"));
            }
            if u.rooms.len() > MAX_ROOMS_PER_USER {
                return Err(Rejected::TooLarge(u.rooms.len()));
            }
            let known = |r: &String| before.is_some_and(|(_, rooms)| rooms.contains(r));
            if !u.rooms.iter().all(|r| known(r) || valid_room(r)) {
                return Err(Rejected::Invalid("a room name is not valid"));
            }
            if !ids.insert(u.id) || !nicks.insert(u.nick.to_ascii_lowercase()) {
                return Err(Rejected::Invalid("a user id or nickname appears twice"));
            }
        }
        Ok(())
    }
}

/// Why a snapshot was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not newer than the one held (or from a life already declared over).
    #[error("stale presence snapshot")]
    Stale,
    /// More users, or rooms per user, than allowed.
    #[error("presence snapshot too large ({0} entries)")]
    TooLarge(usize),
    /// Malformed content.
    #[error("invalid presence snapshot: {0}")]
    Invalid(&'static str),
}

/// One node's users by per-connection id: nick and rooms.
type HeldUsers = BTreeMap<u64, (String, BTreeSet<String>)>;

/// The presence held for one node.
#[derive(Debug, Clone)]
struct Held {
    name: String,
    generation: u32,
    version: u64,
    users: HeldUsers,
}

/// What one node knows of the others' presence, by peer key `P` (the gossip
/// address in `netkit serve`).
#[derive(Debug, Clone)]
pub struct PresenceTable<P> {
    nodes: BTreeMap<P, Held>,
    /// Generation of each node whose presence was removed (down or left).
    ended: BTreeMap<P, u32>,
    /// Nicknames sent by nodes that predate snapshots (`RelayPacket::Users`).
    legacy: BTreeMap<P, Vec<String>>,
}

impl<P> Default for PresenceTable<P> {
    fn default() -> Self {
        PresenceTable {
            nodes: BTreeMap::new(),
            ended: BTreeMap::new(),
            legacy: BTreeMap::new(),
        }
    }
}

/// The presence table of `netkit serve`, shared by the relay (which writes
/// it) and the `/api/cluster` report (which reads it).
pub type SharedPresence = Arc<Mutex<PresenceTable<SocketAddr>>>;

/// Locks a shared table (a panic elsewhere while holding it leaves it usable).
pub fn lock(table: &SharedPresence) -> std::sync::MutexGuard<'_, PresenceTable<SocketAddr>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Ord + Clone> PresenceTable<P> {
    /// Applies a snapshot from node `from` named `name` in membership
    /// generation `generation`; returns the presence changes it brings, in
    /// order (leaves, renames, then joins, per user).
    pub fn apply(
        &mut self,
        from: P,
        name: &str,
        generation: u32,
        snap: Snapshot,
    ) -> Result<Vec<RemotePresence>, Rejected> {
        // What this life of the node already sent was checked when it came.
        let known = self
            .nodes
            .get(&from)
            .filter(|h| h.generation == generation && h.name == name);
        snap.validate_against(known.map(|h| &h.users))?;
        if self.ended.get(&from).is_some_and(|&g| generation <= g) {
            return Err(Rejected::Stale);
        }
        let mut out = Vec::new();
        self.legacy.remove(&from);
        let old = match self.nodes.remove(&from) {
            Some(h) if (h.generation, h.version) >= (generation, snap.version) => {
                self.nodes.insert(from, h);
                return Err(Rejected::Stale);
            }
            // An earlier life of the node (or another name at its address):
            // its users are gone, whatever their ids.
            Some(h) if h.generation != generation || h.name != name => {
                leave_all(&h, Some("node restarted"), &mut out);
                BTreeMap::new()
            }
            Some(h) => h.users,
            None => BTreeMap::new(),
        };
        let new: HeldUsers = snap
            .users
            .into_iter()
            .map(|u| (u.id, (u.nick, u.rooms.into_iter().collect())))
            .collect();
        let member = |nick: &str| RemoteMember {
            nick: nick.to_string(),
            node: name.to_string(),
        };
        for (id, (nick, rooms)) in &old {
            let (new_nick, new_rooms) = match new.get(id) {
                Some((n, r)) => (Some(n), r.clone()),
                None => (None, BTreeSet::new()),
            };
            for room in rooms.difference(&new_rooms) {
                out.push(RemotePresence::Leave {
                    room: room.clone(),
                    member: member(nick),
                    reason: None,
                });
            }
            if let Some(n) = new_nick
                && n != nick
            {
                out.push(RemotePresence::Nick {
                    node: name.to_string(),
                    old: nick.clone(),
                    new: n.clone(),
                });
            }
        }
        for (id, (nick, rooms)) in &new {
            let before = old.get(id).map(|(_, r)| r.clone()).unwrap_or_default();
            for room in rooms.difference(&before) {
                out.push(RemotePresence::Join {
                    room: room.clone(),
                    member: member(nick),
                });
            }
        }
        self.nodes.insert(
            from,
            Held {
                name: name.to_string(),
                generation,
                version: snap.version,
                users: new,
            },
        );
        Ok(out)
    }

    /// Drops the presence of node `from` (declared down, or left) and
    /// returns its users' leaves, each with `reason`. A snapshot of the same
    /// generation arriving later is refused.
    pub fn remove_node(&mut self, from: &P, reason: &str) -> Vec<RemotePresence> {
        let mut out = Vec::new();
        self.legacy.remove(from);
        if let Some(h) = self.nodes.remove(from) {
            leave_all(&h, Some(reason), &mut out);
            let g = self.ended.entry(from.clone()).or_insert(h.generation);
            *g = (*g).max(h.generation);
        }
        out
    }

    /// Marks generation `generation` of node `from` as over (down or left)
    /// and drops its presence if held; see [`PresenceTable::remove_node`].
    pub fn end_generation(
        &mut self,
        from: &P,
        generation: u32,
        reason: &str,
    ) -> Vec<RemotePresence> {
        self.legacy.remove(from);
        let held = self.nodes.get(from).map(|h| h.generation);
        let out = match held {
            Some(g) if g <= generation => self.remove_node(from, reason),
            _ => Vec::new(),
        };
        let g = self.ended.entry(from.clone()).or_insert(generation);
        *g = (*g).max(generation);
        out
    }

    /// The nodes whose presence is held, with their generations.
    pub fn held(&self) -> Vec<(P, u32)> {
        self.nodes
            .iter()
            .map(|(p, h)| (p.clone(), h.generation))
            .collect()
    }

    /// The `(generation, version)` held for node `from`.
    pub fn version_of(&self, from: &P) -> Option<(u32, u64)> {
        self.nodes.get(from).map(|h| (h.generation, h.version))
    }

    /// The peer key of the node named `name`, if its presence is held.
    pub fn peer_named(&self, name: &str) -> Option<P> {
        self.nodes
            .iter()
            .find(|(_, h)| h.name == name)
            .map(|(p, _)| p.clone())
    }

    /// Every user connected to another node, as far as this node knows.
    pub fn users(&self) -> Vec<RemoteMember> {
        let mut v: Vec<RemoteMember> = self
            .nodes
            .values()
            .flat_map(|h| {
                h.users.values().map(|(nick, _)| RemoteMember {
                    nick: nick.clone(),
                    node: h.name.clone(),
                })
            })
            .collect();
        v.sort();
        v
    }

    /// The nicknames connected to node `from`, sorted (for `/api/cluster`);
    /// for a node that predates snapshots, the list it sent.
    pub fn nicks_of(&self, from: &P) -> Option<Vec<String>> {
        let Some(h) = self.nodes.get(from) else {
            return self.legacy.get(from).cloned();
        };
        let mut v: Vec<String> = h.users.values().map(|(n, _)| n.clone()).collect();
        v.sort();
        Some(v)
    }

    /// Takes the nickname list of a node that predates snapshots
    /// (`RelayPacket::Users`); shown by [`PresenceTable::nicks_of`] only.
    pub fn set_legacy_nicks(&mut self, from: P, nicks: Vec<String>) {
        self.legacy.insert(from, nicks);
    }
}

fn leave_all(h: &Held, reason: Option<&str>, out: &mut Vec<RemotePresence>) {
    for (nick, rooms) in h.users.values() {
        for room in rooms {
            out.push(RemotePresence::Leave {
                room: room.clone(),
                member: RemoteMember {
                    nick: nick.clone(),
                    node: h.name.clone(),
                },
                reason: reason.map(str::to_string),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64, nick: &str, rooms: &[&str]) -> SnapshotUser {
        SnapshotUser {
            id,
            nick: nick.into(),
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn snap(version: u64, users: Vec<SnapshotUser>) -> Snapshot {
        Snapshot { version, users }
    }

    fn m(nick: &str, node: &str) -> RemoteMember {
        RemoteMember {
            nick: nick.into(),
            node: node.into(),
        }
    }

    fn join(room: &str, nick: &str, node: &str) -> RemotePresence {
        RemotePresence::Join {
            room: room.into(),
            member: m(nick, node),
        }
    }

    fn leave(room: &str, nick: &str, node: &str, reason: Option<&str>) -> RemotePresence {
        RemotePresence::Leave {
            room: room.into(),
            member: m(nick, node),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn snapshots_replace_and_yield_the_differences() {
        let mut t = PresenceTable::default();
        let got = t
            .apply(1, "b", 10, snap(1, vec![user(1, "bob", &["lobby", "dev"])]))
            .unwrap();
        assert_eq!(
            got,
            vec![join("dev", "bob", "b"), join("lobby", "bob", "b")]
        );
        // The same snapshot again (a resend) changes nothing.
        assert_eq!(
            t.apply(1, "b", 10, snap(1, vec![user(1, "bob", &["lobby", "dev"])])),
            Err(Rejected::Stale)
        );
        // bob leaves dev, renames, and cat arrives.
        let got = t
            .apply(
                1,
                "b",
                10,
                snap(
                    2,
                    vec![user(1, "robert", &["lobby"]), user(2, "cat", &["lobby"])],
                ),
            )
            .unwrap();
        assert_eq!(
            got,
            vec![
                leave("dev", "bob", "b", None),
                RemotePresence::Nick {
                    node: "b".into(),
                    old: "bob".into(),
                    new: "robert".into()
                },
                join("lobby", "cat", "b"),
            ]
        );
        assert_eq!(t.users(), vec![m("cat", "b"), m("robert", "b")]);
        assert_eq!(t.nicks_of(&1), Some(vec!["cat".into(), "robert".into()]));
        assert_eq!(t.peer_named("b"), Some(1));
        // robert disconnects.
        let got = t
            .apply(1, "b", 10, snap(3, vec![user(2, "cat", &["lobby"])]))
            .unwrap();
        assert_eq!(got, vec![leave("lobby", "robert", "b", None)]);
    }

    #[test]
    fn older_versions_and_generations_are_ignored() {
        let mut t = PresenceTable::default();
        t.apply(1, "b", 10, snap(5, vec![user(1, "bob", &["lobby"])]))
            .unwrap();
        // A late datagram with an older version.
        assert_eq!(t.apply(1, "b", 10, snap(4, vec![])), Err(Rejected::Stale));
        // An older generation, even with a higher version.
        assert_eq!(t.apply(1, "b", 9, snap(99, vec![])), Err(Rejected::Stale));
        assert_eq!(t.version_of(&1), Some((10, 5)));
        assert_eq!(t.users(), vec![m("bob", "b")]);
        // Skipped versions are fine: the newest state wins.
        let got = t
            .apply(1, "b", 10, snap(9, vec![user(1, "bob", &["dev"])]))
            .unwrap();
        assert_eq!(
            got,
            vec![leave("lobby", "bob", "b", None), join("dev", "bob", "b")]
        );
    }

    #[test]
    fn node_down_removes_its_users_and_a_rejoin_restores_them() {
        let mut t = PresenceTable::default();
        t.apply(1, "b", 10, snap(1, vec![user(1, "bob", &["lobby"])]))
            .unwrap();
        t.apply(2, "c", 20, snap(1, vec![user(1, "cid", &["lobby", "dev"])]))
            .unwrap();
        let got = t.end_generation(&2, 20, "node down");
        assert_eq!(
            got,
            vec![
                leave("dev", "cid", "c", Some("node down")),
                leave("lobby", "cid", "c", Some("node down")),
            ]
        );
        assert_eq!(t.users(), vec![m("bob", "b")]);
        assert!(t.end_generation(&2, 20, "node down").is_empty());
        // A snapshot of the life declared over, arriving late, is refused.
        assert_eq!(
            t.apply(2, "c", 20, snap(2, vec![user(1, "cid", &["lobby"])])),
            Err(Rejected::Stale)
        );
        assert!(t.users().iter().all(|u| u.node != "c"));
        // c comes back with a new generation: its presence is learned again.
        let got = t
            .apply(2, "c", 21, snap(1, vec![user(1, "cid", &["lobby"])]))
            .unwrap();
        assert_eq!(got, vec![join("lobby", "cid", "c")]);
        assert_eq!(t.users(), vec![m("bob", "b"), m("cid", "c")]);
    }

    #[test]
    fn a_restart_not_seen_as_down_replaces_the_old_life() {
        let mut t = PresenceTable::default();
        t.apply(1, "b", 10, snap(7, vec![user(1, "bob", &["lobby"])]))
            .unwrap();
        // Same ids in the new life do not make bob a rename of ann.
        let got = t
            .apply(1, "b", 11, snap(1, vec![user(1, "ann", &["lobby"])]))
            .unwrap();
        assert_eq!(
            got,
            vec![
                leave("lobby", "bob", "b", Some("node restarted")),
                join("lobby", "ann", "b"),
            ]
        );
        // An event for an older generation does not drop the newer life.
        assert!(t.end_generation(&1, 10, "node down").is_empty());
        assert_eq!(t.users(), vec![m("ann", "b")]);
    }

    #[test]
    fn malformed_snapshots_are_rejected_and_change_nothing() {
        let mut t = PresenceTable::default();
        t.apply(1, "b", 10, snap(1, vec![user(1, "bob", &["lobby"])]))
            .unwrap();
        let bad = [
            snap(2, vec![user(1, "bad nick!", &["lobby"])]),
            // Held users are taken as checked; a new one beside them is not.
            snap(
                2,
                vec![user(1, "bob", &["lobby"]), user(2, "bad nick!", &[])],
            ),
            snap(
                2,
                vec![user(1, "bob", &["lobby"]), user(2, "amy", &["bad/room"])],
            ),
            snap(2, vec![user(1, "bob", &["no such/room"])]),
            snap(2, vec![user(1, "bob", &[]), user(1, "bib", &[])]),
            snap(2, vec![user(1, "bob", &[]), user(2, "BOB", &[])]),
            snap(2, vec![user(1, &"x".repeat(25), &[])]),
        ];
        for s in bad {
            assert!(
                matches!(t.apply(1, "b", 10, s.clone()), Err(Rejected::Invalid(_))),
                "{s:?}"
            );
        }
        let many_rooms: Vec<String> = (0..=MAX_ROOMS_PER_USER).map(|i| format!("r{i}")).collect();
        let s = Snapshot {
            version: 2,
            users: vec![SnapshotUser {
                id: 1,
                nick: "bob".into(),
                rooms: many_rooms,
            }],
        };
        assert!(matches!(t.apply(1, "b", 10, s), Err(Rejected::TooLarge(_))));
        let s = Snapshot {
            version: 2,
            users: (0..=MAX_USERS as u64)
                .map(|i| user(i, &format!("u{i}"), &[]))
                .collect(),
        };
        assert!(matches!(t.apply(1, "b", 10, s), Err(Rejected::TooLarge(_))));
        assert_eq!(t.version_of(&1), Some((10, 1)));
        assert_eq!(t.users(), vec![m("bob", "b")]);
    }
}

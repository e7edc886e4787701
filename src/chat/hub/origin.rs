//! Where a stored message came from, shared by the writer (which stores and
//! fans out) and the remote half (which applies other nodes' messages): the
//! [`REMOTE`] author, a message's origin, and who already saw it elsewhere.

use super::{ClientId, Room, Shared};

/// The author of messages applied from another node ([`Hub::apply_remote`]);
/// no client has this id (they count from 1).
pub(super) const REMOTE: ClientId = 0;

/// Where a message applied from another node comes from in the cluster log.
pub(super) struct RemoteOrigin {
    /// The origin (`node/TAG`).
    pub(super) name: String,
    /// Its sequence number there: with `name`, its key in the log.
    pub(super) seq: u64,
    /// Its room id there (0 if unknown).
    pub(super) id: u64,
    /// Stored with `id` as its room id here too (an external log's entry:
    /// the log's sequence is every hub's id) instead of the room's next id.
    pub(super) keep_id: bool,
}

/// The origin and origin id a message is shown with: for one applied from
/// another node, what the relay gave (none if its origin id is unknown); for
/// a local one, this node's origin (if clustering is on) and its room id.
pub(super) fn message_origin<'a>(
    shared: &'a Shared,
    client: ClientId,
    remote: &'a Option<RemoteOrigin>,
    id: u64,
) -> Option<(&'a str, u64)> {
    if client == REMOTE {
        remote
            .as_ref()
            .filter(|r| r.id > 0)
            .map(|r| (r.name.as_str(), r.id))
    } else {
        shared.origin.get().map(|o| (o.as_str(), id))
    }
}

/// The members of `r` a message from `origin` goes to: all but those who
/// already saw it on another node (see [`Room::floors`]). A floor is dropped
/// once this node reaches it.
pub(super) fn members_past_floors(r: &mut Room, origin: Option<(&str, u64)>) -> Vec<ClientId> {
    let Some((o, n)) = origin else {
        return r.members.iter().copied().collect();
    };
    let mut skip = Vec::new();
    r.floors.retain(|&client, floors| {
        if let Some(&floor) = floors.get(o) {
            if n <= floor {
                skip.push(client);
            }
            if n >= floor {
                floors.remove(o);
            }
        }
        !floors.is_empty()
    });
    r.members
        .iter()
        .copied()
        .filter(|c| !skip.contains(c))
        .collect()
}

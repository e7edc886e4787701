//! How relay packets leave this node: over the membership's socket, to the
//! live members, split into datagrams when they need more than one.

use std::net::SocketAddr;

use super::packet::RelayPacket;
use super::parts::split;
use crate::cluster::Membership;

/// The gossip addresses of the live members.
pub(super) fn live_peers(membership: &Membership) -> Vec<SocketAddr> {
    membership
        .view()
        .members
        .iter()
        .filter(|m| m.state.is_active())
        .map(|m| m.id.addr)
        .collect()
}

/// Sends `packet` to `to`, split into pieces if it needs more than one datagram.
pub(super) async fn send(membership: &Membership, to: SocketAddr, packet: &RelayPacket) {
    for data in split(packet, rand::random()) {
        if let Err(e) = membership.send(to, data).await {
            tracing::debug!("relay: send to {to}: {e}");
            return;
        }
    }
}

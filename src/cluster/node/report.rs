//! What the membership node reports: member states, views and events,
//! payloads, its output to drain, counters, and send errors.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::Timer;
use crate::cluster::id::{NodeId, NodeMeta};

/// A member's state as netkit reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answers probes.
    Alive,
    /// Missed a probe; has until the suspect timeout to refute.
    Suspect,
    /// Declared failed by the cluster.
    Down,
    /// Left on purpose (graceful shutdown).
    Left,
}

impl MemberState {
    /// Whether the member counts as part of the cluster (alive or suspect).
    pub fn is_active(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
        })
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its current identity.
    pub id: NodeId,
    /// Its state.
    pub state: MemberState,
    /// Its metadata, once received.
    pub meta: Option<NodeMeta>,
}

/// A change of one member's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    /// The member (its new identity when it rejoined).
    pub id: NodeId,
    /// The state it is in now.
    pub state: MemberState,
    /// The state before, `None` when the member is new to this node.
    pub previous: Option<MemberState>,
}

/// Opaque application data received from a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The sending member.
    pub from: NodeId,
    /// The bytes it sent.
    pub data: Vec<u8>,
}

/// What the node wants done after a call: drain it every time.
#[derive(Debug, Default)]
pub struct Output {
    /// Datagrams to send, already framed (and sealed).
    pub sends: Vec<(SocketAddr, Vec<u8>)>,
    /// Timers to arm: hand each back after its delay.
    pub timers: Vec<(Duration, Timer)>,
    /// Member state changes, in order.
    pub events: Vec<MemberEvent>,
    /// Application payloads received.
    pub payloads: Vec<Payload>,
}

/// Traffic counters of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Datagram bytes sent (framing and sealing included).
    pub tx_bytes: u64,
    /// Datagrams sent.
    pub tx_pkts: u64,
    /// Datagram bytes received.
    pub rx_bytes: u64,
    /// Datagrams received.
    pub rx_pkts: u64,
    /// Datagrams refused (no or wrong key, malformed).
    pub rejected: u64,
}

/// Member counts for the status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Members not down or left, this node included.
    pub members: usize,
    /// Alive members, this node included.
    pub alive: usize,
    /// Suspect members.
    pub suspect: usize,
}

/// Why an application payload could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No live member has that gossip address.
    #[error("no live member at {0}")]
    NoSuchMember(SocketAddr),
    /// The payload does not fit in one datagram.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes per datagram")]
    TooBig {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

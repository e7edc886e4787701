//! Who a cluster member is: the [`NodeId`] that foca gossips in every packet
//! (kept small on purpose), and the [`NodeMeta`] exchanged once per member.

use std::fmt;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Longest accepted node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Seconds from the Unix epoch to 2024-01-01, the origin of [`NodeId::bump`]
/// (keeps the number, a varint on the wire, at four bytes).
const BUMP_EPOCH: u64 = 1_704_067_200;

/// A member's identity: its name, gossip address and a generation number.
///
/// The gossip address is the unique key (foca's `Identity::Addr`). The
/// generation (`bump`) starts at the process start time in seconds, so a node
/// restarted with the same name and address wins over its previous, possibly
/// down, identity and rejoins; foca bumps it by one when the cluster declared
/// this node down by mistake.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// The node's name (`--node-name`).
    pub name: String,
    /// The address the node gossips on.
    pub addr: SocketAddr,
    /// Generation: higher wins when two identities share an address.
    pub bump: u32,
}

impl NodeId {
    /// A fresh identity for a node starting now.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::with_bump(name, addr, secs.saturating_sub(BUMP_EPOCH) as u32)
    }

    /// An identity with an explicit generation (tests and the simulator).
    pub fn with_bump(name: impl Into<String>, addr: SocketAddr, bump: u32) -> Self {
        Self {
            name: name.into(),
            addr,
            bump,
        }
    }

    /// The identity used to announce to a seed whose identity is not known
    /// yet: foca accepts an announce addressed to any identity at its address.
    pub fn seed(addr: SocketAddr) -> Self {
        Self::with_bump("", addr, 0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.bump)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.addr)
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            name: self.name.clone(),
            addr: self.addr,
            bump: self.bump.wrapping_add(1),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// Checks a node name: 1 to 64 bytes of visible ASCII or UTF-8, no spaces.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "node name '{name}' must be 1 to {MAX_NAME_LEN} bytes long; pass --node-name NAME"
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "node name '{name}' contains spaces or control characters; pass --node-name NAME"
        ));
    }
    Ok(())
}

/// What a member tells the others about itself besides its identity: where
/// its HTTP server and its TCP line chat listen (when they run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The bound HTTP address, if the node serves HTTP.
    pub http: Option<SocketAddr>,
    /// The bound TCP line-chat address, if the node serves chat.
    pub chat: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn renewed_and_restarted_identities_win() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let old = NodeId::with_bump("a", addr, 10);
        let renewed = old.renew().unwrap();
        assert!(renewed.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&renewed));
        assert_eq!(renewed.addr(), old.addr());
        let fresh = NodeId::new("a", addr);
        assert!(fresh.bump > 60_000_000, "bump counts seconds since 2024");
    }

    #[test]
    fn names() {
        assert!(validate_name("n1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn identity_is_small_on_the_wire() {
        let id = NodeId::new("n12", "127.0.0.1:17012".parse().unwrap());
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert!(bytes.len() <= 17, "{} bytes", bytes.len());
    }
}

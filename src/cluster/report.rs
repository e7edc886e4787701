//! The cluster as one node reports it: the JSON of `GET /api/cluster`, built
//! from the membership view, and read back by `netkit members`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::id::NodeMeta;
use super::membership::Membership;
use super::relay::presence::{self, SharedPresence};

/// What the HTTP server knows about the cluster: this node's name and
/// addresses, and the membership handle when clustering is on.
#[derive(Clone)]
pub struct ClusterInfo {
    /// This node's name (`--node-name`, else the host name when clustering is off).
    pub name: String,
    /// This node's HTTP and chat addresses.
    pub meta: NodeMeta,
    /// The running membership; `None` when clustering is off.
    pub membership: Option<Membership>,
    /// Users connected to other nodes, by gossip address: the relay's
    /// presence table, which the relay fills.
    pub remote_users: SharedPresence,
}

impl ClusterInfo {
    /// A node that is not part of a cluster.
    pub fn standalone(name: impl Into<String>, meta: NodeMeta) -> Self {
        ClusterInfo {
            name: name.into(),
            meta,
            membership: None,
            remote_users: SharedPresence::default(),
        }
    }

    /// The report with `users` (this node's connected nicknames) filled in for this node.
    pub fn report(&self, users: Vec<String>) -> ClusterReport {
        let mut me = MemberReport {
            name: self.name.clone(),
            is_self: true,
            state: "alive".into(),
            gossip: None,
            http: self.meta.http,
            chat: self.meta.chat,
            users: Some(users),
        };
        let Some(membership) = &self.membership else {
            return ClusterReport {
                clustering: false,
                node: self.name.clone(),
                members: vec![me],
            };
        };
        let view = membership.view();
        let remote = presence::lock(&self.remote_users);
        me.name = view.me.name.clone();
        me.gossip = Some(view.me.addr);
        let mut members = vec![me];
        members.extend(view.members.iter().map(|m| MemberReport {
            name: m.id.name.clone(),
            is_self: false,
            state: m.state.to_string(),
            gossip: Some(m.id.addr),
            http: m.meta.as_ref().and_then(|meta| meta.http),
            chat: m.meta.as_ref().and_then(|meta| meta.chat),
            users: if m.state.is_active() {
                remote.nicks_of(&m.id.addr)
            } else {
                None
            },
        }));
        ClusterReport {
            clustering: true,
            node: view.me.name,
            members,
        }
    }
}

/// The body of `GET /api/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    /// Whether this node runs gossip membership.
    pub clustering: bool,
    /// The answering node's name.
    pub node: String,
    /// This node first, then every member it knows (down and left ones included), by name.
    pub members: Vec<MemberReport>,
}

/// One member as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    /// Its node name.
    pub name: String,
    /// True for the answering node itself.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// `alive`, `suspect`, `down` or `left`.
    pub state: String,
    /// Its gossip (UDP) address; `None` when clustering is off.
    pub gossip: Option<SocketAddr>,
    /// Its HTTP address, from its metadata.
    pub http: Option<SocketAddr>,
    /// Its TCP line-chat address, from its metadata.
    pub chat: Option<SocketAddr>,
    /// Nicknames connected to it: always for the answering node; for a live
    /// member once the chat relay has heard its list (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

impl ClusterReport {
    /// The report as a text table, one member per line.
    pub fn table(&self) -> String {
        let cell = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let mut rows = vec![[
            "NAME".to_string(),
            "STATE".to_string(),
            "GOSSIP".to_string(),
            "HTTP".to_string(),
            "CHAT".to_string(),
            "USERS".to_string(),
        ]];
        for m in &self.members {
            let name = if m.is_self {
                format!("{} *", m.name)
            } else {
                m.name.clone()
            };
            let users = match &m.users {
                None => "?".to_string(),
                Some(u) if u.is_empty() => "-".to_string(),
                Some(u) => u.join(","),
            };
            rows.push([
                name,
                m.state.clone(),
                cell(m.gossip),
                cell(m.http),
                cell(m.chat),
                users,
            ]);
        }
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (i, (c, w)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if !self.clustering {
            out.push_str("(clustering is off on this node)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_report_and_table() {
        let meta = NodeMeta {
            http: Some("127.0.0.1:8080".parse().unwrap()),
            chat: None,
        };
        let info = ClusterInfo::standalone("solo", meta);
        let r = info.report(vec!["ann".into(), "bob".into()]);
        assert!(!r.clustering);
        assert_eq!(r.node, "solo");
        assert_eq!(r.members.len(), 1);
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(lines[1].starts_with("solo *"), "{t}");
        assert!(lines[1].contains("127.0.0.1:8080"), "{t}");
        assert!(lines[1].ends_with("ann,bob"), "{t}");
        assert!(t.contains("clustering is off"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["members"][0]["self"], true);
        assert_eq!(json["members"][0]["chat"], serde_json::Value::Null);
        let back: ClusterReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}

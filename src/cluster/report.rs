//! The cluster as one node reports it: the JSON of `GET /api/cluster`, built
//! from the membership view (or, in broker mode, the hubs the engine shows),
//! and read back by `netkit members`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::broker::hubs::HubsView;
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
    /// In broker mode, the hubs heard through the engine (then reported
    /// instead of gossip members, which broker mode does not run).
    pub broker: Option<HubsView>,
}

impl ClusterInfo {
    /// A node that is not part of a cluster.
    pub fn standalone(name: impl Into<String>, meta: NodeMeta) -> Self {
        ClusterInfo {
            name: name.into(),
            meta,
            membership: None,
            remote_users: SharedPresence::default(),
            broker: None,
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
            last_heard_ms: None,
        };
        if let Some(hubs) = &self.broker {
            return broker_report(me, hubs);
        }
        let Some(membership) = &self.membership else {
            return ClusterReport {
                clustering: false,
                broker: false,
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
            last_heard_ms: None,
        }));
        ClusterReport {
            clustering: true,
            broker: false,
            node: view.me.name,
            members,
        }
    }
}

/// The report in broker mode: this hub (under its name among hubs) first,
/// then every other hub heard within the expiry, as `alive`.
fn broker_report(mut me: MemberReport, hubs: &HubsView) -> ClusterReport {
    me.name = hubs.me().to_string();
    let mut members = vec![me];
    members.extend(hubs.others().into_iter().map(|(name, h)| MemberReport {
        name,
        is_self: false,
        state: "alive".into(),
        gossip: None,
        http: h.meta.http,
        chat: h.meta.chat,
        users: Some(h.users),
        last_heard_ms: Some(u64::try_from(h.heard.elapsed().as_millis()).unwrap_or(u64::MAX)),
    }));
    ClusterReport {
        clustering: true,
        broker: true,
        node: hubs.me().to_string(),
        members,
    }
}

/// The body of `GET /api/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    /// Whether this node is part of a cluster (gossip or broker mode).
    pub clustering: bool,
    /// Whether the members are hubs heard through the message broker
    /// (`--broker`) rather than gossip members.
    #[serde(default)]
    pub broker: bool,
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
    /// Broker mode: milliseconds since this hub's last presence beat arrived
    /// (absent for the answering node and in gossip mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ms: Option<u64>,
}

impl ClusterReport {
    /// The report as a text table, one member per line.
    pub fn table(&self) -> String {
        let cell = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let mut rows = vec![[
            "NAME".to_string(),
            "STATE".to_string(),
            if self.broker { "HEARD" } else { "GOSSIP" }.to_string(),
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
            let third = match (self.broker, m.last_heard_ms) {
                (false, _) => cell(m.gossip),
                (true, Some(ms)) => format!("{:.1}s ago", ms as f64 / 1000.0),
                (true, None) => "-".to_string(),
            };
            rows.push([
                name,
                m.state.clone(),
                third,
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
        if self.broker {
            out.push_str("(broker mode: hubs as the message broker shows them)\n");
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

    #[test]
    fn broker_report_lists_the_hubs_heard() {
        let meta = NodeMeta {
            http: Some("127.0.0.1:8080".parse().unwrap()),
            chat: None,
        };
        let mut info = ClusterInfo::standalone("host", meta);
        let hubs = HubsView::new("hub-00000001");
        let other = NodeMeta {
            http: Some("127.0.0.1:9090".parse().unwrap()),
            chat: Some("127.0.0.1:9091".parse().unwrap()),
        };
        hubs.heard("hub-00000002", other, vec!["bob".into()]);
        info.broker = Some(hubs.clone());
        let r = info.report(vec!["ann".into()]);
        assert!(r.clustering && r.broker);
        assert_eq!(r.node, "hub-00000001");
        assert_eq!(r.members.len(), 2);
        assert_eq!(r.members[1].name, "hub-00000002");
        assert_eq!(
            r.members[1].users.as_deref(),
            Some(&["bob".to_string()][..])
        );
        assert!(r.members[1].last_heard_ms.unwrap() < 60_000);
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("HEARD"), "{t}");
        assert!(lines[1].starts_with("hub-00000001 *"), "{t}");
        assert!(
            lines[2].contains("s ago") && lines[2].ends_with("bob"),
            "{t}"
        );
        assert!(t.contains("broker mode"), "{t}");
        let back: ClusterReport =
            serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        hubs.gone("hub-00000002");
        assert_eq!(info.report(vec![]).members.len(), 1);
    }
}

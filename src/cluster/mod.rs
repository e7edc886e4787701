//! Gossip cluster membership: SWIM through the foca crate, driven by tokio
//! over UDP. [`node`] is the sans-IO core, [`membership`] the tokio driver,
//! [`wire`] the packet format and sealing, [`id`] who a member is.
//!
//! A relay (or anything else) follows the cluster through a [`Membership`]
//! handle: a watch of the member view, a broadcast of member events, and
//! opaque payloads sent to and received from members. [`report`] is what
//! `GET /api/cluster` answers, and [`members`] is `netkit members URL`.

pub mod broker;
pub mod id;
pub mod members;
pub mod membership;
pub mod node;
pub mod relay;
pub mod report;
#[cfg(test)]
mod sim;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

pub use id::{NodeId, NodeMeta};
pub use membership::{ClusterView, Membership};
pub use node::{MemberEvent, MemberInfo, MemberState, Payload, Tuning};
pub use report::{ClusterInfo, ClusterReport};

use crate::cli::{Listen, parse_duration};

/// Gossip address used when clustering is on and `--cluster-listen` is not given.
pub const DEFAULT_CLUSTER_LISTEN: &str = "127.0.0.1:7946";

/// Command-line options for cluster membership, part of `netkit serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// This node's name in the cluster (default: HOSTNAME-PORT).
    #[arg(long, env = "NETKIT_NODE_NAME")]
    pub node_name: Option<String>,
    /// UDP address to gossip on (default 127.0.0.1:7946 when --join is given;
    /// clustering is off unless --join or --cluster-listen is given).
    #[arg(long, env = "NETKIT_CLUSTER_LISTEN", value_name = "ADDR|off")]
    pub cluster_listen: Option<Listen>,
    /// Seeds to join through, comma-separated; "" starts a new cluster.
    #[arg(long, env = "NETKIT_JOIN", value_name = "HOST:PORT[,HOST:PORT…]")]
    pub join: Option<String>,
    /// Authenticate and encrypt every gossip packet with this shared secret; a
    /// comma-separated list is a keyring (the first key seals, all open), for rotation.
    #[arg(long, env = "NETKIT_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// Print one JSON status line with member counts on stdout per interval.
    #[arg(long, value_parser = parse_duration, env = "NETKIT_STATUS_JSON", value_name = "DUR")]
    pub status_json: Option<Duration>,
    /// How often each node probes one member.
    #[arg(long, value_parser = parse_duration, default_value = "1100ms", env = "NETKIT_CLUSTER_PROBE_PERIOD")]
    pub cluster_probe_period: Duration,
    /// How long a probe waits for an answer before asking others to probe.
    #[arg(long, value_parser = parse_duration, default_value = "400ms", env = "NETKIT_CLUSTER_PROBE_RTT")]
    pub cluster_probe_rtt: Duration,
    /// How long a suspect member has to refute before it is declared down.
    #[arg(long, value_parser = parse_duration, default_value = "1500ms", env = "NETKIT_CLUSTER_SUSPECT_TIMEOUT")]
    pub cluster_suspect_timeout: Duration,
    /// How often pending updates are gossiped to a few random members.
    #[arg(long, value_parser = parse_duration, default_value = "100ms", env = "NETKIT_CLUSTER_GOSSIP_INTERVAL")]
    pub cluster_gossip_interval: Duration,
    /// How often each node exchanges its full state with a random member.
    #[arg(long, value_parser = parse_duration, default_value = "30s", env = "NETKIT_CLUSTER_PUSH_PULL_INTERVAL")]
    pub cluster_push_pull_interval: Duration,
    /// Expected cluster size (sets how often each update is retransmitted).
    #[arg(long, default_value_t = 64, env = "NETKIT_CLUSTER_SIZE")]
    pub cluster_size: u32,
}

impl ClusterArgs {
    /// Whether clustering is on: `--join` or `--cluster-listen ADDR` given.
    pub fn enabled(&self) -> bool {
        self.join.is_some() || matches!(self.cluster_listen, Some(Listen::Addr(_)))
    }

    /// The protocol settings these flags give.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            probe_period: self.cluster_probe_period,
            probe_rtt: self.cluster_probe_rtt,
            suspect_timeout: self.cluster_suspect_timeout,
            gossip_interval: self.cluster_gossip_interval,
            push_pull_interval: self.cluster_push_pull_interval,
            cluster_size: self.cluster_size,
            ..Tuning::default()
        }
    }
}

/// Everything checked and bound before serving starts.
#[derive(Debug)]
pub struct BoundCluster {
    /// The gossip socket.
    pub socket: tokio::net::UdpSocket,
    /// This node's identity (name, bound address, generation).
    pub id: NodeId,
    /// Resolved seed addresses.
    pub seeds: Vec<SocketAddr>,
    /// Protocol settings.
    pub tuning: Tuning,
    /// Packet sealing, when `--cluster-key` is set.
    pub sealer: Option<wire::Sealer>,
    /// Status line interval.
    pub status_json: Option<Duration>,
}

/// Validates the cluster flags, resolves the seeds and binds the gossip
/// socket. Returns `None` when clustering is off.
pub async fn bind(args: &ClusterArgs) -> anyhow::Result<Option<BoundCluster>> {
    if !args.enabled() {
        if args.status_json.is_some() {
            anyhow::bail!(
                "--status-json reports cluster membership, and clustering is off; also pass --join \"\" (new cluster) or --join HOST:PORT"
            );
        }
        if matches!(args.cluster_listen, Some(Listen::Off)) && args.join.is_some() {
            anyhow::bail!("--join needs a gossip socket, and --cluster-listen is off");
        }
        return Ok(None);
    }
    let tuning = args.tuning();
    tuning.foca_config().map_err(anyhow::Error::msg)?;
    let listen = match &args.cluster_listen {
        Some(Listen::Addr(a)) => a.clone(),
        _ => DEFAULT_CLUSTER_LISTEN.to_string(),
    };
    let mut seeds = Vec::new();
    for seed in args.join.as_deref().unwrap_or("").split(',') {
        let seed = seed.trim();
        if seed.is_empty() {
            continue;
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(seed)
            .await
            .with_context(|| {
                format!("cannot resolve seed '{seed}' given to --join — give HOST:PORT, e.g. 127.0.0.1:7946")
            })?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .with_context(|| format!("seed '{seed}' given to --join resolves to no address"))?;
        seeds.push(addr);
    }
    let socket = crate::cli::bind_udp(&listen, "--cluster-listen").await?;
    let local = socket
        .local_addr()
        .context("gossip socket has no local address")?;
    if local.ip().is_unspecified() {
        anyhow::bail!(
            "--cluster-listen {listen}: the gossip address is what other members send to, so it must be a concrete IP, not {}",
            local.ip()
        );
    }
    let name = match &args.node_name {
        Some(n) => n.clone(),
        None => default_name(local.port()),
    };
    id::validate_name(&name).map_err(anyhow::Error::msg)?;
    let sealer = match args.cluster_key.as_deref() {
        None => None,
        Some(k) => Some(wire::Sealer::from_keys(k).ok_or_else(|| {
            anyhow::anyhow!(
                "--cluster-key has an empty key; give a shared secret (or KEY1,KEY2 while rotating) or leave the flag out"
            )
        })?),
    };
    Ok(Some(BoundCluster {
        socket,
        id: NodeId::new(name, local),
        seeds,
        tuning,
        sealer,
        status_json: args.status_json,
    }))
}

/// Waits until `deadline`, or forever when there is none (a `select!` branch
/// for a timer that may be unset).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The machine's host name (`node` when unknown): a standalone node's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().chars().take(id::MAX_NAME_LEN).collect::<String>())
        .filter(|h| id::validate_name(h).is_ok())
        .unwrap_or_else(|| "node".to_string())
}

/// `HOSTNAME-PORT`, or `node-XXXXXX` when the host name is unknown.
fn default_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && id::validate_name(h).is_ok());
    match host {
        Some(h) => {
            let h: String = h.chars().take(id::MAX_NAME_LEN - 6).collect();
            format!("{h}-{port}")
        }
        None => format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff),
    }
}

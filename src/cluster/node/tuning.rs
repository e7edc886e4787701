//! Protocol timings and sizes of the membership node, and the foca
//! configuration they stand for.

use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::cluster::wire;

/// Protocol timings and sizes; the defaults meet netkit's targets at 50 nodes
/// on a LAN (see docs/cluster.md for how they were chosen).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often each node probes one member.
    pub probe_period: Duration,
    /// How long a direct probe waits before asking others to probe indirectly.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly when a direct probe gets no answer.
    pub indirect_probes: usize,
    /// How long a suspect member has to refute before it is declared down.
    pub suspect_timeout: Duration,
    /// How often pending updates are gossiped (only while there are some).
    pub gossip_interval: Duration,
    /// Members each gossip round goes to.
    pub gossip_fanout: usize,
    /// How often each node exchanges its full state with a random member.
    pub push_pull_interval: Duration,
    /// How often a node that has no live member announces itself to the seeds.
    pub join_retry: Duration,
    /// How often a node announces itself to a member it considers down, so
    /// that a healed partition merges again.
    pub down_announce_interval: Duration,
    /// Expected cluster size; sets how many times each update is retransmitted.
    pub cluster_size: u32,
    /// Largest datagram sent or accepted, sealing included.
    pub max_packet: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(1100),
            probe_rtt: Duration::from_millis(400),
            indirect_probes: 3,
            suspect_timeout: Duration::from_millis(1500),
            gossip_interval: Duration::from_millis(100),
            gossip_fanout: 3,
            push_pull_interval: Duration::from_secs(30),
            join_retry: Duration::from_secs(1),
            down_announce_interval: Duration::from_secs(10),
            cluster_size: 64,
            max_packet: 1400,
        }
    }
}

impl Tuning {
    /// The foca configuration these settings stand for.
    pub fn foca_config(&self) -> Result<foca::Config, String> {
        if self.probe_rtt.is_zero() || self.probe_rtt >= self.probe_period {
            return Err(format!(
                "probe RTT ({:?}) must be above zero and below the probe period ({:?}); adjust --cluster-probe-rtt",
                self.probe_rtt, self.probe_period
            ));
        }
        if self.suspect_timeout.is_zero() || self.gossip_interval.is_zero() {
            return Err("the suspect timeout and the gossip interval must be above zero".into());
        }
        if self.max_packet < 512 || self.max_packet > 65_000 {
            return Err(format!(
                "max packet size {} is out of range 512..=65000; adjust --cluster-max-packet",
                self.max_packet
            ));
        }
        let lan = foca::Config::new_lan(NonZeroU32::new(self.cluster_size.max(1)).expect("max(1)"));
        let nz = |n: usize| NonZeroUsize::new(n.max(1)).expect("max(1)");
        Ok(foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: nz(self.indirect_probes),
            // memberlist's 4·log10(N+1) (7 at 64) lets an update miss a node
            // now and then (≈ e^-7 per node); at least 10 makes it rare.
            // Costs bytes only while there is news to spread.
            max_transmissions: lan.max_transmissions.max(NonZeroU8::new(10).expect("10")),
            suspect_to_down_after: self.suspect_timeout,
            remove_down_after: Some(Duration::from_secs(24 * 3600)),
            // Room for the kind byte and the seal.
            max_packet_size: nz(self.max_packet - 1 - wire::SEAL_OVERHEAD),
            notify_down_members: true,
            periodic_announce: None,
            periodic_announce_to_down_members: Some(foca::PeriodicParams {
                frequency: self.down_announce_interval,
                num_members: nz(1),
            }),
            periodic_gossip: Some(foca::PeriodicParams {
                frequency: self.gossip_interval,
                num_members: nz(self.gossip_fanout),
            }),
        })
    }
}

//! The tokio driver around the sans-IO [`Node`]: one task owns the gossip
//! socket, the timer queue and the node; a [`Membership`] handle lets the rest
//! of the server read the member view, follow member events, and exchange
//! opaque payloads with members. On shutdown the node leaves gracefully.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::id::{NodeId, NodeMeta};
use super::node::{Counts, MemberEvent, MemberInfo, Node, Payload, SendError, Stats, Timer};
use super::{BoundCluster, sleep_until};

/// Capacity of the event and payload broadcast channels; a subscriber that
/// falls further behind gets `RecvError::Lagged` and must re-read the view.
const CHANNEL_CAPACITY: usize = 1024;

/// The member view of one node at one moment.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This node's identity.
    pub me: NodeId,
    /// Every other member known, down and left ones included.
    pub members: Vec<MemberInfo>,
    /// Member counts, this node included.
    pub counts: Counts,
}

struct Shared {
    status: Mutex<(Counts, Stats, String)>,
    events: broadcast::Sender<MemberEvent>,
    payloads: broadcast::Sender<Payload>,
}

enum Command {
    Send {
        to: SocketAddr,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
}

/// A handle on the running membership task; cheap to clone.
#[derive(Clone)]
pub struct Membership {
    shared: Arc<Shared>,
    view: watch::Receiver<ClusterView>,
    commands: mpsc::Sender<Command>,
    local_addr: SocketAddr,
}

impl Membership {
    /// The gossip socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current member view.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver that is notified whenever the member view changes.
    pub fn watch(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// Member state changes from now on.
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.shared.events.subscribe()
    }

    /// Application payloads received from members from now on.
    pub fn payloads(&self) -> broadcast::Receiver<Payload> {
        self.shared.payloads.subscribe()
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.status.lock().expect("status lock").1
    }

    /// Sends one datagram of opaque data to the live member gossiping at
    /// `to` (unreliable, like any gossip packet).
    pub async fn send(&self, to: SocketAddr, data: Vec<u8>) -> Result<(), SendError> {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Send { to, data, reply })
            .await
            .is_err()
        {
            return Err(SendError::NoSuchMember(to));
        }
        rx.await.unwrap_or(Err(SendError::NoSuchMember(to)))
    }
}

/// Starts the membership task (and the status printer, if asked for) on
/// `tracker`; it runs until `shutdown`, then leaves the cluster.
pub fn spawn(
    bound: BoundCluster,
    meta: NodeMeta,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Membership> {
    let BoundCluster {
        socket,
        id,
        seeds,
        tuning,
        sealer,
        status_json,
    } = bound;
    let local_addr = id.addr;
    // ICMP "port unreachable" from a member's address is an early sign that
    // it crashed (see `Node::handle_unreachable`).
    if let Err(e) = crate::udp::enable_error_queue(&socket) {
        warn!(
            "cluster: cannot read ICMP errors on the gossip socket ({e}); crashed members are found by probing alone"
        );
    }
    let rng: StdRng = rand::make_rng();
    let node =
        Node::new(id.clone(), meta, tuning, sealer, seeds, rng).map_err(anyhow::Error::msg)?;
    let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
    let (payloads, _) = broadcast::channel(CHANNEL_CAPACITY);
    let shared = Arc::new(Shared {
        status: Mutex::new((node.counts(), Stats::default(), id.name.clone())),
        events,
        payloads,
    });
    let (view_tx, view_rx) = watch::channel(ClusterView {
        me: id,
        members: Vec::new(),
        counts: node.counts(),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    info!(addr = %local_addr, "cluster: gossip on udp {local_addr}");
    tracker.spawn(run(
        node,
        socket,
        shared.clone(),
        view_tx,
        cmd_rx,
        shutdown.clone(),
    ));
    if let Some(every) = status_json {
        tracker.spawn(print_status(shared.clone(), local_addr, every, shutdown));
    }
    Ok(Membership {
        shared,
        view: view_rx,
        commands: cmd_tx,
        local_addr,
    })
}

async fn run(
    node: Node,
    socket: UdpSocket,
    shared: Arc<Shared>,
    view: watch::Sender<ClusterView>,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut d = Driver {
        node,
        socket,
        shared,
        view,
        timers: BTreeMap::new(),
        seq: 0,
        version: u64::MAX,
    };
    let mut buf = vec![0u8; 65_536];
    d.node.start();
    d.flush().await;
    loop {
        let next = d.timers.first_key_value().map(|(k, _)| k.0);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Timers first: a flood of datagrams must not starve probing.
            _ = sleep_until(next) => {
                let now = Instant::now();
                while let Some(entry) = d.timers.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    d.node.handle_timer(entry.remove());
                }
            }
            got = crate::udp::recv_from(&d.socket, &mut buf) => match got {
                Ok(got) if got.truncated_from.is_some() => {
                    debug!(peer = %got.peer, "cluster: oversized datagram dropped");
                }
                Ok(got) => d.node.handle_packet(got.peer, &buf[..got.len]),
                // A pending ICMP error surfaces here too; the branch below
                // reads what it was about.
                Err(e) => debug!("cluster: receive error: {e}"),
            },
            // ICMP "port unreachable" for datagrams sent earlier.
            Ok(addrs) = crate::udp::next_unreachable(&d.socket) => {
                for addr in addrs {
                    d.node.handle_unreachable(addr);
                }
            }
            Some(cmd) = commands.recv() => match cmd {
                Command::Send { to, data, reply } => {
                    let _ = reply.send(d.node.send_payload(to, &data));
                }
            },
        }
        d.flush().await;
    }
    d.node.leave();
    d.flush().await;
    info!(stats = ?d.node.stats(), "cluster: stopped");
}

/// The driver's state around the sans-IO node: its socket, its timers, and
/// where its output goes.
struct Driver {
    node: Node,
    socket: UdpSocket,
    shared: Arc<Shared>,
    view: watch::Sender<ClusterView>,
    /// Pending timers by deadline; `seq` keeps equal deadlines apart.
    timers: BTreeMap<(Instant, u64), Timer>,
    seq: u64,
    /// The node's view version last published on `view`.
    version: u64,
}

impl Driver {
    /// Sends the node's packets, arms its timers, and publishes its events,
    /// payloads, counters and (when it changed) its view.
    async fn flush(&mut self) {
        let Driver {
            node,
            socket,
            shared,
            view,
            timers,
            seq,
            version,
        } = self;
        // Sending can reveal unreachable members, whose suspicion is more
        // output: loop until a round reveals nothing new.
        loop {
            let out = node.take_output();
            let mut unreachable = Vec::new();
            for (to, packet) in &out.sends {
                let mut sent = socket.send_to(packet, to).await;
                if let Err(e) = &sent
                    && e.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    // The error is an earlier datagram's (a pending ICMP
                    // error fails the next send): note whose, send again.
                    unreachable.extend(crate::udp::take_unreachable(socket));
                    sent = socket.send_to(packet, to).await;
                }
                if let Err(e) = sent {
                    debug!(%to, "cluster: cannot send: {e}");
                }
            }
            let now = Instant::now();
            for (after, timer) in out.timers {
                *seq += 1;
                timers.insert((now + after, *seq), timer);
            }
            // The view first: whoever gets an event or a payload and reads
            // the view (the relay checks a sender is live) sees the state
            // behind it.
            if node.view_version() != *version {
                *version = node.view_version();
                let mut members: Vec<MemberInfo> = node.members().cloned().collect();
                members.sort_by(|a, b| a.id.name.cmp(&b.id.name).then(a.id.addr.cmp(&b.id.addr)));
                view.send_replace(ClusterView {
                    me: node.id().clone(),
                    members,
                    counts: node.counts(),
                });
            }
            for event in out.events {
                let _ = shared.events.send(event);
            }
            for payload in out.payloads {
                let _ = shared.payloads.send(payload);
            }
            if unreachable.is_empty() {
                break;
            }
            for addr in unreachable {
                node.handle_unreachable(addr);
            }
        }
        let mut status = shared.status.lock().expect("status lock");
        status.0 = node.counts();
        status.1 = node.stats();
        if status.2 != node.id().name {
            status.2 = node.id().name.clone();
        }
    }
}

/// Prints `{"ts", "name", "addr", "members", "alive", "suspect", "tx_bytes", "tx_pkts"}`
/// on stdout every `every` until shutdown.
async fn print_status(
    shared: Arc<Shared>,
    addr: SocketAddr,
    every: Duration,
    shutdown: CancellationToken,
) {
    use std::io::Write;
    let every = every.max(Duration::from_millis(10));
    // The ready line comes first on stdout: readers take the first line as it.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = crate::ready::announced() => {}
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let line = {
            let status = shared.status.lock().expect("status lock");
            let (counts, stats, name) = &*status;
            serde_json::json!({
                "ts": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "name": name,
                "addr": addr.to_string(),
                "members": counts.members,
                "alive": counts.alive,
                "suspect": counts.suspect,
                "tx_bytes": stats.tx_bytes,
                "tx_pkts": stats.tx_pkts,
            })
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            // Nobody reads stdout any more; membership goes on.
            break;
        }
    }
}

//! The transfer relay: `netkit relay` and `netkit serve --relay`. Two peers
//! that cannot reach each other both connect out to it and name a channel
//! id (a hash of the code's public channel number); the relay pairs one
//! sender with one receiver, then copies bytes between them without parsing
//! them. The code handshake and sealing run end to end over the copy, so the
//! relay never learns the password or the keys and cannot alter content
//! undetected.
//!
//! - `wire`: the hello and the replies, sans-IO.
//! - `rendezvous`: who waits where, used-up channels (no sockets).
//! - `splice`: the copy loop with its idle timeout and byte limit.
//! - [`client`]: the peers' side (`netkit send` / `netkit recv` with a code).

pub mod client;
mod rendezvous;
mod splice;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cli::{Listen, parse_duration, parse_size};
use crate::net::limit::{IpPermit, PerIpLimit};
use rendezvous::{Join, Rendezvous};
use splice::End;
use wire::{HELLO_LEN, Hello, Reply};

/// The relay's default address, for `netkit relay` and for the peers.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8334";

/// Command-line options of `netkit relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = DEFAULT_ADDR, env = "NETKIT_RELAY")]
    pub listen: Listen,
    /// The relay's limits.
    #[command(flatten)]
    pub limits: RelayLimitArgs,
}

/// The relay's limits, the same flags in `netkit relay` and `netkit serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayLimitArgs {
    /// Most pairs copied at once; a peer that would make one more is told `busy`.
    #[arg(long, default_value_t = 64, env = "NETKIT_RELAY_MAX_PAIRS")]
    pub relay_max_pairs: usize,
    /// Most peers waiting for their partner at once.
    #[arg(long, default_value_t = 256, env = "NETKIT_RELAY_MAX_WAITING")]
    pub relay_max_waiting: usize,
    /// How long a peer may wait for its partner.
    #[arg(long, default_value = "10m", value_parser = parse_duration, env = "NETKIT_RELAY_MAX_WAIT")]
    pub relay_max_wait: Duration,
    /// Cut a pair when no byte moved either way for this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "NETKIT_RELAY_IDLE_TIMEOUT")]
    pub relay_idle_timeout: Duration,
    /// Cut a pair past this many bytes, both ways together (0: no limit).
    #[arg(long, default_value = "0", value_parser = parse_size, env = "NETKIT_RELAY_MAX_BYTES")]
    pub relay_max_bytes: u64,
    /// Most connections one address may have open on the relay (0: no limit; loopback counts).
    #[arg(long, default_value_t = 16, env = "NETKIT_RELAY_MAX_CONNS_PER_IP")]
    pub relay_max_conns_per_ip: usize,
    /// Close a connection that has not sent its hello within this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "NETKIT_RELAY_HELLO_TIMEOUT")]
    pub relay_hello_timeout: Duration,
    /// A channel that paired is refused for this long (single use).
    #[arg(long, default_value = "10m", value_parser = parse_duration, env = "NETKIT_RELAY_REUSE_AFTER")]
    pub relay_reuse_after: Duration,
}

impl RelayLimitArgs {
    /// The relay configuration these flags describe.
    pub fn config(&self) -> Config {
        Config {
            max_pairs: self.relay_max_pairs.max(1),
            max_waiting: self.relay_max_waiting.max(1),
            max_wait: self.relay_max_wait,
            idle_timeout: self.relay_idle_timeout,
            max_bytes: self.relay_max_bytes,
            max_conns_per_ip: self.relay_max_conns_per_ip,
            hello_timeout: self.relay_hello_timeout,
            reuse_after: self.relay_reuse_after,
        }
    }
}

/// The relay's limits (see [`RelayLimitArgs`] for each).
#[derive(Debug, Clone)]
pub struct Config {
    /// Pairs copied at once.
    pub max_pairs: usize,
    /// Peers waiting at once.
    pub max_waiting: usize,
    /// Wait for the partner.
    pub max_wait: Duration,
    /// Idle time that cuts a pair.
    pub idle_timeout: Duration,
    /// Bytes that cut a pair (0: no limit).
    pub max_bytes: u64,
    /// Connections per address (0: no limit).
    pub max_conns_per_ip: usize,
    /// Time to send the hello.
    pub hello_timeout: Duration,
    /// Time a paired channel stays refused.
    pub reuse_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_pairs: 64,
            max_waiting: 256,
            max_wait: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            max_bytes: 0,
            max_conns_per_ip: 16,
            hello_timeout: Duration::from_secs(5),
            reuse_after: Duration::from_secs(600),
        }
    }
}

/// Why the relay turned a peer away or cut a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address had `--relay-max-conns-per-ip` connections open.
    PerIp,
    /// No hello within the hello timeout.
    HelloTimeout,
    /// Bytes that are not a relay hello.
    BadHello,
    /// A peer of the same side already waits on the channel.
    ChannelTaken,
    /// The channel paired (or failed) recently: single use.
    ChannelUsed,
    /// `--relay-max-waiting` peers wait already.
    TooManyWaiting,
    /// `--relay-max-pairs` pairs are being copied.
    Busy,
    /// The partner did not come within `--relay-max-wait`.
    WaitTimeout,
    /// The peer sent bytes before it was paired.
    EarlyData,
    /// The waiting partner left just as this peer arrived.
    PartnerLeft,
    /// A pair moved nothing for the idle timeout.
    Idle,
    /// A pair moved more than `--relay-max-bytes`.
    ByteLimit,
}

impl Refusal {
    const ALL: [Refusal; 12] = [
        Refusal::PerIp,
        Refusal::HelloTimeout,
        Refusal::BadHello,
        Refusal::ChannelTaken,
        Refusal::ChannelUsed,
        Refusal::TooManyWaiting,
        Refusal::Busy,
        Refusal::WaitTimeout,
        Refusal::EarlyData,
        Refusal::PartnerLeft,
        Refusal::Idle,
        Refusal::ByteLimit,
    ];

    /// The label in logs and in `netkit_relay_refused_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PerIp => "per_ip",
            Refusal::HelloTimeout => "hello_timeout",
            Refusal::BadHello => "bad_hello",
            Refusal::ChannelTaken => "channel_taken",
            Refusal::ChannelUsed => "channel_used",
            Refusal::TooManyWaiting => "too_many_waiting",
            Refusal::Busy => "busy",
            Refusal::WaitTimeout => "wait_timeout",
            Refusal::EarlyData => "early_data",
            Refusal::PartnerLeft => "partner_left",
            Refusal::Idle => "idle_timeout",
            Refusal::ByteLimit => "max_bytes",
        }
    }

    /// What the peer is told.
    fn message(self, c: &Config) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        match self {
            Refusal::PerIp => "too many connections from your address; try again in a moment".into(),
            Refusal::HelloTimeout => format!("no relay hello within {}", d(c.hello_timeout)),
            Refusal::BadHello => "not a netkit relay hello — is this a netkit send/recv of the same version?".into(),
            Refusal::ChannelTaken => "another peer of the same side waits on this channel — start again with a new code".into(),
            Refusal::ChannelUsed => "this channel was used (or a wrong code was tried on it) — start again with a new code".into(),
            Refusal::TooManyWaiting => format!("the relay has its limit of {} peers waiting; try again in a moment", c.max_waiting),
            Refusal::Busy => format!("the relay is copying its limit of {} pairs; try again in a moment", c.max_pairs),
            Refusal::WaitTimeout => format!("the other side did not come within {} — start again with a new code", d(c.max_wait)),
            Refusal::EarlyData => "data before the relay paired this connection".into(),
            Refusal::PartnerLeft => "the other side left just as it was paired — start again with a new code".into(),
            Refusal::Idle | Refusal::ByteLimit => String::new(),
        }
    }

    /// Whether a new code (another channel number) may get past this refusal.
    fn about_channel(self) -> bool {
        matches!(self, Refusal::ChannelTaken | Refusal::ChannelUsed)
    }
}

/// A peer handed to its waiting partner: its socket, and the slots it holds.
#[derive(Debug)]
struct Partner {
    stream: TcpStream,
    peer: SocketAddr,
    _pair_slot: OwnedSemaphorePermit,
    _ip: IpPermit,
}

/// The state of one relay: the matching table, pair slots, and counts.
struct Relay {
    config: Config,
    table: Rendezvous<Partner>,
    pairs: Arc<Semaphore>,
    refused: [AtomicU64; Refusal::ALL.len()],
}

/// Serves the relay on `listener` until `shutdown` is cancelled; one task
/// per connection. On shutdown every wait and pair is closed.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) {
    let local = listener.local_addr().ok();
    info!(addr = ?local, "relay: listening on {}", local.map(|a| a.to_string()).unwrap_or_default());
    let per_ip = PerIpLimit::including_loopback("relay", config.max_conns_per_ip);
    let relay = Arc::new(Relay {
        table: Rendezvous::new(config.max_waiting, config.reuse_after),
        pairs: Arc::new(Semaphore::new(config.max_pairs)),
        refused: Default::default(),
        config,
    });
    let tracker = TaskTracker::new();
    let mut acceptor = crate::net::accept::Acceptor::new("relay");
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        let Some(ip) = per_ip.admit(peer.ip()) else {
            relay.count(Refusal::PerIp);
            let mut out = BytesMut::new();
            relay.reply_for(Refusal::PerIp).encode(&mut out);
            let _ = stream.try_write(&out);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move { relay.handle(stream, peer, ip, &shutdown).await }
                .instrument(info_span!("relay", %peer)),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    let refused: Vec<String> = Refusal::ALL
        .iter()
        .map(|r| {
            (
                r.label(),
                relay.refused[*r as usize].load(Ordering::Relaxed),
            )
        })
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    info!(refused = %refused.join(" "), "relay: stopped");
}

/// Runs `netkit relay` until SIGINT or SIGTERM.
pub async fn run_command(args: RelayArgs) -> anyhow::Result<()> {
    let Some(addr) = args.listen.addr() else {
        anyhow::bail!("--listen off leaves nothing to serve; give HOST:PORT");
    };
    let listener = crate::cli::bind_tcp(addr, "--listen").await?;
    crate::ready::announce(&crate::ready::Ready {
        relay: listener.local_addr().ok(),
        ..Default::default()
    });
    run(listener, args.limits.config(), crate::shutdown::on_signal()).await;
    Ok(())
}

impl Relay {
    /// One connection: its hello, then a wait for its partner or a pair.
    async fn handle(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        ip: IpPermit,
        shutdown: &CancellationToken,
    ) {
        let hello = match self.read_hello(&mut stream).await {
            Ok(h) => h,
            Err(r) => return self.refuse(stream, r).await,
        };
        let slot = self.pairs.clone().try_acquire_owned().ok();
        let join = self.table.join(&hello, Instant::now(), slot.is_some());
        self.gauge_waiting();
        match join {
            Join::Refused(r) => self.refuse(stream, r).await,
            Join::Pair(tx) => {
                let me = Partner {
                    stream,
                    peer,
                    _pair_slot: slot.expect("a pair needs a slot"),
                    _ip: ip,
                };
                // The waiter's task copies; if it just gave up, tell this peer.
                if let Err(me) = tx.send(me) {
                    self.refuse(me.stream, Refusal::PartnerLeft).await;
                }
            }
            Join::Wait { ticket, rx } => {
                drop(slot);
                self.wait(stream, &hello, ticket, rx, shutdown).await;
                self.gauge_waiting();
                drop(ip);
            }
        }
    }

    /// Reads the hello within the hello timeout.
    async fn read_hello(&self, stream: &mut TcpStream) -> Result<Hello, Refusal> {
        let mut b = [0u8; HELLO_LEN];
        match tokio::time::timeout(self.config.hello_timeout, stream.read_exact(&mut b)).await {
            Err(_) => Err(Refusal::HelloTimeout),
            Ok(Err(_)) => Err(Refusal::BadHello),
            Ok(Ok(_)) => Hello::decode(&b).map_err(|e| {
                debug!("relay: {e}");
                Refusal::BadHello
            }),
        }
    }

    /// Waits for the partner on `hello`'s channel (bounded by `--relay-max-wait`),
    /// watching for this peer leaving; then copies between the two.
    async fn wait(
        &self,
        mut stream: TcpStream,
        hello: &Hello,
        ticket: u64,
        mut rx: oneshot::Receiver<Partner>,
        shutdown: &CancellationToken,
    ) {
        let max_wait_secs = self
            .config
            .max_wait
            .as_secs()
            .try_into()
            .unwrap_or(u32::MAX);
        let told = self
            .write_reply(&mut stream, &Reply::Waiting { max_wait_secs })
            .await;
        debug!(
            side = hello.side.name(),
            "relay: waiting for the other side"
        );
        let outcome = if told {
            tokio::select! {
                p = &mut rx => p.map_err(|_| None),
                _ = tokio::time::sleep(self.config.max_wait) => Err(Some(Refusal::WaitTimeout)),
                r = left_early(&stream) => Err(r),
                _ = shutdown.cancelled() => Err(None),
            }
        } else {
            Err(None)
        };
        let partner = match outcome {
            Ok(p) => p,
            Err(why) => {
                if !self.table.leave(&hello.channel, ticket) {
                    // Paired meanwhile: the partner is on the way, and is told.
                    if let Ok(p) = rx.await {
                        self.refuse(p.stream, Refusal::PartnerLeft).await;
                    }
                }
                if let Some(r) = why {
                    self.refuse(stream, r).await;
                }
                return;
            }
        };
        self.pair(stream, partner, hello, shutdown).await;
    }

    /// Tells both peers they are paired, then copies until the pair ends.
    async fn pair(
        &self,
        mut a: TcpStream,
        mut b: Partner,
        hello: &Hello,
        shutdown: &CancellationToken,
    ) {
        if !self.write_reply(&mut a, &Reply::Paired).await
            || !self.write_reply(&mut b.stream, &Reply::Paired).await
        {
            return;
        }
        metrics::counter!("netkit_relay_pairs_total").increment(1);
        metrics::gauge!("netkit_relay_pairs_active").increment(1.0);
        let channel = short_id(&hello.channel);
        info!(%channel, partner = %b.peer, "relay: paired a {} with a {}", hello.side.name(), other(hello.side));
        let started = Instant::now();
        let limits = splice::Limits {
            idle: self.config.idle_timeout,
            max_bytes: self.config.max_bytes,
        };
        let (end, bytes) = splice::splice_tcp(&mut a, &mut b.stream, limits, shutdown).await;
        metrics::gauge!("netkit_relay_pairs_active").decrement(1.0);
        metrics::counter!("netkit_relay_bytes_total").increment(bytes);
        let secs = started.elapsed().as_secs_f64();
        match end {
            End::Done => info!(%channel, bytes, "relay: pair done after {secs:.2}s"),
            End::Idle => self.count_cut(Refusal::Idle, &channel, bytes),
            End::ByteLimit => self.count_cut(Refusal::ByteLimit, &channel, bytes),
            End::Failed => {
                info!(%channel, bytes, "relay: pair ended by a peer's reset after {secs:.2}s")
            }
            End::Shutdown => info!(%channel, bytes, "relay: pair closed on shutdown"),
        }
    }

    fn gauge_waiting(&self) {
        metrics::gauge!("netkit_relay_waiting").set(self.table.waiting() as f64);
    }

    fn count_cut(&self, r: Refusal, channel: &str, bytes: u64) {
        self.count(r);
        warn!(%channel, bytes, reason = r.label(), "relay: cut a pair ({})", r.label());
    }

    /// Writes `reply` within the hello timeout; false if the peer is gone.
    async fn write_reply(&self, stream: &mut TcpStream, reply: &Reply) -> bool {
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        matches!(
            tokio::time::timeout(self.config.hello_timeout, stream.write_all(&out)).await,
            Ok(Ok(()))
        )
    }

    fn reply_for(&self, r: Refusal) -> Reply {
        Reply::Refused {
            channel: r.about_channel(),
            reason: r.message(&self.config),
        }
    }

    /// Counts and logs `r`, tells the peer why (best effort) and closes.
    async fn refuse(&self, mut stream: TcpStream, r: Refusal) {
        self.count(r);
        if self.write_reply(&mut stream, &self.reply_for(r)).await {
            let _ = tokio::time::timeout(self.config.hello_timeout, stream.shutdown()).await;
        }
    }

    /// Counts one refusal in `/metrics` and logs it: every one at debug,
    /// the 1st, 10th, 100th… of each reason at warn with the total so far.
    fn count(&self, r: Refusal) {
        metrics::counter!("netkit_relay_refused_total", "reason" => r.label()).increment(1);
        let n = self.refused[r as usize].fetch_add(1, Ordering::Relaxed) + 1;
        debug!(reason = r.label(), total = n, "relay: refused");
        if crate::transfer::is_power_of_ten(n) {
            warn!(
                reason = r.label(),
                total = n,
                "relay: {n} refusal(s) so far ({})",
                r.label()
            );
        }
    }
}

/// Returns when a waiting peer closes (`None`) or sends before it is paired.
async fn left_early(stream: &TcpStream) -> Option<Refusal> {
    let mut b = [0u8; 1];
    match stream.peek(&mut b).await {
        Ok(n) if n > 0 => Some(Refusal::EarlyData),
        _ => {
            debug!("relay: a waiting peer left");
            None
        }
    }
}

fn other(side: wire::Side) -> &'static str {
    match side {
        wire::Side::Sender => wire::Side::Receiver.name(),
        wire::Side::Receiver => wire::Side::Sender.name(),
    }
}

/// The first 4 bytes of a channel id in hex, for logs (the id is public).
fn short_id(id: &[u8; 32]) -> String {
    id[..4].iter().map(|b| format!("{b:02x}")).collect()
}

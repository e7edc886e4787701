//! Broker mode (`netkit serve --broker nats://…`): room messages go through
//! one NATS JetStream stream that every hub appends to and reads in order;
//! the stream sequence is the message id on every hub (docs/cluster.md).
//! Presence, direct messages and topics go on plain subjects ([`events`]).

mod accounts;
pub mod events;
pub mod hubs;
mod read;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::{Hub, LoggedPost, RoomLog};

/// The stream's name (and, with `nats:`, the origin its messages are stored under).
pub const STREAM: &str = "NETKIT";

/// How long a publish waits for the stream's acknowledgement before the
/// one retry (same message id) and then the error to the sender.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a hub checks that the stream is still the one it follows
/// and that its consumer delivers (also at each reconnection).
const STREAM_CHECK: Duration = Duration::from_secs(1);

/// How long the stream's consumer may deliver nothing while the stream holds
/// entries this hub has not applied before it is made again. The client
/// itself takes a consumer for lost only after 10 s without its beats.
const STALLED: Duration = Duration::from_secs(3);

/// How long the stream, created when the one this hub follows was, may end
/// before what the hub has applied before the hub takes it for another one
/// (a store restored from an older copy). Right after a failover the new
/// leader reports the entries it has yet to apply as missing, for a moment:
/// the acknowledged ones are in its log, and come back.
const BEHIND_GRACE: Duration = Duration::from_secs(20);

/// The longest pause between two attempts to read the stream again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The broker flags of `netkit serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BrokerArgs {
    /// Carry room messages through NATS JetStream at these servers
    /// (`nats://HOST:PORT[,HOST:PORT…]`) instead of the gossip relay.
    #[arg(long, env = "NETKIT_BROKER", value_name = "nats://HOST:PORT[,…]")]
    pub broker: Option<String>,
    /// Messages the stream keeps per room (older ones are dropped; 0 = no limit).
    #[arg(long, default_value_t = 100_000, env = "NETKIT_BROKER_MAX_PER_ROOM")]
    pub broker_max_per_room: u64,
    /// Copies of the stream a JetStream cluster keeps (3 on a three-server
    /// cluster survives losing one); used when the stream is created.
    #[arg(long, default_value_t = 1, env = "NETKIT_BROKER_REPLICAS",
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub broker_replicas: u8,
}

/// A hub's link to the stream: appends room messages ([`RoomLog`]).
pub struct Broker {
    /// Whether the client is connected now (set by its events).
    connected: Arc<tokio::sync::watch::Sender<bool>>,
    client: async_nats::Client,
    js: jetstream::Context,
    /// This hub's name among the others (`hub-` and 8 hex digits, new each
    /// start), and the other hubs heard.
    hubs: hubs::HubsView,
    /// When the stream this hub follows was created (nanoseconds since the
    /// epoch): a stream created later is another one ([`Broker::replaced`]).
    created: i128,
    /// Set once the stream turned out to be another one than this hub's
    /// store follows: why; from then on every send fails with it.
    replaced: tokio::sync::watch::Sender<Option<String>>,
    origin: String,
    /// Message ids: this process's random tag and a counter.
    tag: u64,
    next: AtomicU64,
    servers: String,
}

/// Follows the NATS client's connection events: whether it is connected
/// (sends fail fast while it is not), and a log line for each one an
/// operator needs to see: a lost connection, its return, a server's error,
/// a subscription the client dropped messages for (a hub too slow to read
/// them), a server going into lame duck mode.
fn connection_event(connected: &tokio::sync::watch::Sender<bool>, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            // The first connection is announced by `start`; only a return is news.
            if !connected.send_replace(true) {
                tracing::warn!("broker: connected to the NATS server again");
            }
        }
        Event::Disconnected => {
            connected.send_replace(false);
            tracing::warn!(
                "broker: lost the connection to the NATS server; sends fail until it is back"
            );
        }
        Event::SlowConsumer(sid) => tracing::warn!(
            "broker: the NATS client dropped messages for subscription {sid} (this hub reads too slowly)"
        ),
        Event::ServerError(e) => tracing::warn!("broker: the NATS server says: {e}"),
        Event::ClientError(e) => tracing::warn!("broker: NATS client error: {e}"),
        Event::LameDuckMode => {
            tracing::warn!("broker: the NATS server is going away (lame duck mode)")
        }
        Event::Draining | Event::Closed => {}
    }
}

/// Makes sure the stream `name` exists: file storage, `replicas` copies,
/// one entry per subject under `prefix` (the newest), as `adjust` leaves it.
async fn keyed_stream(
    js: &jetstream::Context,
    servers: &str,
    name: &str,
    prefix: &str,
    replicas: usize,
    adjust: impl FnOnce(&mut stream::Config),
) -> anyhow::Result<()> {
    let mut config = stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}>")],
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        num_replicas: replicas,
        ..Default::default()
    };
    adjust(&mut config);
    js.get_or_create_stream(config).await.map_err(|e| {
        anyhow::anyhow!("--broker: cannot open the JetStream stream {name} at {servers}: {e}")
    })?;
    Ok(())
}

/// The servers of `--broker`: comma-separated, each `nats://HOST:PORT` or `HOST:PORT`.
pub fn parse_servers(list: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("--broker: bad server address '{s}': {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                anyhow::bail!("--broker: no server given (nats://HOST:PORT[,HOST:PORT…])");
            }
            Ok(v)
        })
}

impl Broker {
    /// Connects to `servers` and makes sure the stream exists (created
    /// with `max_per_room` and `replicas`, 0 taken as 1); fails with a
    /// clear error if no server answers or JetStream is off.
    pub async fn connect(servers: &str, max_per_room: u64, replicas: u8) -> anyhow::Result<Broker> {
        let addrs = parse_servers(servers)?;
        let connected = Arc::new(tokio::sync::watch::channel(true).0);
        let events = connected.clone();
        let client = async_nats::ConnectOptions::new()
            .name("netkit")
            .event_callback(move |event| {
                let events = events.clone();
                async move { connection_event(&events, event) }
            })
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(addrs)
            .await
            .map_err(|e| {
                anyhow::anyhow!("--broker: cannot reach the NATS server at {servers}: {e}")
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("{}>", wire::SUBJECT_PREFIX)],
            storage: stream::StorageType::File,
            max_messages_per_subject: if max_per_room == 0 {
                -1
            } else {
                i64::try_from(max_per_room).unwrap_or(i64::MAX)
            },
            duplicate_window: Duration::from_secs(120),
            num_replicas: usize::from(replicas.max(1)),
            ..Default::default()
        };
        let asked = config.num_replicas;
        let stream = js.get_or_create_stream(config).await.map_err(|e| {
            anyhow::anyhow!(
                "--broker: cannot open the JetStream stream {STREAM} at {servers} \
                 (is JetStream enabled? nats-server -js): {e}"
            )
        })?;
        // Each room's last topic, for hubs that start (or come back) later.
        keyed_stream(
            &js,
            servers,
            wire::TOPICS_STREAM,
            wire::TOPIC_PREFIX,
            asked,
            |_| {},
        )
        .await?;
        // Registered accounts: the first claim of each key stands; the
        // engine itself refuses a second entry for a key.
        keyed_stream(
            &js,
            servers,
            wire::ACCOUNTS_STREAM,
            wire::ACCOUNT_PREFIX,
            asked,
            |c| {
                c.discard = stream::DiscardPolicy::New;
                c.discard_new_per_subject = true;
            },
        )
        .await?;
        let info = stream.cached_info();
        if info.config.num_replicas != asked {
            tracing::warn!(
                "broker: the stream {STREAM} keeps {} replicas, not the {} asked \
                 (--broker-replicas applies when the stream is created)",
                info.config.num_replicas,
                asked
            );
        }
        let created = info.created.unix_timestamp_nanos();
        let tag: u64 = rand::random();
        Ok(Broker {
            connected,
            client,
            js,
            hubs: hubs::HubsView::new(format!("hub-{:08x}", tag as u32)),
            created,
            replaced: tokio::sync::watch::channel(None).0,
            origin: format!("nats:{STREAM}"),
            tag,
            next: AtomicU64::new(1),
            servers: servers.to_string(),
        })
    }

    /// Whether the client is connected to a server now; changes as it
    /// loses and regains the connection.
    pub fn connected(&self) -> tokio::sync::watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Why the stream is not the one this hub's store follows, once that
    /// is found (then every send fails with it); `None` until then.
    pub fn replaced(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.replaced.subscribe()
    }

    /// This hub's name, as other hubs show its users' node.
    pub fn node(&self) -> &str {
        self.hubs.me()
    }

    /// The hubs as the engine shows them (this one's name, the others heard).
    pub fn hubs(&self) -> hubs::HubsView {
        self.hubs.clone()
    }

    /// The stream's newest sequence (0 when empty).
    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        let mut s = self.js.get_stream(STREAM).await?;
        Ok(s.info().await?.state.last_sequence)
    }

    /// Publishes `payload` on `subject` with message id `id` and waits for
    /// the stream's acknowledgement: the sequence it is stored at (the
    /// first one's, for a duplicate within the stream's window).
    pub async fn publish(
        &self,
        subject: String,
        payload: bytes::Bytes,
        id: &str,
    ) -> anyhow::Result<u64> {
        Ok(self.publish_with(subject, payload, id, false).await?)
    }

    /// As [`Broker::publish`]; with `first_on_subject`, stored only if the
    /// subject holds no entry yet (expected last subject sequence 0).
    async fn publish_with(
        &self,
        subject: String,
        payload: bytes::Bytes,
        id: &str,
        first_on_subject: bool,
    ) -> Result<u64, jetstream::context::PublishError> {
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        if first_on_subject {
            msg = msg.expected_last_subject_sequence(0);
        }
        let ack = self.js.send_publish(subject, msg).await?.await?;
        Ok(ack.sequence)
    }

    /// `Ok` while sends can go out: connected, and the stream is the one
    /// this hub's store follows; else why not.
    fn usable(&self) -> Result<(), String> {
        if let Some(why) = &*self.replaced.borrow() {
            return Err(why.clone());
        }
        if *self.connected.borrow() {
            Ok(())
        } else {
            Err(format!(
                "not connected to the NATS server at {}",
                self.servers
            ))
        }
    }

    /// Publishes as [`Broker::publish_with`] under a fresh message id,
    /// failing at once when not connected (nothing is queued for later)
    /// and retrying a lost acknowledgement once with the same id, which
    /// the stream stores only once.
    pub(super) async fn publish_retried(
        &self,
        subject: String,
        payload: bytes::Bytes,
        first_on_subject: bool,
    ) -> Result<u64, Refused> {
        self.usable().map_err(Refused::Unavailable)?;
        let id = format!(
            "{:016x}-{}",
            self.tag,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut last = String::new();
        for _ in 0..2 {
            match self
                .publish_with(subject.clone(), payload.clone(), &id, first_on_subject)
                .await
            {
                Ok(seq) => return Ok(seq),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    return Err(Refused::NotFirst);
                }
                Err(e) => last = e.to_string(),
            }
            self.usable().map_err(Refused::Unavailable)?;
        }
        Err(Refused::Unavailable(format!(
            "no acknowledgement from {}: {last}",
            self.servers
        )))
    }

    /// Appends `post` (see [`Broker::publish_retried`]).
    async fn append_post(self: Arc<Self>, post: LoggedPost) -> Result<u64, String> {
        let (subject, payload) = (wire::subject(&post.room), wire::encode(&post));
        self.publish_retried(subject, payload, false)
            .await
            .map_err(|r| match r {
                Refused::Unavailable(why) => why,
                Refused::NotFirst => "refused by the stream".into(),
            })
    }
}

/// Why [`Broker::publish_retried`] stored nothing.
pub(super) enum Refused {
    /// Not connected, or no acknowledgement: why.
    Unavailable(String),
    /// The subject holds an entry already (asked to be the first).
    NotFirst,
}

impl RoomLog for Arc<Broker> {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn append(&self, post: LoggedPost) -> BoxFuture<'static, Result<u64, String>> {
        Box::pin(self.clone().append_post(post))
    }

    fn health(&self) -> Result<(), String> {
        self.usable()
    }
}

/// Connects to the broker, checks that the hub's store fits the stream,
/// puts `hub` in broker mode and starts reading the stream into it and
/// carrying presence, direct messages and topics (telling the other hubs
/// where this one's doors listen, `meta`).
pub async fn start(
    args: &BrokerArgs,
    hub: &Hub,
    meta: crate::cluster::NodeMeta,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Option<Arc<Broker>>> {
    let Some(servers) = &args.broker else {
        return Ok(None);
    };
    let broker =
        Arc::new(Broker::connect(servers, args.broker_max_per_room, args.broker_replicas).await?);
    check_store(&broker, hub).await?;
    accounts::sessions_stream(&broker, hub.session_ttl(), args.broker_replicas).await?;
    hub.set_room_log(Arc::new(broker.clone()));
    hub.set_account_log(Arc::new(broker.clone()));
    let inputs = events::subscribe(&broker.client, &broker.js, broker.node()).await?;
    tracker.spawn(events::run(
        broker.client.clone(),
        broker.js.clone(),
        broker.hubs(),
        meta,
        hub.clone(),
        inputs,
        shutdown.clone(),
    ));
    tracker.spawn(read::consume(broker.clone(), hub.clone(), shutdown));
    tracker.spawn(accounts::claim_local_accounts(broker.clone(), hub.clone()));
    tracing::info!(servers = %servers, stream = STREAM, node = %broker.node(), "broker: room messages go through NATS JetStream");
    Ok(Some(broker))
}

/// Refuses a store that does not follow this stream: one with messages
/// numbered outside it (ids would collide), or one ahead of the stream (a
/// new stream under an old store: positions would silently mean other messages).
async fn check_store(broker: &Broker, hub: &Hub) -> anyhow::Result<()> {
    let applied = hub.last_logged(&broker.origin);
    let highest = hub.rooms().iter().map(|r| r.last_id).max().unwrap_or(0);
    if highest > applied {
        anyhow::bail!(
            "--broker: the data dir holds messages that did not come from the stream \
             (ids up to {highest}); start broker mode with a fresh --data-dir"
        );
    }
    let last = broker.last_seq().await?;
    if last < applied {
        anyhow::bail!(
            "--broker: this data dir has applied the stream {STREAM} up to {applied} but the \
             stream ends at {last} (a new stream?); start with a fresh --data-dir"
        );
    }
    Ok(())
}

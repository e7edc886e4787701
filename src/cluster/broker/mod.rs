//! Broker mode (`netkit serve --broker nats://…`): room messages go through
//! one NATS JetStream stream that every hub appends to and reads in order;
//! the stream sequence is the message id on every hub (docs/cluster.md).
//! Presence, direct messages and topics go on plain subjects ([`events`]).

pub mod events;
pub mod hubs;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::accounts::{AccountRecord, SessionRecord};
use crate::chat::hub::{AccountLog, ClaimError};
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
        let topics = stream::Config {
            name: wire::TOPICS_STREAM.to_string(),
            subjects: vec![format!("{}>", wire::TOPIC_PREFIX)],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            num_replicas: asked,
            ..Default::default()
        };
        js.get_or_create_stream(topics).await.map_err(|e| {
            anyhow::anyhow!(
                "--broker: cannot open the JetStream stream {} at {servers}: {e}",
                wire::TOPICS_STREAM
            )
        })?;
        // Registered accounts: the first claim of each key stands.
        let accounts = stream::Config {
            name: wire::ACCOUNTS_STREAM.to_string(),
            subjects: vec![format!("{}>", wire::ACCOUNT_PREFIX)],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            // A second entry for a key is refused by the engine itself,
            // not only by the claims' expected sequence.
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            num_replicas: asked,
            ..Default::default()
        };
        js.get_or_create_stream(accounts).await.map_err(|e| {
            anyhow::anyhow!(
                "--broker: cannot open the JetStream stream {} at {servers}: {e}",
                wire::ACCOUNTS_STREAM
            )
        })?;
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
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        let ack = self.js.send_publish(subject, msg).await?.await?;
        Ok(ack.sequence)
    }

    /// Appends `post`, failing at once when not connected (nothing is
    /// queued for later) and retrying a lost acknowledgement once with the
    /// same message id, which the stream stores only once.
    async fn append_post(self: Arc<Self>, post: LoggedPost) -> Result<u64, String> {
        self.health()?;
        let id = format!(
            "{:016x}-{}",
            self.tag,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (subject, payload) = (wire::subject(&post.room), wire::encode(&post));
        let mut last = String::new();
        for _ in 0..2 {
            match self.publish(subject.clone(), payload.clone(), &id).await {
                Ok(seq) => return Ok(seq),
                Err(e) => last = e.to_string(),
            }
            self.health()?;
        }
        Err(format!("no acknowledgement from {}: {last}", self.servers))
    }
}

impl Broker {
    /// Claims `record`'s key in the accounts stream: published only if the
    /// key has no entry yet (expected last subject sequence 0), so of two
    /// hubs registering one nick at once the engine takes exactly one. A
    /// lost acknowledgement is retried once with the same message id.
    async fn claim_account(self: Arc<Self>, record: AccountRecord) -> Result<(), ClaimError> {
        self.health().map_err(ClaimError::Unavailable)?;
        let subject = wire::account_subject(&record.nick);
        let payload = wire::account(&record);
        let id = format!(
            "{:016x}-{}",
            self.tag,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut last = String::new();
        for _ in 0..2 {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id)
                .expected_last_subject_sequence(0);
            let acked = match self.js.send_publish(subject.clone(), msg).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    return Err(ClaimError::Taken);
                }
                Err(e) => last = e.to_string(),
            }
            self.health().map_err(ClaimError::Unavailable)?;
        }
        Err(ClaimError::Unavailable(format!(
            "no acknowledgement from {}: {last}",
            self.servers
        )))
    }
}

impl AccountLog for Arc<Broker> {
    fn claim(&self, record: AccountRecord) -> BoxFuture<'static, Result<(), ClaimError>> {
        Box::pin(self.clone().claim_account(record))
    }

    fn share_session(&self, record: SessionRecord) {
        let js = self.js.clone();
        let revoked = record.revoked;
        let (subject, payload) = (
            wire::session_subject(&record.selector),
            wire::session(&record),
        );
        tokio::spawn(async move {
            let stored = match js.publish(subject, payload).await {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                let what = if revoked { "logout" } else { "session" };
                tracing::warn!(
                    "broker: {what} not shared with the other hubs (it holds on this one): {e}"
                );
            }
        });
    }
}

/// Makes sure the stream of page sessions exists: entries kept one per
/// selector and no longer than a session lasts (`ttl`, and a day).
async fn sessions_stream(broker: &Broker, ttl: Duration, replicas: u8) -> anyhow::Result<()> {
    let config = stream::Config {
        name: wire::SESSIONS_STREAM.to_string(),
        subjects: vec![format!("{}>", wire::SESSION_PREFIX)],
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        max_age: ttl.saturating_add(Duration::from_secs(24 * 3600)),
        num_replicas: usize::from(replicas.max(1)),
        ..Default::default()
    };
    broker.js.get_or_create_stream(config).await.map_err(|e| {
        anyhow::anyhow!(
            "--broker: cannot open the JetStream stream {} at {}: {e}",
            wire::SESSIONS_STREAM,
            broker.servers
        )
    })?;
    Ok(())
}

/// Claims, in the accounts stream, the accounts this hub registered before
/// it shared one (a data dir from a hub on its own): each stands unless
/// another hub claimed its nick first, and then this hub keeps its own and
/// says so.
async fn claim_local_accounts(broker: Arc<Broker>, hub: Hub) {
    let mine = match hub.local_accounts().await {
        Ok(v) => v,
        Err(e) => return tracing::warn!("broker: the accounts of this hub were not read: {e}"),
    };
    for record in mine {
        match broker.clone().claim_account(record.clone()).await {
            Ok(()) => {
                tracing::info!(nick = %record.nick, "broker: account shared with the other hubs")
            }
            Err(ClaimError::Taken) => {} // already there (ours or another's: the reader tells)
            Err(ClaimError::Unavailable(why)) => {
                return tracing::warn!(
                    "broker: accounts of this hub not shared ({why}); they are at the next start"
                );
            }
        }
    }
}

impl RoomLog for Arc<Broker> {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn append(&self, post: LoggedPost) -> BoxFuture<'static, Result<u64, String>> {
        Box::pin(self.clone().append_post(post))
    }

    fn health(&self) -> Result<(), String> {
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
    sessions_stream(&broker, hub.session_ttl(), args.broker_replicas).await?;
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
    tracker.spawn(consume(broker.clone(), hub.clone(), shutdown));
    tracker.spawn(claim_local_accounts(broker.clone(), hub.clone()));
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

/// Reads the stream in order from the entry after the last one the hub has
/// stored, hands each to the hub, and on any failure starts again from the
/// entry after the last one handed over: nothing is skipped, and entries
/// handed over twice die as duplicates in the store.
async fn consume(broker: Arc<Broker>, hub: Hub, shutdown: CancellationToken) {
    // The next entry to read: read_from advances it, check_stream watches it.
    let next = AtomicU64::new(hub.last_logged(&broker.origin) + 1);
    let mut backoff = Duration::from_millis(50);
    loop {
        let read = read_from(&broker, &hub, &next, &mut backoff);
        let failure = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = read => r,
            r = check_stream(&broker, &hub, &next) => r,
        };
        match failure {
            ReadEnd::HubGone => return,
            ReadEnd::Replaced(why) => {
                tracing::error!("broker: {why}");
                broker.replaced.send_replace(Some(why));
                return;
            }
            ReadEnd::Failed(e) => {
                let from = next.load(Ordering::Relaxed);
                tracing::warn!("broker: reading the stream from {from} failed ({e}); retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// What the stream's info says about the stream this hub follows.
#[derive(Debug, PartialEq)]
enum Follows {
    /// The same stream, holding at least what the hub applied.
    Yes,
    /// The same stream (created at the same time) ending before what the
    /// hub applied: a leader catching up after a failover, for a moment, or a
    /// store restored from an older copy, if it lasts.
    Behind(String),
    /// Another stream: created at another time (the server's store was
    /// replaced, or the stream deleted and made again).
    No(String),
}

impl Broker {
    /// Whether `info` is the stream this hub has applied up to `applied`.
    fn follows(&self, info: &stream::Info, applied: u64) -> Follows {
        follows(
            self.created,
            &self.servers,
            info.created.unix_timestamp_nanos(),
            info.state.last_sequence,
            applied,
        )
    }
}

fn follows(created: i128, servers: &str, info_created: i128, last: u64, applied: u64) -> Follows {
    if info_created == created && last >= applied {
        return Follows::Yes;
    }
    let why = format!(
        "the stream {STREAM} at {servers} is not the one this hub follows (made again, or a \
         fresh or restored server store; it ends at {last}, this hub applied up to {applied}): \
         positions would mean other messages, so this hub stops sending and delivering; \
         restart it with a fresh --data-dir"
    );
    if info_created == created {
        Follows::Behind(why)
    } else {
        Follows::No(why)
    }
}

/// Checks, at each reconnection and every [`STREAM_CHECK`], that the stream
/// is still the one the hub's store follows; returns when it is not (the
/// consumer alone would wait for its next sequence on a stream made again),
/// or (ending before what the hub applied) has not been for [`BEHIND_GRACE`];
/// or when the consumer has delivered nothing for [`STALLED`] while the
/// stream holds entries past what the hub applied (after a failover the
/// client may keep asking the servers to make its consumer again under the
/// same name, with no answer; a new consumer is made instead).
async fn check_stream(broker: &Broker, hub: &Hub, next: &AtomicU64) -> ReadEnd {
    let mut connected = broker.connected();
    let mut tick = tokio::time::interval(STREAM_CHECK);
    let mut progress = (next.load(Ordering::Relaxed), tokio::time::Instant::now());
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = connected.changed() => {}
        }
        if !*connected.borrow_and_update() {
            continue;
        }
        let Ok(stream) = broker.js.get_stream(STREAM).await else {
            continue; // not there (yet): sends fail; look again later
        };
        let applied = *hub.logged().borrow();
        match broker.follows(stream.cached_info(), applied) {
            Follows::Yes => behind_since = None,
            Follows::No(why) => return ReadEnd::Replaced(why),
            Follows::Behind(why) => {
                let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= BEHIND_GRACE {
                    return ReadEnd::Replaced(why);
                }
                continue; // the consumer waits for what it has not seen
            }
        }
        let (read, last) = (
            next.load(Ordering::Relaxed),
            stream.cached_info().state.last_sequence,
        );
        if read != progress.0 || last < read {
            progress = (read, tokio::time::Instant::now());
        } else if progress.1.elapsed() >= STALLED {
            return ReadEnd::Failed(format!(
                "nothing delivered for {STALLED:?} while the stream holds {} more entries",
                last + 1 - read
            ));
        }
    }
}

/// Why [`read_from`] stopped.
enum ReadEnd {
    /// The hub shut down.
    HubGone,
    /// The stream is another one than the hub's store follows.
    Replaced(String),
    /// The stream could not be read; try again.
    Failed(String),
}

/// One ordered consumer from `next` on, until it fails.
async fn read_from(
    broker: &Broker,
    hub: &Hub,
    next: &AtomicU64,
    backoff: &mut Duration,
) -> ReadEnd {
    let failed = |e: &dyn std::fmt::Display| ReadEnd::Failed(e.to_string());
    let stream = match broker.js.get_stream(STREAM).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    // Ending before `next` is judged by check_stream, over time; the
    // consumer made here waits for the entries it has not seen.
    if let Follows::No(why) = broker.follows(stream.cached_info(), next.load(Ordering::Relaxed) - 1)
    {
        return ReadEnd::Replaced(why);
    }
    // The server pushes entries as they are stored, with flow control and
    // idle beats; the client makes the consumer again on a gap in its
    // sequence, a lost connection or missed beats. Not a pull consumer:
    // nats-server before 2.9.16 (Debian's is 2.9.10) can drop an expired
    // pull request without its 408 when an entry arrives at that moment,
    // and async-nats then waits 5 s past the expiry before pulling again —
    // every entry in between was seconds late on that hub (docs/cluster.md).
    let config = consumer::push::OrderedConfig {
        deliver_subject: broker.client.new_inbox(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: next.load(Ordering::Relaxed),
        },
        ..Default::default()
    };
    let mut messages = match stream.create_consumer(config).await {
        Ok(c) => match c.messages().await {
            Ok(m) => m,
            Err(e) => return failed(&e),
        },
        Err(e) => return failed(&e),
    };
    while let Some(item) = messages.next().await {
        let msg = match item {
            Ok(m) => m,
            Err(e) => return failed(&e),
        };
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(e) => return failed(&e),
        };
        *backoff = Duration::from_millis(50);
        if seq < next.load(Ordering::Relaxed) {
            continue;
        }
        match wire::decode(msg.subject.as_str(), &msg.payload) {
            Ok(post) => {
                if let Err(e) = hub.apply_logged(seq, post).await {
                    if e == crate::chat::hub::HubError::ShuttingDown {
                        return ReadEnd::HubGone;
                    }
                    tracing::warn!("broker: stream entry {seq} skipped: {e}");
                }
            }
            Err(e) => tracing::warn!(
                "broker: stream entry {seq} on {} skipped: {e}",
                msg.subject.as_str().chars().take(80).collect::<String>()
            ),
        }
        // Only once handed over: a read cut short here reads it again (a
        // second copy dies in the store).
        next.store(seq + 1, Ordering::Relaxed);
    }
    failed(&"the consumer ended")
}

#[cfg(test)]
mod tests {
    use super::{Follows, follows};

    #[test]
    fn a_stream_is_followed_by_its_creation_time_and_end() {
        let s = "nats://127.0.0.1:4222";
        assert_eq!(follows(7, s, 7, 10, 10), Follows::Yes);
        assert_eq!(follows(7, s, 7, 12, 10), Follows::Yes);
        // A leader that has yet to apply entries after a failover: judged over time.
        assert!(matches!(follows(7, s, 7, 9, 10), Follows::Behind(w) if w.contains("ends at 9")));
        // Made again: another stream at once, even when it holds more.
        assert!(matches!(follows(7, s, 8, 12, 10), Follows::No(_)));
        assert!(matches!(follows(7, s, 8, 0, 10), Follows::No(_)));
    }
}

//! Broker mode, the rest of what crosses hubs: presence (each hub beats its
//! users' snapshot every [`HEARTBEAT`]; a hub not heard for [`EXPIRY`] is
//! down) and direct messages on plain NATS subjects outside the stream, and
//! topics on a stream of their own that keeps each room's last one (read
//! from the start by a hub that starts, so none set while it was down is
//! missed).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hubs::HubsView;
use super::wire;
use crate::chat::Hub;
use crate::chat::hub::{OutgoingDirect, RemotePresence, TopicChange};
use crate::chat::protocol::RemoteMember;
use crate::cluster::NodeMeta;
use crate::cluster::relay::presence::{PresenceTable, Rejected, Snapshot};

/// How often a hub publishes its presence when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A hub not heard for this long is taken as down: its users leave every room.
pub const EXPIRY: Duration = Duration::from_secs(3);

/// Least time between two presence beats of a hub (a burst of joins makes one).
const MIN_BEAT_INTERVAL: Duration = Duration::from_millis(100);

/// How often hubs not heard are looked for.
const EXPIRY_CHECK: Duration = Duration::from_millis(250);

/// The most time between a hub's last beat and its users' leaves on every
/// other hub (stated in docs/cluster.md).
pub const LEAVE_BOUND: Duration = Duration::from_millis(3_250);

/// The subscriptions a hub reads.
pub(super) struct Inputs {
    beats: async_nats::Subscriber,
    directs: async_nats::Subscriber,
    topics: async_nats::jetstream::consumer::push::Ordered,
    accounts: async_nats::jetstream::consumer::push::Ordered,
    sessions: async_nats::jetstream::consumer::push::Ordered,
}

/// The other hubs' presence as this hub knows it, with when each was last heard.
struct Others {
    table: PresenceTable<String>,
    heard: HashMap<String, Instant>,
    /// Per hub, how many times it was taken as down here: a hub heard again
    /// after that is a new life in the table (whose old one is over).
    lives: HashMap<String, u32>,
    /// The live hubs as `/api/cluster` shows them.
    view: HubsView,
}

/// This hub's side: its name, the snapshot it last published and when.
struct Mine {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    node: String,
    /// Per room, the last topic this hub published (see [`receive_topic`]).
    own_topics: HashMap<String, String>,
    /// Where this hub's doors listen, sent with every beat.
    meta: NodeMeta,
    snap: Snapshot,
    /// The beat of `snap`, encoded once per version (an unchanged hub
    /// repeats it every [`HEARTBEAT`]).
    payload: Option<(String, bytes::Bytes)>,
    /// Whether the hub's presence may have changed since `snap` was taken.
    dirty: bool,
    last_beat: Option<Instant>,
    /// When to beat for a change (at most one beat per [`MIN_BEAT_INTERVAL`]).
    due: Option<Instant>,
}

impl Mine {
    /// Publishes the hub's presence (a new version if it changed).
    async fn beat(&mut self, hub: &Hub) {
        if std::mem::take(&mut self.dirty) {
            let now = Snapshot::of(self.snap.version + 1, hub.local_presence());
            if !now.same_users(&self.snap) {
                self.snap = now;
                self.payload = None;
            }
        }
        self.due = None;
        self.last_beat = Some(Instant::now());
        self.publish().await;
    }

    /// The hub's presence changed: beat soon.
    fn schedule(&mut self) {
        self.dirty = true;
        if self.due.is_none() {
            let now = Instant::now();
            let earliest = self
                .last_beat
                .map_or(now, |at| (at + MIN_BEAT_INTERVAL).max(now));
            self.due = Some(earliest);
        }
    }

    async fn publish(&mut self) {
        let (subject, payload) = self
            .payload
            .get_or_insert_with(|| wire::beat(&self.node, &self.snap, &self.meta))
            .clone();
        if let Err(e) = self.client.publish(subject, payload).await {
            tracing::debug!("broker: presence beat not sent: {e}");
        }
    }

    /// Says this hub's users are gone (a clean stop).
    async fn farewell(&mut self) {
        self.snap = Snapshot {
            version: self.snap.version + 1,
            users: Vec::new(),
        };
        self.payload = None;
        self.publish().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }

    async fn send_direct(&self, d: OutgoingDirect) {
        if !wire::valid_node(&d.to.node) {
            return;
        }
        let msg = wire::Direct {
            from_node: self.node.clone(),
            from: d.from,
            to: d.to.nick,
            text: d.text,
            ts: d.ts,
        };
        let (subject, payload) = wire::direct(&d.to.node, &msg);
        if let Err(e) = self.client.publish(subject, payload).await {
            tracing::warn!("broker: direct message not sent: {e}");
        }
    }

    /// Publishes a topic set here to the topics stream; the engine's
    /// acknowledgement is awaited on a task of its own, so a slow engine
    /// does not hold presence and direct messages back.
    async fn send_topic(&mut self, t: TopicChange) {
        let payload = wire::topic(&self.node, &t);
        self.own_topics.insert(t.room.clone(), t.topic);
        let room = t.room;
        match self.js.publish(wire::topic_subject(&room), payload).await {
            Ok(ack) => drop(tokio::spawn(async move {
                if let Err(e) = ack.await {
                    tracing::warn!(%room, "broker: topic change not stored: {e}");
                }
            })),
            Err(e) => tracing::warn!(%room, "broker: topic change not sent: {e}"),
        }
    }
}

impl Others {
    /// A beat on `subject`: a beat from another hub replaces its presence
    /// by its snapshot. A beat that repeats the version already applied (a
    /// hub with no change beats every [`HEARTBEAT`]) is only a sign of life:
    /// its users are skipped unread.
    fn heard(&mut self, hub: &Hub, me: &str, subject: &str, payload: &[u8]) {
        let (node, version) = match wire::beat_version(subject, payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("broker: presence beat skipped: {e}");
                return;
            }
        };
        if node == me {
            return;
        }
        let life = self.lives.get(&node).copied().unwrap_or(1);
        let applied = self
            .table
            .version_of(&node)
            .is_some_and(|held| held >= (life, version));
        if applied && self.view.touch(&node) {
            self.heard.insert(node, Instant::now());
            return;
        }
        let beat = match wire::decode_beat(subject, payload) {
            Ok((_, beat)) => beat,
            Err(e) => {
                tracing::warn!(node = %node, "broker: presence beat skipped: {e}");
                return;
            }
        };
        match self.table.apply(node.clone(), &node, life, beat.snapshot) {
            Ok(changes) => self.apply(hub, changes),
            Err(Rejected::Stale) => {}
            Err(e) => {
                // Malformed: not a sign of life either.
                tracing::warn!(node = %node, "broker: presence beat skipped: {e}");
                return;
            }
        }
        self.heard.insert(node.clone(), Instant::now());
        self.lives.entry(node.clone()).or_insert(life);
        let users = self.table.nicks_of(&node).unwrap_or_default();
        self.view.heard(&node, beat.meta, users);
    }

    /// Every hub not heard for [`EXPIRY`] is down: its users leave.
    fn expire(&mut self, hub: &Hub) {
        let now = Instant::now();
        let gone: Vec<String> = self
            .heard
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= EXPIRY)
            .map(|(n, _)| n.clone())
            .collect();
        for node in gone {
            self.heard.remove(&node);
            self.view.gone(&node);
            *self.lives.entry(node.clone()).or_insert(1) += 1;
            tracing::info!(node = %node, "broker: hub not heard for {EXPIRY:?}; its users leave");
            let changes = self.table.remove_node(&node, "node down");
            self.apply(hub, changes);
        }
    }

    fn apply(&self, hub: &Hub, changes: Vec<RemotePresence>) {
        if !changes.is_empty() {
            hub.apply_remote_presence(changes, self.table.users());
        }
    }
}

/// Subscribes to the subjects a hub reads, and reads the topics stream from
/// each room's last topic on.
pub(super) async fn subscribe(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    node: &str,
) -> anyhow::Result<Inputs> {
    let topics = keyed_reader(client, js, wire::TOPICS_STREAM, wire::TOPIC_PREFIX).await?;
    let accounts = keyed_reader(client, js, wire::ACCOUNTS_STREAM, wire::ACCOUNT_PREFIX).await?;
    let sessions = keyed_reader(client, js, wire::SESSIONS_STREAM, wire::SESSION_PREFIX).await?;
    Ok(Inputs {
        accounts,
        sessions,
        beats: client
            .subscribe(format!("{}*", wire::PRESENCE_PREFIX))
            .await?,
        directs: client
            .subscribe(format!("{}{node}", wire::DIRECT_PREFIX))
            .await?,
        topics,
    })
}

/// An ordered consumer of the stream `name`, which keeps one entry per
/// subject under `prefix`: each subject's newest entry, then what follows.
async fn keyed_reader(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    name: &str,
    prefix: &str,
) -> anyhow::Result<async_nats::jetstream::consumer::push::Ordered> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
    Ok(js
        .get_stream(name)
        .await?
        .create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            filter_subject: format!("{prefix}>"),
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

/// Carries presence, direct messages and topics between `hub` and the
/// other hubs until `shutdown`, then says this hub's users are gone; keeps
/// `view` (named after this hub) up to date with the hubs heard, and tells
/// them this hub's doors (`meta`).
pub(super) async fn run(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    view: HubsView,
    meta: NodeMeta,
    hub: Hub,
    mut inputs: Inputs,
    shutdown: CancellationToken,
) {
    let mut directs_out = hub.take_outgoing_directs();
    let mut topics_out = hub.take_outgoing_topics();
    let mut changes = hub.presence_changes();
    let mut mine = Mine {
        client,
        js,
        node: view.me().to_string(),
        own_topics: HashMap::new(),
        meta,
        snap: Snapshot {
            version: 0,
            users: Vec::new(),
        },
        payload: None,
        dirty: true,
        last_beat: None,
        due: None,
    };
    let mut others = Others {
        table: PresenceTable::default(),
        heard: HashMap::new(),
        lives: HashMap::new(),
        view,
    };
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut check = tokio::time::interval(EXPIRY_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = beat.tick() => mine.beat(&hub).await,
            Ok(()) = changes.changed() => mine.schedule(),
            _ = sleep_until(mine.due) => mine.beat(&hub).await,
            _ = check.tick() => others.expire(&hub),
            Some(m) = inputs.beats.next() => others.heard(&hub, &mine.node, m.subject.as_str(), &m.payload),
            Some(m) = inputs.directs.next() => receive_direct(&hub, &m.payload),
            Some(m) = inputs.topics.next() => receive_topic(&hub, &mine, m).await,
            Some(m) = inputs.accounts.next() => receive_keyed("account", m, wire::decode_account,
                |r| async { hub.apply_remote_account(r).await.map(drop) }).await,
            Some(m) = inputs.sessions.next() => receive_keyed("session", m, wire::decode_session,
                |r| hub.apply_remote_session(r)).await,
            Some(d) = recv(&mut directs_out) => mine.send_direct(d).await,
            Some(t) = recv(&mut topics_out) => mine.send_topic(t).await,
        }
    }
    mine.farewell().await;
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next item of a receiver this task may not have got (never, then).
async fn recv<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// An entry of the topics stream, read in the stream's order: stored and
/// shown here unless the room has that topic already, it is one this hub
/// set before its latest for the room, or it is malformed (skipped with a
/// warning). Every hub thus ends with the topic the stream holds last: when
/// two hubs set one at once, the hub whose entry came first takes the other
/// one, and the other hub, having applied the first, takes its own back
/// when it reads it.
async fn receive_topic(hub: &Hub, mine: &Mine, m: Entry) {
    let m = match m {
        Ok(m) => m,
        // The ordered consumer makes itself again after a gap or a lost
        // connection, from where it was.
        Err(e) => return tracing::warn!("broker: reading the topics: {e}"),
    };
    match wire::decode_topic(m.subject.as_str(), &m.payload) {
        Ok(t)
            if t.node == mine.node
                && mine.own_topics.get(&t.change.room) != Some(&t.change.topic) => {}
        Ok(t) => {
            if let Err(e) = hub.apply_remote_topic(t.change).await {
                tracing::warn!("broker: topic change from {} skipped: {e}", t.node);
            }
        }
        Err(e) => tracing::warn!("broker: topic change skipped: {e}"),
    }
}

/// An entry of a keyed stream read by an ordered consumer.
type Entry =
    Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::push::OrderedError>;

/// An entry of the accounts stream (`what` "account") or the sessions
/// stream ("session"): read with `decode`, then given to the hub with
/// `apply`; a malformed entry, or one the hub refuses, is skipped with a
/// warning.
async fn receive_keyed<T, F, Fut>(
    what: &str,
    m: Entry,
    decode: fn(&str, &[u8]) -> Result<T, wire::BadEntry>,
    apply: F,
) where
    F: FnOnce(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::chat::hub::HubError>>,
{
    let m = match m {
        Ok(m) => m,
        // The ordered consumer makes itself again after a gap or a lost
        // connection, from where it was.
        Err(e) => return tracing::warn!("broker: reading the {what}s: {e}"),
    };
    match decode(m.subject.as_str(), &m.payload) {
        Ok(entry) => {
            if let Err(e) = apply(entry).await {
                tracing::warn!("broker: {what} skipped: {e}");
            }
        }
        Err(e) => tracing::warn!("broker: {what} entry skipped: {e}"),
    }
}

/// A direct message for a user of this hub.
fn receive_direct(hub: &Hub, payload: &[u8]) {
    match wire::decode_direct(payload) {
        Ok(d) => {
            let from = RemoteMember {
                nick: d.from,
                node: d.from_node,
            };
            if !hub.deliver_remote_direct(from, &d.to, d.text, d.ts) {
                tracing::debug!(to = %d.to, "broker: direct message for a user not here");
            }
        }
        Err(e) => tracing::warn!("broker: direct message skipped: {e}"),
    }
}

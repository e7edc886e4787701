//! The chat relay between nodes. [`Relay`] is the sans-IO core: which room
//! messages a node must apply, forward, ask for or serve, so that every node
//! ends up with every message exactly once and in each origin's order (no
//! sockets, clocks or storage). [`run`] is the tokio driver `netkit serve` runs when clustering and chat
//! are both on; [`RelayStore`] keeps the messages by origin and sequence.
//!
//! # Protocol
//!
//! Every message is identified by its origin (the node's name and a tag made
//! once per data dir, `name/TAG`) and the origin's sequence number (1, 2, 3, … per origin, never reused). Each node keeps,
//! per origin, the highest sequence it has applied *without a gap* (`have`).
//!
//! - [`RelayPacket::Msg`]: a message, pushed by its origin to every live
//!   member, or served to a member that asked. Applied if it is the next one
//!   of its origin; a duplicate is dropped; one that arrives early is held
//!   (bounded) and the gap is asked for with a `Pull` to the sender.
//! - [`RelayPacket::Summary`]: every node's `have` map, sent periodically to
//!   a random live member (anti-entropy). The receiver pulls what the sender
//!   has more of and serves what the sender lacks, so a lost datagram, a
//!   restart or a healed partition converges within a few rounds.
//! - [`RelayPacket::Pull`]: "send me `origin`'s messages after `after`". The
//!   answer is a [`RelayAction::Serve`]: the driver reads them from storage
//!   (any node may serve any origin's messages) and sends them as `Msg`s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::protocol::MessageKind;

/// First byte of every relay datagram, so the gossip payload channel can be shared.
pub const MAGIC: u8 = 0xC7;
/// Most messages held per origin while waiting for a gap to be filled.
pub const MAX_EARLY: usize = 512;
/// Most messages served for one `Pull` or summary difference; the rest follow
/// on the next summary round.
pub const SERVE_BATCH: usize = 64;
/// Least time between two pulls for the same origin.
pub const PULL_RETRY: Duration = Duration::from_millis(500);

/// A room message as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedMessage {
    /// Name of the node where it was posted.
    pub origin: String,
    /// Its sequence number at the origin, from 1.
    pub seq: u64,
    /// Room name.
    pub room: String,
    /// Author nick.
    pub from: String,
    /// The text.
    pub text: String,
    /// Plain message or `/me` action.
    pub kind: MessageKind,
    /// Milliseconds since the Unix epoch, at the origin.
    pub ts: i64,
    /// Its id in the room on the origin node (what clients resume by, with
    /// `origin`); 0 if unknown (relayed before this field existed).
    /// Appended last: nodes that predate it cannot decode messages from
    /// nodes that have it, and the reverse; upgrade every node together.
    pub origin_id: u64,
}

/// One relay datagram between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayPacket {
    /// A message, new or served on request.
    Msg(RelayedMessage),
    /// The sender's highest gap-free sequence per origin.
    Summary(Vec<(String, u64)>),
    /// Asks for `origin`'s messages with a sequence above `after`.
    Pull {
        /// Whose messages.
        origin: String,
        /// The highest one the asker has without a gap.
        after: u64,
    },
    /// The nicknames connected to the sender (for `/api/cluster`).
    Users(Vec<String>),
    /// One piece of a packet too large for one datagram ([`split`]).
    Part {
        /// Random id shared by the pieces of one packet.
        id: u64,
        /// This piece's place, from 0.
        index: u16,
        /// How many pieces.
        count: u16,
        /// Its bytes of the encoded packet.
        data: Vec<u8>,
    },
    /// The sender's whole presence (its users and their rooms), replacing
    /// what the receiver held for it ([`super::presence`]).
    Presence(super::presence::Snapshot),
    /// A direct message from a user of the sender to a user of the receiver,
    /// resent until acknowledged ([`DirectLink`]).
    Direct {
        /// Sender nick.
        from: String,
        /// Recipient nick.
        to: String,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch, at the sender.
        ts: i64,
        /// The sender's number for it, echoed by [`RelayPacket::DirectAck`].
        id: u64,
    },
    /// "Your direct message `id` arrived" (delivered, or nobody by that
    /// nick is here: either way, no resend would help).
    DirectAck {
        /// The sender's number for it.
        id: u64,
    },
}

/// How long an unacknowledged direct message waits before it is resent (the
/// relay checks on its one-second tick).
pub const DIRECT_RESEND: Duration = Duration::from_secs(1);
/// Resends of one direct message before it is given up.
pub const DIRECT_TRIES: u8 = 5;
/// Direct messages remembered as seen (per receiving node), to drop resends.
pub const DIRECT_SEEN: usize = 4096;

/// Direct messages between nodes, sans-IO: each gets a number; the sender
/// resends it every [`DIRECT_RESEND`] until acknowledged (at most
/// [`DIRECT_TRIES`] times), and the receiver acknowledges every copy but
/// shows only the first. So a lost datagram costs a resend, not the message,
/// and a resend is never shown twice.
#[derive(Debug)]
pub struct DirectLink<P> {
    next_id: u64,
    /// id → (peer, packet, resends left, due).
    pending: BTreeMap<u64, (P, RelayPacket, u8, Duration)>,
    seen: std::collections::HashSet<(P, u64)>,
    seen_order: std::collections::VecDeque<(P, u64)>,
}

impl<P> Default for DirectLink<P> {
    fn default() -> Self {
        DirectLink {
            next_id: 0,
            pending: BTreeMap::new(),
            seen: std::collections::HashSet::new(),
            seen_order: std::collections::VecDeque::new(),
        }
    }
}

impl<P: Clone + Eq + std::hash::Hash> DirectLink<P> {
    /// The packet that carries a new direct message to `peer`; it is kept
    /// for resending until [`DirectLink::acked`].
    pub fn send(
        &mut self,
        peer: P,
        from: String,
        to: String,
        text: String,
        ts: i64,
        now: Duration,
    ) -> RelayPacket {
        self.next_id += 1;
        let packet = RelayPacket::Direct {
            from,
            to,
            text,
            ts,
            id: self.next_id,
        };
        self.pending.insert(
            self.next_id,
            (peer, packet.clone(), DIRECT_TRIES, now + DIRECT_RESEND),
        );
        packet
    }

    /// `peer` acknowledged `id`.
    pub fn acked(&mut self, peer: &P, id: u64) {
        if self.pending.get(&id).is_some_and(|(p, ..)| p == peer) {
            self.pending.remove(&id);
        }
    }

    /// What is due for resending at `now`; messages out of tries are dropped
    /// (and counted in the second value).
    pub fn due(&mut self, now: Duration) -> (Vec<(P, RelayPacket)>, usize) {
        let mut out = Vec::new();
        let mut given_up = 0;
        self.pending.retain(|_, (peer, packet, left, due)| {
            if *due > now {
                return true;
            }
            if *left == 0 {
                given_up += 1;
                return false;
            }
            *left -= 1;
            *due = now + DIRECT_RESEND;
            out.push((peer.clone(), packet.clone()));
            true
        });
        (out, given_up)
    }

    /// A direct message `id` came from `peer`: whether it is new (to be
    /// shown). Acknowledge it either way.
    pub fn first_time(&mut self, peer: P, id: u64) -> bool {
        if !self.seen.insert((peer.clone(), id)) {
            return false;
        }
        self.seen_order.push_back((peer, id));
        if self.seen_order.len() > DIRECT_SEEN
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }

    /// Messages waiting for an acknowledgement.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Largest relay datagram sent (gossip payloads allow about 1250 bytes).
pub const MAX_DATAGRAM: usize = 1000;

/// The datagrams for `packet`: one if it fits in [`MAX_DATAGRAM`], else
/// [`RelayPacket::Part`]s that [`Reassembly`] puts back together. `id` must
/// be random (it tells apart packets in flight from one sender).
pub fn split(packet: &RelayPacket, id: u64) -> Vec<Vec<u8>> {
    let whole = packet.encode();
    if whole.len() <= MAX_DATAGRAM {
        return vec![whole];
    }
    let body = &whole[1..];
    let piece = MAX_DATAGRAM - 32;
    let count = body.len().div_ceil(piece);
    body.chunks(piece)
        .enumerate()
        .map(|(i, data)| {
            RelayPacket::Part {
                id,
                index: i as u16,
                count: count as u16,
                data: data.to_vec(),
            }
            .encode()
        })
        .collect()
}

/// Most pieces one packet may be split into (about 1 MB); a packet
/// announcing more is dropped.
pub const MAX_PARTS: u16 = 1100;

/// Most packets being reassembled at once.
pub const MAX_ASSEMBLIES: usize = 256;

/// Puts split packets back together; bounded, the oldest assembly dropped
/// first (a lost piece is recovered like a lost message: by a pull).
#[derive(Debug)]
pub struct Reassembly<P> {
    pending: BTreeMap<(P, u64), Assembly>,
}

/// One packet being reassembled: when it began, how many pieces, those in.
type Assembly = (Duration, u16, BTreeMap<u16, Vec<u8>>);

impl<P> Default for Reassembly<P> {
    fn default() -> Self {
        Reassembly {
            pending: BTreeMap::new(),
        }
    }
}

impl<P: Ord + Clone> Reassembly<P> {
    /// Takes a piece from `from`; returns the whole packet once every piece is in.
    pub fn add(
        &mut self,
        from: P,
        id: u64,
        index: u16,
        count: u16,
        data: Vec<u8>,
        now: Duration,
    ) -> Option<RelayPacket> {
        if count == 0 || index >= count || count > MAX_PARTS || data.len() > MAX_DATAGRAM {
            return None;
        }
        let key = (from, id);
        if self.pending.len() >= MAX_ASSEMBLIES && !self.pending.contains_key(&key) {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, (at, _, _))| *at)
                .map(|(k, _)| k.clone())?;
            self.pending.remove(&oldest);
        }
        let entry = self
            .pending
            .entry(key.clone())
            .or_insert_with(|| (now, count, BTreeMap::new()));
        if entry.1 != count {
            return None;
        }
        entry.2.insert(index, data);
        if entry.2.len() < count as usize {
            return None;
        }
        let (_, _, pieces) = self.pending.remove(&key)?;
        let body: Vec<u8> = pieces.into_values().flatten().collect();
        match postcard::from_bytes(&body).ok()? {
            RelayPacket::Part { .. } => None,
            packet => Some(packet),
        }
    }
}

impl RelayPacket {
    /// The datagram: [`MAGIC`] then the packet in postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC];
        out.extend(postcard::to_allocvec(self).expect("relay packets always serialize"));
        out
    }

    /// Parses a datagram; `None` if it is not a relay packet or is malformed.
    pub fn decode(data: &[u8]) -> Option<RelayPacket> {
        match data.split_first() {
            Some((&MAGIC, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// What the driver must do after a call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAction<P> {
    /// Store this message and deliver it to the room's local members, then
    /// record `(origin, seq)` as applied in the same transaction.
    Apply(RelayedMessage),
    /// Send a packet to a peer.
    Send(P, RelayPacket),
    /// Read `origin`'s stored messages with a sequence above `after` (at most
    /// [`SERVE_BATCH`]) and send each to the peer as a [`RelayPacket::Msg`].
    Serve {
        /// Who asked.
        to: P,
        /// Whose messages.
        origin: String,
        /// Send those above this.
        after: u64,
    },
}

/// One node's relay state.
#[derive(Debug, Clone)]
pub struct Relay {
    me: String,
    have: BTreeMap<String, u64>,
    early: BTreeMap<String, BTreeMap<u64, RelayedMessage>>,
    last_pull: BTreeMap<String, Duration>,
}

impl Relay {
    /// A relay for node `me`, resuming from the persisted `have` map (its own
    /// entry is the last sequence it assigned).
    pub fn new(me: impl Into<String>, have: BTreeMap<String, u64>) -> Self {
        Relay {
            me: me.into(),
            have,
            early: BTreeMap::new(),
            last_pull: BTreeMap::new(),
        }
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The highest gap-free sequence applied per origin (persist it with the messages).
    pub fn have(&self) -> &BTreeMap<String, u64> {
        &self.have
    }

    /// Gives a message posted on this node its `(origin, seq)`; the driver
    /// stores it, then sends `RelayPacket::Msg` of it to every live member.
    pub fn local(
        &mut self,
        room: String,
        from: String,
        text: String,
        kind: MessageKind,
        ts: i64,
        origin_id: u64,
    ) -> RelayedMessage {
        let seq = self.have.entry(self.me.clone()).or_insert(0);
        *seq += 1;
        RelayedMessage {
            origin: self.me.clone(),
            seq: *seq,
            room,
            from,
            text,
            kind,
            ts,
            origin_id,
        }
    }

    /// The anti-entropy summary to send to a random live member.
    pub fn summary(&self) -> RelayPacket {
        RelayPacket::Summary(self.have.iter().map(|(o, s)| (o.clone(), *s)).collect())
    }

    /// Handles one packet from peer `from` at time `now` (any monotonic origin).
    pub fn receive<P: Clone>(
        &mut self,
        from: P,
        packet: RelayPacket,
        now: Duration,
    ) -> Vec<RelayAction<P>> {
        let mut out = Vec::new();
        match packet {
            RelayPacket::Msg(m) => self.on_msg(from, m, now, &mut out),
            RelayPacket::Summary(theirs) => {
                let theirs: BTreeMap<String, u64> = theirs.into_iter().collect();
                for (origin, &their) in &theirs {
                    let mine = self.have_of(origin);
                    if their > mine {
                        self.pull(from.clone(), origin, now, &mut out);
                    }
                }
                for (origin, &mine) in &self.have {
                    let their = theirs.get(origin).copied().unwrap_or(0);
                    if mine > their {
                        out.push(RelayAction::Serve {
                            to: from.clone(),
                            origin: origin.clone(),
                            after: their,
                        });
                    }
                }
            }
            RelayPacket::Pull { origin, after } => {
                if self.have_of(&origin) > after {
                    out.push(RelayAction::Serve {
                        to: from,
                        origin,
                        after,
                    });
                }
            }
            // Handled by the driver.
            RelayPacket::Part { .. }
            | RelayPacket::Users(_)
            | RelayPacket::Presence(_)
            | RelayPacket::Direct { .. }
            | RelayPacket::DirectAck { .. } => {}
        }
        out
    }

    fn have_of(&self, origin: &str) -> u64 {
        self.have.get(origin).copied().unwrap_or(0)
    }

    fn on_msg<P: Clone>(
        &mut self,
        from: P,
        m: RelayedMessage,
        now: Duration,
        out: &mut Vec<RelayAction<P>>,
    ) {
        if m.origin == self.me || m.seq == 0 {
            return;
        }
        let have = self.have_of(&m.origin);
        if m.seq <= have {
            return; // a duplicate
        }
        if m.seq > have + 1 {
            let origin = m.origin.clone();
            let early = self.early.entry(origin.clone()).or_default();
            if early.len() < MAX_EARLY || early.keys().next_back().is_some_and(|&k| m.seq < k) {
                early.insert(m.seq, m);
                if early.len() > MAX_EARLY {
                    early.pop_last();
                }
            }
            self.pull(from, &origin, now, out);
            return;
        }
        let origin = m.origin.clone();
        let mut next = m.seq;
        out.push(RelayAction::Apply(m));
        if let Some(early) = self.early.get_mut(&origin) {
            while let Some(m) = early.remove(&(next + 1)) {
                next += 1;
                out.push(RelayAction::Apply(m));
            }
            early.retain(|&seq, _| seq > next);
            if early.is_empty() {
                self.early.remove(&origin);
            }
        }
        self.have.insert(origin, next);
    }

    fn pull<P>(&mut self, from: P, origin: &str, now: Duration, out: &mut Vec<RelayAction<P>>) {
        let due = self
            .last_pull
            .get(origin)
            .is_none_or(|&at| now >= at + PULL_RETRY);
        if due {
            self.last_pull.insert(origin.to_string(), now);
            out.push(RelayAction::Send(
                from,
                RelayPacket::Pull {
                    origin: origin.to_string(),
                    after: self.have_of(origin),
                },
            ));
        }
    }
}

/// Where a node keeps every relayed message by `(origin, seq)`, its own
/// included: `<data-dir>/relay.sqlite3`. It answers `Serve` and rebuilds the
/// `have` map at start.
pub struct RelayStore {
    conn: rusqlite::Connection,
    path: std::path::PathBuf,
}

impl RelayStore {
    /// Opens (or creates) the relay store in `dir`.
    pub fn open_in(dir: &std::path::Path) -> anyhow::Result<RelayStore> {
        let path = dir.join("relay.sqlite3");
        let conn = rusqlite::Connection::open(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the relay store {}: {e} — check that --data-dir is writable",
                path.display()
            )
        })?;
        let store = RelayStore { conn, path };
        store
            .conn
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| store.conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|_| {
                store.conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS relay_messages (
                         origin TEXT NOT NULL,
                         seq INTEGER NOT NULL,
                         room TEXT NOT NULL,
                         nick TEXT NOT NULL,
                         text TEXT NOT NULL,
                         kind TEXT NOT NULL,
                         ts_ms INTEGER NOT NULL,
                         done INTEGER NOT NULL DEFAULT 1,
                         PRIMARY KEY (origin, seq)
                     ) WITHOUT ROWID;
                     CREATE TABLE IF NOT EXISTS relay_meta (
                         key TEXT PRIMARY KEY,
                         value TEXT NOT NULL
                     );",
                )
            })
            .and_then(|_| {
                // Stores made before origin ids: their rows keep 0 (unknown).
                let has: i64 = store.conn.query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('relay_messages') WHERE name = 'origin_id'",
                    [],
                    |r| r.get(0),
                )?;
                if has == 0 {
                    store.conn.execute_batch(
                        "ALTER TABLE relay_messages ADD COLUMN origin_id INTEGER NOT NULL DEFAULT 0",
                    )?;
                }
                Ok(())
            })
            .map_err(|e| store.error(e))?;
        Ok(store)
    }

    fn error(&self, e: rusqlite::Error) -> anyhow::Error {
        anyhow::anyhow!("relay store {}: {e}", self.path.display())
    }

    /// This store's origin name for node `name`: `name/TAG`, where TAG is
    /// random and made once per store. A node that restarts with an empty
    /// data dir is thus a new origin, and its sequence numbers, starting again
    /// at 1, are not taken for duplicates of its previous life's.
    pub fn origin(&self, name: &str) -> anyhow::Result<String> {
        let tag = format!("{:08x}", rand::random::<u32>());
        self.conn
            .execute(
                "INSERT OR IGNORE INTO relay_meta (key, value) VALUES ('origin_tag', ?1)",
                [&tag],
            )
            .map_err(|e| self.error(e))?;
        let tag: String = self
            .conn
            .query_row(
                "SELECT value FROM relay_meta WHERE key = 'origin_tag'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.error(e))?;
        Ok(format!("{name}/{tag}"))
    }

    /// The highest sequence stored per origin. Messages are stored gap-free
    /// per origin (in apply order), so it is the `have` map.
    pub fn have(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT origin, MAX(seq) FROM relay_messages GROUP BY origin")
            .map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .and_then(|rows| rows.collect::<Result<BTreeMap<_, _>, _>>())
            .map_err(|e| self.error(e))?;
        Ok(rows)
    }

    /// Stores `msgs` in one transaction (a message already stored is kept);
    /// `done: false` marks them as not yet known to be in the hub's history.
    pub fn insert(&mut self, msgs: &[RelayedMessage], done: bool) -> anyhow::Result<()> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| anyhow::anyhow!("relay store {}: {e}", path.display());
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO relay_messages (origin, seq, room, nick, text, kind, ts_ms, done, origin_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(err)?;
            for m in msgs {
                stmt.execute(rusqlite::params![
                    m.origin,
                    m.seq as i64,
                    m.room,
                    m.from,
                    m.text,
                    m.kind.as_str(),
                    m.ts,
                    done,
                    i64::try_from(m.origin_id).unwrap_or(i64::MAX)
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Records that `msgs` are in the hub's history.
    pub fn mark_done(&mut self, msgs: &[RelayedMessage]) -> anyhow::Result<()> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| anyhow::anyhow!("relay store {}: {e}", path.display());
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("UPDATE relay_messages SET done = 1 WHERE origin = ?1 AND seq = ?2")
                .map_err(err)?;
            for m in msgs {
                stmt.execute(rusqlite::params![m.origin, m.seq as i64])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Messages stored but not known to be in the hub's history (a crash
    /// came between the two commits), in order.
    pub fn not_done(&self) -> anyhow::Result<Vec<RelayedMessage>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT origin, seq, room, nick, text, kind, ts_ms, origin_id FROM relay_messages
                 WHERE done = 0 ORDER BY origin, seq",
            )
            .map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map([], message_row)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.error(e))?;
        Ok(rows)
    }

    /// `origin`'s stored messages with a sequence above `after`, at most `limit`, in order.
    pub fn after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<RelayedMessage>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT origin, seq, room, nick, text, kind, ts_ms, origin_id FROM relay_messages
                 WHERE origin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map(
                rusqlite::params![origin, after as i64, limit as i64],
                message_row,
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.error(e))?;
        Ok(rows)
    }
}

/// A `relay_messages` row selected as `origin, seq, room, nick, text, kind,
/// ts_ms, origin_id`.
fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RelayedMessage> {
    Ok(RelayedMessage {
        origin: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        room: r.get(2)?,
        from: r.get(3)?,
        text: r.get(4)?,
        kind: MessageKind::from_db(&r.get::<_, String>(5)?),
        ts: r.get(6)?,
        origin_id: r.get::<_, i64>(7)? as u64,
    })
}

/// How often each node sends its summary to a random live member while
/// there is activity (messages, catch-up, member changes).
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// How long activity keeps summaries at [`SUMMARY_INTERVAL`].
pub const BUSY_FOR: Duration = Duration::from_secs(10);
/// How often a quiet node sends its summary.
pub const QUIET_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The relay task of `netkit serve`: relays messages posted on this node to
/// every live member, applies the other nodes' messages to the hub, and
/// exchanges summaries so that histories converge. Runs until `shutdown`.
pub async fn run(
    hub: crate::chat::hub::Hub,
    membership: super::Membership,
    mut store: RelayStore,
    remote_users: super::report::RemoteUsers,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    let name = membership.view().me.name;
    let (me, have) = match store.origin(&name).and_then(|me| Ok((me, store.have()?))) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!("relay: not relaying: {e}");
            return;
        }
    };
    // Normally set by `serve` before any client connects.
    if !hub.set_origin(me.clone()) {
        tracing::warn!(node = %me, hub = ?hub.origin(), "relay: the hub has another origin");
    }
    if let Err(e) = reconcile(&hub, &mut store).await {
        tracing::error!("relay: not relaying: {e}");
        return;
    }
    tracing::info!(node = %me, origins = have.len(), "relay: running");
    let mut relay = Relay::new(me, have);
    let mut local = hub.stored_local();
    let mut payloads = membership.payloads();
    let mut member_events = membership.events();
    // Summaries every second while busy, every ten seconds when quiet.
    let mut busy_until = tokio::time::Instant::now() + BUSY_FOR;
    let mut last_summary = tokio::time::Instant::now();
    let mut presence = PresenceLink::new(&hub, remote_users);
    let mut directs = hub.take_outgoing_directs();
    let mut direct_link: DirectLink<std::net::SocketAddr> = DirectLink::default();
    let mut direct_seen: DirectLink<super::id::NodeId> = DirectLink::default();
    let mut parts = Reassembly::default();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            got = local.recv() => match got {
                Ok(m) => {
                    let m = relay.local(m.room, m.from, m.text, m.kind, m.ts, m.id);
                    if let Err(e) = store.insert(std::slice::from_ref(&m), true) {
                        tracing::error!("relay: {e}");
                    }
                    busy_until = tokio::time::Instant::now() + BUSY_FOR;
                    let packet = RelayPacket::Msg(m);
                    for peer in live_peers(&membership) {
                        send(&membership, peer, &packet).await;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::error!("relay: fell behind; {n} messages posted here were not relayed");
                }
                Err(RecvError::Closed) => break,
            },
            got = payloads.recv() => match got {
                Ok(p) => {
                    let packet = match RelayPacket::decode(&p.data) {
                        Some(RelayPacket::Part { id, index, count, data }) => {
                            match parts.add(p.from.addr, id, index, count, data, started.elapsed()) {
                                Some(packet) => packet,
                                None => continue,
                            }
                        }
                        Some(packet) => packet,
                        None => {
                            tracing::debug!(from = ?p.from, "relay: malformed packet dropped");
                            continue;
                        }
                    };
                    match packet {
                        RelayPacket::Users(users) => {
                            // From a node that predates presence snapshots.
                            presence.remote_users.lock().unwrap_or_else(|e| e.into_inner()).insert(p.from.addr, users);
                        }
                        RelayPacket::Presence(snap) => presence.receive(&hub, &membership, &p.from, snap),
                        RelayPacket::Direct { from, to, text, ts, id } => {
                            send(&membership, p.from.addr, &RelayPacket::DirectAck { id }).await;
                            if !direct_seen.first_time(p.from.clone(), id) {
                                continue; // a resend of one already shown
                            }
                            let ok = text.len() <= hub.config().max_text
                                && hub.deliver_remote_direct(
                                    crate::chat::protocol::RemoteMember { nick: from, node: p.from.name.clone() },
                                    &to,
                                    text,
                                    ts,
                                );
                            if !ok {
                                tracing::debug!(from = ?p.from, "relay: direct message for nobody here, or malformed; dropped");
                            }
                        }
                        RelayPacket::DirectAck { id } => direct_link.acked(&p.from.addr, id),
                        packet => {
                            let actions = relay.receive(p.from.addr, packet, started.elapsed());
                            if !actions.is_empty() {
                                busy_until = tokio::time::Instant::now() + BUSY_FOR;
                            }
                            carry_out(&hub, &membership, &mut store, actions).await;
                        }
                    }
                }
                // Summaries recover whatever was dropped.
                Err(RecvError::Lagged(n)) => tracing::debug!("relay: {n} packets dropped (lagging)"),
                Err(RecvError::Closed) => break,
            },
            got = member_events.recv() => match got {
                // A member came, went or came back: catch up quickly.
                Ok(ev) => {
                    busy_until = tokio::time::Instant::now() + BUSY_FOR;
                    presence.member_event(&hub, &membership, &ev).await;
                }
                Err(RecvError::Lagged(_)) => {
                    busy_until = tokio::time::Instant::now() + BUSY_FOR;
                    presence.check_view(&hub, &membership);
                    presence.resend_due = Some(tokio::time::Instant::now());
                }
                Err(RecvError::Closed) => break,
            },
            Ok(()) = presence.changes.changed() => presence.schedule(),
            _ = sleep_until(presence.due) => presence.send_if_changed(&hub, &membership).await,
            _ = sleep_until(presence.resend_due) => {
                presence.resend_due = None;
                presence.send_all(&membership).await;
            }
            Some(d) = recv_direct(&mut directs) => {
                match presence.table.peer_named(&d.to.node) {
                    Some(peer) => {
                        let packet = direct_link.send(peer, d.from, d.to.nick, d.text, d.ts, started.elapsed());
                        send(&membership, peer, &packet).await;
                    }
                    None => tracing::debug!(node = %d.to.node, "relay: direct message for a node no longer known; dropped"),
                }
            }
            _ = tick.tick() => {
                let (resend, given_up) = direct_link.due(started.elapsed());
                for (peer, packet) in resend {
                    send(&membership, peer, &packet).await;
                }
                if given_up > 0 {
                    tracing::warn!(given_up, "relay: direct messages never acknowledged; dropped");
                }
                // Member events cover this; the view is the fallback.
                presence.check_view(&hub, &membership);
                let now = tokio::time::Instant::now();
                let quiet_due = now >= last_summary + QUIET_SUMMARY_INTERVAL;
                let peers = live_peers(&membership);
                if (now < busy_until || quiet_due) && !peers.is_empty() {
                    last_summary = now;
                    let peer = peers[rand::random_range(0..peers.len())];
                    send(&membership, peer, &relay.summary()).await;
                    if quiet_due {
                        // Now and then, in case a change was lost.
                        send(&membership, peer, &RelayPacket::Presence(presence.mine.clone())).await;
                    }
                }
            }
        }
    }
    tracing::debug!("relay: stopped");
}

/// Least time between two presence snapshots sent by this node (a burst of
/// joins makes one snapshot).
pub const PRESENCE_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// After a presence change, the snapshot is sent again this much later, in
/// case the first datagram was lost.
pub const PRESENCE_RESEND: Duration = Duration::from_secs(1);

/// The relay's side of cluster presence: this node's snapshot, what it
/// holds of the others ([`PresenceTable`]), and when to send.
struct PresenceLink {
    table: super::presence::PresenceTable<std::net::SocketAddr>,
    /// This node's current snapshot.
    mine: super::presence::Snapshot,
    changes: tokio::sync::watch::Receiver<u64>,
    /// When to build and send a new snapshot.
    due: Option<tokio::time::Instant>,
    /// When to send the current one again.
    resend_due: Option<tokio::time::Instant>,
    last_sent: Option<tokio::time::Instant>,
    remote_users: super::report::RemoteUsers,
}

impl PresenceLink {
    fn new(hub: &crate::chat::hub::Hub, remote_users: super::report::RemoteUsers) -> Self {
        let mut changes = hub.presence_changes();
        changes.mark_changed();
        PresenceLink {
            table: Default::default(),
            mine: super::presence::Snapshot {
                version: 0,
                users: Vec::new(),
            },
            changes,
            due: None,
            resend_due: None,
            last_sent: None,
            remote_users,
        }
    }

    fn schedule(&mut self) {
        if self.due.is_none() {
            let now = tokio::time::Instant::now();
            let earliest = self
                .last_sent
                .map_or(now, |at| (at + PRESENCE_MIN_INTERVAL).max(now));
            self.due = Some(earliest);
        }
    }

    async fn send_if_changed(
        &mut self,
        hub: &crate::chat::hub::Hub,
        membership: &super::Membership,
    ) {
        self.due = None;
        let next = super::presence::Snapshot::of(self.mine.version + 1, hub.local_presence());
        if next.same_users(&self.mine) {
            return;
        }
        self.mine = next;
        let size = RelayPacket::Presence(self.mine.clone()).encode().len();
        if size > usize::from(MAX_PARTS) * (MAX_DATAGRAM - 32) {
            tracing::warn!(
                bytes = size,
                users = self.mine.users.len(),
                "relay: presence snapshot too large for other nodes to accept; they will not see this node's users"
            );
        }
        let now = tokio::time::Instant::now();
        self.last_sent = Some(now);
        self.resend_due = Some(now + PRESENCE_RESEND);
        self.send_all(membership).await;
    }

    async fn send_all(&self, membership: &super::Membership) {
        let packet = RelayPacket::Presence(self.mine.clone());
        for peer in live_peers(membership) {
            send(membership, peer, &packet).await;
        }
    }

    /// A snapshot from a member: applied if the sender is still a live
    /// member in this generation and the snapshot is newer and well-formed.
    fn receive(
        &mut self,
        hub: &crate::chat::hub::Hub,
        membership: &super::Membership,
        from: &super::NodeId,
        snap: super::presence::Snapshot,
    ) {
        let live = membership
            .view()
            .members
            .iter()
            .any(|m| m.id == *from && m.state.is_active());
        if !live {
            tracing::debug!(from = ?from, "relay: presence from a node not live; ignored");
            return;
        }
        match self.table.apply(from.addr, &from.name, from.bump, snap) {
            Ok(changes) => self.apply(hub, changes),
            Err(super::presence::Rejected::Stale) => {}
            Err(e) => tracing::warn!(from = ?from, "relay: {e}; ignored"),
        }
    }

    async fn member_event(
        &mut self,
        hub: &crate::chat::hub::Hub,
        membership: &super::Membership,
        ev: &super::MemberEvent,
    ) {
        use super::MemberState;
        let addr = ev.id.addr;
        match ev.state {
            MemberState::Down | MemberState::Left => {
                let reason = if ev.state == MemberState::Down {
                    "node down"
                } else {
                    "node left"
                };
                let changes = self.table.end_generation(&addr, ev.id.bump, reason);
                self.apply(hub, changes);
            }
            MemberState::Alive | MemberState::Suspect => {
                // A new life at the address ends the previous one.
                if let Some((generation, _)) = self.table.version_of(&addr)
                    && generation < ev.id.bump
                {
                    let changes = self
                        .table
                        .end_generation(&addr, generation, "node restarted");
                    self.apply(hub, changes);
                }
                // A member new to this node, or back: tell it who is here.
                if ev.previous.is_none_or(|p| !p.is_active()) {
                    send(membership, addr, &RelayPacket::Presence(self.mine.clone())).await;
                }
            }
        }
    }

    /// Drops the presence of every node the member view no longer holds
    /// live in the same generation (missed or lagged member events).
    fn check_view(&mut self, hub: &crate::chat::hub::Hub, membership: &super::Membership) {
        let view = membership.view();
        for (addr, generation) in self.table.held() {
            let current = view.members.iter().find(|m| m.id.addr == addr);
            let ok = current.is_some_and(|m| m.id.bump == generation && m.state.is_active());
            if !ok {
                let reason = match current.map(|m| m.state) {
                    Some(super::MemberState::Left) => "node left",
                    Some(s) if s.is_active() => "node restarted",
                    _ => "node down",
                };
                let changes = self.table.end_generation(&addr, generation, reason);
                self.apply(hub, changes);
            }
        }
    }

    fn apply(
        &mut self,
        hub: &crate::chat::hub::Hub,
        changes: Vec<crate::chat::hub::RemotePresence>,
    ) {
        hub.apply_remote_presence(changes, self.table.users());
        let mut users = self.remote_users.lock().unwrap_or_else(|e| e.into_inner());
        users.clear();
        for (addr, _) in self.table.held() {
            if let Some(nicks) = self.table.nicks_of(&addr) {
                users.insert(addr, nicks);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn recv_direct(
    rx: &mut Option<tokio::sync::mpsc::Receiver<crate::chat::hub::OutgoingDirect>>,
) -> Option<crate::chat::hub::OutgoingDirect> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn live_peers(membership: &super::Membership) -> Vec<std::net::SocketAddr> {
    membership
        .view()
        .members
        .iter()
        .filter(|m| m.state.is_active())
        .map(|m| m.id.addr)
        .collect()
}

/// Sends `packet` to `to`, split into pieces if it needs more than one datagram.
async fn send(membership: &super::Membership, to: std::net::SocketAddr, packet: &RelayPacket) {
    for data in split(packet, rand::random()) {
        if let Err(e) = membership.send(to, data).await {
            tracing::debug!("relay: send to {to}: {e}");
            return;
        }
    }
}

async fn carry_out(
    hub: &crate::chat::hub::Hub,
    membership: &super::Membership,
    store: &mut RelayStore,
    actions: Vec<RelayAction<std::net::SocketAddr>>,
) {
    // The relay's record first (not done), then the hub's commit, then the
    // mark: a crash anywhere in between is settled by `reconcile` at start.
    let to_apply: Vec<RelayedMessage> = actions
        .iter()
        .filter_map(|a| match a {
            RelayAction::Apply(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    if !to_apply.is_empty()
        && let Err(e) = store.insert(&to_apply, false)
    {
        tracing::error!("relay: {e}");
    }
    let mut applied = Vec::new();
    for action in actions {
        match action {
            RelayAction::Apply(m) => {
                if let Err(e) = apply(hub, &m).await {
                    tracing::warn!(origin = %m.origin, seq = m.seq, "relay: hub refused a message: {e}");
                }
                applied.push(m);
            }
            RelayAction::Send(to, p) => send(membership, to, &p).await,
            RelayAction::Serve { to, origin, after } => {
                match store.after(&origin, after, SERVE_BATCH) {
                    Ok(msgs) => {
                        for m in msgs {
                            send(membership, to, &RelayPacket::Msg(m)).await;
                        }
                    }
                    Err(e) => tracing::error!("relay: {e}"),
                }
            }
        }
    }
    if applied.is_empty() {
        return;
    }
    if hub.sync_writes().await.is_err() {
        return; // shutting down: reconciled at the next start
    }
    if let Err(e) = store.mark_done(&applied) {
        tracing::error!("relay: {e}");
    }
}

/// Hands a relayed message to the hub, with its origin.
async fn apply(
    hub: &crate::chat::hub::Hub,
    m: &RelayedMessage,
) -> Result<(), crate::chat::hub::HubError> {
    hub.apply_remote(
        m.room.clone(),
        m.from.clone(),
        m.text.clone(),
        m.kind,
        m.ts,
        Some((m.origin.clone(), m.origin_id)),
    )
    .await
}

/// After a crash: a message stored by the relay but not marked done may or
/// may not have reached the hub's history. It is applied again only if the
/// room's recent history has no message with the same author, text and time.
async fn reconcile(hub: &crate::chat::hub::Hub, store: &mut RelayStore) -> anyhow::Result<()> {
    let pending = store.not_done()?;
    if pending.is_empty() {
        return Ok(());
    }
    for m in &pending {
        let (h, room) = (hub.clone(), m.room.clone());
        let recent = tokio::task::spawn_blocking(move || h.history(&room, None, None, 500))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let present = recent.iter().any(|r| {
            if m.origin_id > 0 && r.origin.is_some() {
                r.origin.as_deref() == Some(m.origin.as_str()) && r.origin_id == m.origin_id
            } else {
                r.from == m.from && r.text == m.text && r.ts == m.ts && r.kind == m.kind
            }
        });
        if !present {
            apply(hub, m).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    hub.sync_writes()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store.mark_done(&pending)?;
    tracing::info!(
        messages = pending.len(),
        "relay: reconciled messages a crash left unconfirmed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// One simulated node: its relay, its "storage" (every message it holds,
    /// by origin and sequence) and the order it applied remote messages in.
    struct SimNode {
        relay: Relay,
        store: BTreeMap<(String, u64), RelayedMessage>,
        applied: Vec<(String, u64)>,
        up: bool,
    }

    struct Sim {
        nodes: Vec<SimNode>,
        rng: StdRng,
        loss: f64,
        /// `cut[a][b]`: packets from a to b are lost.
        cut: Vec<Vec<bool>>,
        queue: Vec<(usize, usize, RelayPacket)>,
        now: Duration,
    }

    impl Sim {
        fn new(n: usize, seed: u64, loss: f64) -> Sim {
            Sim {
                nodes: (0..n)
                    .map(|i| SimNode {
                        relay: Relay::new(format!("n{i}"), BTreeMap::new()),
                        store: BTreeMap::new(),
                        applied: Vec::new(),
                        up: true,
                    })
                    .collect(),
                rng: StdRng::seed_from_u64(seed),
                loss,
                cut: vec![vec![false; n]; n],
                queue: Vec::new(),
                now: Duration::ZERO,
            }
        }

        fn send(&mut self, from: usize, to: usize, p: RelayPacket) {
            // Every packet goes through the wire format.
            let p = RelayPacket::decode(&p.encode()).unwrap();
            self.queue.push((from, to, p));
        }

        fn post(&mut self, node: usize, text: &str) {
            let m = self.nodes[node].relay.local(
                "lobby".into(),
                format!("u{node}"),
                text.into(),
                MessageKind::Say,
                0,
                1,
            );
            self.nodes[node]
                .store
                .insert((m.origin.clone(), m.seq), m.clone());
            for to in 0..self.nodes.len() {
                if to != node {
                    self.send(node, to, RelayPacket::Msg(m.clone()));
                }
            }
        }

        fn act(&mut self, node: usize, actions: Vec<RelayAction<usize>>) {
            for a in actions {
                match a {
                    RelayAction::Apply(m) => {
                        let n = &mut self.nodes[node];
                        n.applied.push((m.origin.clone(), m.seq));
                        n.store.insert((m.origin.clone(), m.seq), m);
                    }
                    RelayAction::Send(to, p) => self.send(node, to, p),
                    RelayAction::Serve { to, origin, after } => {
                        let msgs: Vec<RelayedMessage> = self.nodes[node]
                            .store
                            .range((origin.clone(), after + 1)..=(origin.clone(), u64::MAX))
                            .take(SERVE_BATCH)
                            .map(|(_, m)| m.clone())
                            .collect();
                        for m in msgs {
                            self.send(node, to, RelayPacket::Msg(m));
                        }
                    }
                }
            }
        }

        /// Delivers queued packets in a random order, with loss and cuts.
        fn deliver(&mut self) {
            while !self.queue.is_empty() {
                let i = self.rng.random_range(0..self.queue.len());
                let (from, to, p) = self.queue.swap_remove(i);
                if self.cut[from][to] || !self.nodes[to].up || self.rng.random_bool(self.loss) {
                    continue;
                }
                self.now += Duration::from_micros(100);
                let actions = self.nodes[to].relay.receive(from, p, self.now);
                self.act(to, actions);
            }
        }

        /// One anti-entropy round: each live node sends its summary to a random peer.
        fn round(&mut self) {
            self.now += Duration::from_secs(1);
            let n = self.nodes.len();
            for i in 0..n {
                if !self.nodes[i].up {
                    continue;
                }
                let mut to = self.rng.random_range(0..n - 1);
                if to >= i {
                    to += 1;
                }
                let s = self.nodes[i].relay.summary();
                self.send(i, to, s);
            }
            self.deliver();
        }

        /// Summary rounds until every node has every message; panics after `max`.
        fn round_until_converged(&mut self, max: usize) {
            let mut rounds = 0;
            while !self.converged() {
                self.round();
                rounds += 1;
                assert!(rounds < max, "no convergence after {max} rounds");
            }
        }

        fn converged(&self) -> bool {
            let first = &self.nodes[0].store;
            self.nodes.iter().all(|n| n.store.len() == first.len())
        }

        /// Each node applied every other origin's messages exactly once, in order.
        fn check_exactly_once_in_order(&self, per_origin: &BTreeMap<String, u64>) {
            for n in &self.nodes {
                for (origin, &count) in per_origin {
                    if *origin == n.relay.me {
                        continue;
                    }
                    let seqs: Vec<u64> = n
                        .applied
                        .iter()
                        .filter(|(o, _)| o == origin)
                        .map(|(_, s)| *s)
                        .collect();
                    assert_eq!(
                        seqs,
                        (1..=count).collect::<Vec<_>>(),
                        "{} applied {origin}'s messages",
                        n.relay.me
                    );
                }
            }
        }
    }

    fn seed() -> u64 {
        std::env::var("NETKIT_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7)
    }

    #[test]
    fn lossy_network_delivers_exactly_once_in_order() {
        let mut sim = Sim::new(3, seed(), 0.3);
        let mut counts = BTreeMap::new();
        for i in 0..300 {
            let node = i % 3;
            sim.post(node, &format!("m{i}"));
            *counts.entry(format!("n{node}")).or_insert(0u64) += 1;
            if i % 7 == 0 {
                sim.deliver();
            }
        }
        sim.deliver();
        sim.round_until_converged(200);
        assert_eq!(sim.nodes[0].store.len(), 300);
        sim.check_exactly_once_in_order(&counts);
    }

    #[test]
    fn partition_and_restart_converge() {
        let mut sim = Sim::new(3, seed(), 0.05);
        let mut counts = BTreeMap::new();
        let mut post = |sim: &mut Sim, node: usize, i: usize| {
            sim.post(node, &format!("m{i}"));
            *counts.entry(format!("n{node}")).or_insert(0u64) += 1;
        };
        for i in 0..30 {
            post(&mut sim, i % 3, i);
        }
        sim.deliver();
        // Partition {n0} | {n1, n2}; both sides keep talking.
        for (a, b) in [(0, 1), (0, 2)] {
            sim.cut[a][b] = true;
            sim.cut[b][a] = true;
        }
        for i in 30..90 {
            post(&mut sim, i % 3, i);
            sim.deliver();
        }
        for _ in 0..5 {
            sim.round();
        }
        assert!(!sim.converged());
        // n2 crashes (kill -9) and restarts from what it had persisted: its
        // store and its have map. Messages posted meanwhile are missed.
        sim.nodes[2].up = false;
        for i in 90..120 {
            post(&mut sim, i % 2, i);
            sim.deliver();
        }
        let persisted = sim.nodes[2].relay.have().clone();
        sim.nodes[2].relay = Relay::new("n2", persisted);
        sim.nodes[2].up = true;
        // Heal.
        sim.cut = vec![vec![false; 3]; 3];
        sim.round_until_converged(200);
        assert_eq!(sim.nodes[1].store.len(), 120);
        sim.check_exactly_once_in_order(&counts);
        // Restarted n2 keeps numbering after what it had assigned.
        let m = sim.nodes[2].relay.local(
            "lobby".into(),
            "u2".into(),
            "after".into(),
            MessageKind::Say,
            0,
            1,
        );
        assert_eq!(m.seq, counts["n2"] + 1);
    }

    /// A crash between the relay's record and the hub's commit: at start the
    /// message is applied if the hub lacks it, and not again if it has it.
    #[tokio::test]
    async fn reconcile_applies_only_what_the_hub_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, _writer) =
            crate::chat::hub::Hub::open(dir.path(), crate::chat::hub::HubConfig::default())
                .unwrap();
        let mut store = RelayStore::open_in(dir.path()).unwrap();
        let msg = |seq, text: &str| RelayedMessage {
            origin: "b/1".into(),
            seq,
            room: "lobby".into(),
            from: "bob".into(),
            text: text.into(),
            kind: MessageKind::Say,
            ts: 1000 + seq as i64,
            origin_id: seq,
        };
        let (in_hub, lost) = (msg(1, "made it"), msg(2, "lost"));
        hub.apply_remote(
            "lobby".into(),
            "bob".into(),
            "made it".into(),
            MessageKind::Say,
            1001,
            None,
        )
        .await
        .unwrap();
        hub.sync_writes().await.unwrap();
        store.insert(&[in_hub, lost], false).unwrap();
        assert_eq!(store.not_done().unwrap().len(), 2);
        assert_eq!(store.have().unwrap()["b/1"], 2);
        reconcile(&hub, &mut store).await.unwrap();
        assert!(store.not_done().unwrap().is_empty());
        let texts: Vec<String> = hub
            .history("lobby", None, None, 50)
            .unwrap()
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, vec!["made it", "lost"]);
        // The origin tag is made once per store.
        let origin = store.origin("n").unwrap();
        assert!(origin.starts_with("n/"));
        assert_eq!(store.origin("n").unwrap(), origin);
        hub.shutdown();
    }

    /// A relay store made before origin ids opens; its rows read as 0.
    #[test]
    fn old_relay_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("relay.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE relay_messages (origin TEXT NOT NULL, seq INTEGER NOT NULL,
                     room TEXT NOT NULL, nick TEXT NOT NULL, text TEXT NOT NULL, kind TEXT NOT NULL,
                     ts_ms INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 1,
                     PRIMARY KEY (origin, seq)) WITHOUT ROWID;
                 INSERT INTO relay_messages VALUES ('b/1', 1, 'r', 'bob', 'old', 'say', 5, 1);",
            )
            .unwrap();
        }
        let mut store = RelayStore::open_in(dir.path()).unwrap();
        let old = store.after("b/1", 0, 10).unwrap();
        assert_eq!((old[0].text.as_str(), old[0].origin_id), ("old", 0));
        let new = RelayedMessage {
            origin: "b/1".into(),
            seq: 2,
            room: "r".into(),
            from: "bob".into(),
            text: "new".into(),
            kind: MessageKind::Say,
            ts: 6,
            origin_id: 4,
        };
        store.insert(std::slice::from_ref(&new), true).unwrap();
        drop(store);
        let store = RelayStore::open_in(dir.path()).unwrap();
        assert_eq!(store.after("b/1", 1, 10).unwrap(), vec![new]);
    }

    #[test]
    fn large_packets_are_split_and_reassembled() {
        let big = RelayPacket::Msg(RelayedMessage {
            origin: "a".into(),
            seq: 1,
            room: "r".into(),
            from: "x".into(),
            text: "é".repeat(4000),
            kind: MessageKind::Me,
            ts: 5,
            origin_id: 9,
        });
        let mut pieces = split(&big, 42);
        assert!(pieces.len() >= 8, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|d| d.len() <= MAX_DATAGRAM));
        pieces.reverse();
        let mut r = Reassembly::default();
        let mut out = None;
        for (i, d) in pieces.iter().enumerate() {
            let Some(RelayPacket::Part {
                id,
                index,
                count,
                data,
            }) = RelayPacket::decode(d)
            else {
                panic!("not a part");
            };
            // A piece of another packet from the same sender does not mix in.
            assert!(r.add(1, id + 1, 0, 2, vec![1], Duration::ZERO).is_none());
            let got = r.add(1, id, index, count, data, Duration::ZERO);
            assert_eq!(got.is_some(), i + 1 == pieces.len());
            out = got.or(out);
        }
        assert_eq!(out, Some(big));
        let small = RelayPacket::Pull {
            origin: "a".into(),
            after: 3,
        };
        assert_eq!(split(&small, 1), vec![small.encode()]);
        assert!(r.add(1, 9, 3, 2, vec![], Duration::ZERO).is_none());
    }

    #[test]
    fn duplicates_own_messages_and_garbage_are_ignored() {
        let mut r = Relay::new("a", BTreeMap::new());
        let m = |origin: &str, seq| RelayedMessage {
            origin: origin.into(),
            seq,
            room: "r".into(),
            from: "x".into(),
            text: "t".into(),
            kind: MessageKind::Say,
            ts: 0,
            origin_id: seq,
        };
        let now = Duration::ZERO;
        assert_eq!(r.receive(1, RelayPacket::Msg(m("b", 1)), now).len(), 1);
        assert!(r.receive(1, RelayPacket::Msg(m("b", 1)), now).is_empty());
        assert!(r.receive(1, RelayPacket::Msg(m("a", 5)), now).is_empty());
        assert!(r.receive(1, RelayPacket::Msg(m("b", 0)), now).is_empty());
        // A gap: held, and pulled once per PULL_RETRY.
        let got = r.receive(1, RelayPacket::Msg(m("b", 3)), now);
        assert_eq!(
            got,
            vec![RelayAction::Send(
                1,
                RelayPacket::Pull {
                    origin: "b".into(),
                    after: 1
                }
            )]
        );
        assert!(r.receive(1, RelayPacket::Msg(m("b", 4)), now).is_empty());
        let got = r.receive(1, RelayPacket::Msg(m("b", 2)), now);
        let seqs: Vec<u64> = got
            .iter()
            .map(|a| match a {
                RelayAction::Apply(m) => m.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(r.have()["b"], 4);
        assert_eq!(RelayPacket::decode(b"\x00garbage"), None);
        assert_eq!(RelayPacket::decode(&[MAGIC, 0xff, 0xff]), None);
        assert_eq!(RelayPacket::decode(&[]), None);
    }

    #[test]
    fn direct_messages_are_resent_until_acknowledged_and_shown_once() {
        let ms = Duration::from_millis;
        let mut a: DirectLink<u8> = DirectLink::default();
        let p1 = a.send(2, "ann".into(), "bob".into(), "one".into(), 1, ms(0));
        let p2 = a.send(3, "ann".into(), "cid".into(), "two".into(), 2, ms(0));
        let (RelayPacket::Direct { id: id1, .. }, RelayPacket::Direct { id: id2, .. }) = (&p1, &p2)
        else {
            panic!("direct packets");
        };
        assert_ne!(id1, id2);
        // Nothing is due before the resend interval.
        assert_eq!(a.due(ms(999)), (vec![], 0));
        // Unacknowledged: resent to the same peer, same packet.
        let (resend, _) = a.due(DIRECT_RESEND);
        assert_eq!(resend, vec![(2, p1.clone()), (3, p2.clone())]);
        // An ack from the wrong peer does not count; from the right one it does.
        a.acked(&3, *id1);
        a.acked(&2, *id1);
        assert_eq!(a.pending(), 1);
        // The other is resent DIRECT_TRIES times in all, then given up.
        let mut resends = 1;
        let mut given_up = 0;
        for k in 2..20u64 {
            let (out, g) = a.due(DIRECT_RESEND * k as u32);
            resends += out.len();
            given_up += g;
        }
        assert_eq!((resends, given_up), (DIRECT_TRIES as usize, 1));
        assert_eq!(a.pending(), 0);

        // The receiver shows each (peer, id) once, resends and all.
        let mut b: DirectLink<u8> = DirectLink::default();
        assert!(b.first_time(1, 7));
        assert!(!b.first_time(1, 7));
        assert!(b.first_time(2, 7), "another sender's 7 is another message");
        // The memory of what was seen is bounded.
        for id in 100..100 + DIRECT_SEEN as u64 {
            assert!(b.first_time(1, id));
        }
        assert!(b.seen.len() <= DIRECT_SEEN);
        assert!(b.first_time(1, 7), "forgotten after DIRECT_SEEN newer ones");
    }

    #[test]
    fn presence_packets_roundtrip_and_garbage_is_dropped() {
        use super::super::presence::{Snapshot, SnapshotUser};
        let snap = RelayPacket::Presence(Snapshot {
            version: 3,
            users: vec![SnapshotUser {
                id: 7,
                nick: "bob".into(),
                rooms: vec!["lobby".into()],
            }],
        });
        assert_eq!(RelayPacket::decode(&snap.encode()), Some(snap.clone()));
        let direct = RelayPacket::Direct {
            from: "ann".into(),
            to: "bob".into(),
            text: "psst".into(),
            ts: 1,
            id: 9,
        };
        assert_eq!(RelayPacket::decode(&direct.encode()), Some(direct));
        let ack = RelayPacket::DirectAck { id: 9 };
        assert_eq!(RelayPacket::decode(&ack.encode()), Some(ack));
        // Truncated or padded datagrams of a presence packet do not decode.
        let bytes = snap.encode();
        for cut in 1..bytes.len() {
            assert_eq!(RelayPacket::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        // A claimed length far beyond the datagram.
        let mut huge = vec![MAGIC, 6, 3, 0xff, 0xff, 0xff, 0xff, 0x0f];
        huge.extend([0u8; 16]);
        assert_eq!(RelayPacket::decode(&huge), None);
        // Pieces announcing more than MAX_PARTS, or larger than a datagram,
        // are refused before anything is held.
        let mut r = Reassembly::default();
        assert!(
            r.add(1, 1, 0, MAX_PARTS + 1, vec![0], Duration::ZERO)
                .is_none()
        );
        assert!(
            r.add(1, 2, 0, 2, vec![0; MAX_DATAGRAM + 1], Duration::ZERO)
                .is_none()
        );
        assert!(r.pending.is_empty());
        // A split snapshot whose reassembled body is garbage yields nothing.
        assert!(r.add(1, 3, 0, 2, vec![6, 3], Duration::ZERO).is_none());
        assert!(r.add(1, 3, 1, 2, vec![0xff; 8], Duration::ZERO).is_none());
        assert!(r.pending.is_empty());
    }
}

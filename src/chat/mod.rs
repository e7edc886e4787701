//! The chat hub and its front doors: [`hub`] (rooms, members, fan-out),
//! [`store`] (SQLite history), [`protocol`] (wire types), [`names`] (name rules), [`frame`]
//! (a message's WebSocket frame), the adapters [`ws`] (WebSocket, JSON) and
//! [`line`](mod@line) (TCP, text lines), [`files`] (files shared in rooms, on
//! disk), [`client`] (`netkit chat`), and identity: [`auth`] (modes,
//! application tokens, login limit), [`accounts`], and [`moderation`]
//! (moderation and abuse-limit settings).

pub mod accounts;
pub mod auth;
pub mod client;
pub mod files;
pub mod frame;
pub mod hub;
pub mod line;
pub mod moderation;
pub mod names;
pub mod passwords;
pub mod protocol;
pub mod store;
pub mod ws;

use std::time::Duration;

use crate::cli::{parse_duration, parse_size};

pub use hub::{Hub, HubConfig, LoggedPost, RoomLog};

/// Chat limits, shared by `netkit serve`'s WebSocket and TCP line front doors.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatLimitArgs {
    /// Most chat clients connected at once (WebSocket and TCP together).
    #[arg(long, default_value_t = 10_000, env = "NETKIT_CHAT_MAX_CLIENTS")]
    pub chat_max_clients: usize,
    /// Most messages waiting for one client; a client that falls further behind is disconnected.
    #[arg(long, default_value_t = 1024, env = "NETKIT_CHAT_QUEUE")]
    pub chat_queue: usize,
    /// Most bytes waiting for one client; a client that falls further behind is disconnected.
    #[arg(long, default_value = "1MiB", value_parser = parse_size, env = "NETKIT_CHAT_QUEUE_BYTES")]
    pub chat_queue_bytes: u64,
    /// Largest WebSocket message or TCP line a client may send; a larger one gets an error.
    #[arg(long, default_value = "8KiB", value_parser = parse_size, env = "NETKIT_CHAT_MAX_MSG")]
    pub chat_max_msg: u64,
    /// Messages per second a client may send (0 = unlimited); more get a `rate_limited` error.
    #[arg(long, default_value_t = 20.0, env = "NETKIT_CHAT_RATE")]
    pub chat_rate: f64,
    /// Messages a client may send in a burst above --chat-rate.
    #[arg(long, default_value_t = 40.0, env = "NETKIT_CHAT_BURST")]
    pub chat_burst: f64,
    /// Rooms with more members than this get no join/leave events, and `joined` lists only this many members.
    #[arg(long, default_value_t = 200, env = "NETKIT_CHAT_PRESENCE_LIMIT")]
    pub chat_presence_limit: usize,
    /// How often the server pings a WebSocket client.
    #[arg(long, default_value = "20s", value_parser = parse_duration, env = "NETKIT_CHAT_PING_INTERVAL")]
    pub chat_ping_interval: Duration,
    /// Disconnect a WebSocket client that sends nothing (not even a pong) for this long after a ping.
    #[arg(long, default_value = "20s", value_parser = parse_duration, env = "NETKIT_CHAT_PING_TIMEOUT")]
    pub chat_ping_timeout: Duration,
    /// Disconnect a TCP line client that sends nothing for this long.
    #[arg(long, default_value = "30m", value_parser = parse_duration, env = "NETKIT_CHAT_IDLE_TIMEOUT")]
    pub chat_idle_timeout: Duration,
    /// Disconnect a client whose socket accepts no data for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_CHAT_WRITE_TIMEOUT")]
    pub chat_write_timeout: Duration,
    /// While messages keep coming, store (and send) them at most once per this
    /// interval, as one batch: a busy room's messages then share a transaction,
    /// and each client gets them in one write (still one frame per message),
    /// at the cost of up to this much latency. A message after a quiet spell is
    /// not delayed. 0 (the default) commits as fast as it can.
    #[arg(long, default_value = "0", value_parser = parse_duration, env = "NETKIT_CHAT_BATCH_INTERVAL")]
    pub chat_batch_interval: Duration,
    /// While messages keep coming, write to each WebSocket client at most
    /// about once per this interval: what arrived meanwhile goes in one write
    /// (still one frame per message). A message after a quiet spell goes out
    /// at once. Each client's interval is drawn between 3/4 and 5/4 of this,
    /// so that clients are not all written to at the same moment. 0 (the
    /// default) writes as soon as anything is queued; a few milliseconds
    /// trade that much latency for less server CPU in a busy room (figures in
    /// bench/README.md).
    #[arg(long, default_value = "0", value_parser = parse_duration, env = "NETKIT_CHAT_WRITE_INTERVAL")]
    pub chat_write_interval: Duration,
}

impl ChatLimitArgs {
    /// The hub configuration these flags describe.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            max_clients: self.chat_max_clients.max(1),
            queue_messages: self.chat_queue.max(1),
            queue_bytes: usize::try_from(self.chat_queue_bytes).unwrap_or(usize::MAX),
            max_text: usize::try_from(self.chat_max_msg).unwrap_or(usize::MAX),
            rate: self.chat_rate.max(0.0),
            burst: self.chat_burst.max(1.0),
            presence_limit: self.chat_presence_limit,
            batch_interval: self.chat_batch_interval,
            ..HubConfig::default()
        }
    }

    /// The per-connection settings of the adapters.
    pub fn conn_config(&self) -> ConnConfig {
        ConnConfig {
            max_msg: usize::try_from(self.chat_max_msg)
                .unwrap_or(usize::MAX)
                .max(64),
            ping_interval: self.chat_ping_interval,
            ping_timeout: self.chat_ping_timeout,
            idle_timeout: self.chat_idle_timeout,
            write_timeout: self.chat_write_timeout,
            write_interval: self.chat_write_interval,
        }
    }
}

/// Per-connection settings shared by the WebSocket and line adapters.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Largest message (WebSocket) or line (TCP) a client may send, in bytes.
    pub max_msg: usize,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// How long after a ping a silent WebSocket client is dropped.
    pub ping_timeout: Duration,
    /// How long a silent TCP line client is kept.
    pub idle_timeout: Duration,
    /// How long one write to a client may block.
    pub write_timeout: Duration,
    /// Least time between two writes to a WebSocket client while messages
    /// keep coming (see `--chat-write-interval`); zero writes at once.
    pub write_interval: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_msg: 8192,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(1800),
            write_timeout: Duration::from_secs(10),
            write_interval: Duration::ZERO,
        }
    }
}

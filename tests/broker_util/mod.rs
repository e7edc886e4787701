//! Broker-mode test helpers: a real nats-server (one, or one of a
//! JetStream cluster) on loopback with its own store, and a hub in broker
//! mode with its own data dir; shared by tests/broker.rs and tests/broker_ha.rs.
#![allow(dead_code)]

use std::process::Stdio;
use std::sync::Arc;

use netkit::chat::hub::{Hub, HubConfig, HubWriter, Inbox, Received, Session};
use netkit::chat::protocol::{ChatMessage, ServerMsg};
use netkit::cluster::broker::{self, Broker, BrokerArgs};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat_util::T;
use crate::proc_util;

/// A nats-server with JetStream on 127.0.0.1, storing under `store`.
pub struct Nats {
    pub child: Child,
    pub port: u16,
}

impl Nats {
    /// Starts one on `port` (a random free port if `None`); returns once it
    /// has said it is ready.
    pub async fn start(store: &std::path::Path, port: Option<u16>) -> Nats {
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let mut cmd = Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(store);
        Nats::spawn(cmd).await
    }

    /// Starts one with the configuration file `conf` (a member of a
    /// JetStream cluster); returns once it has said it is ready.
    pub async fn start_config(conf: &std::path::Path) -> Nats {
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c").arg(conf);
        Nats::spawn(cmd).await
    }

    /// Runs `cmd`, reading its log for its client port until it is ready.
    async fn spawn(mut cmd: Command) -> Nats {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut port = None;
        let ready = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(at) = line.split("Listening for client connections on ").nth(1) {
                    port = at.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                }
                if line.contains("Server is ready") {
                    return;
                }
            }
            panic!("nats-server ended before it was ready");
        };
        tokio::time::timeout(T, ready)
            .await
            .expect("nats-server ready");
        // Keep draining its log so it never blocks on a full pipe.
        // NETKIT_TEST_NATS_LOG=1 shows it on the test's stderr.
        let show = std::env::var_os("NETKIT_TEST_NATS_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if show {
                    eprintln!("nats-server: {line}");
                }
            }
        });
        Nats {
            child,
            port: port.expect("nats-server logged its port"),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (by its pid) and waits for it to end.
    pub async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// True if nats-server is installed; else says why the test is skipped.
pub fn have_nats() -> bool {
    let ok = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
    }
    ok
}

/// A nats-server on a fresh store (kept as long as the directory is), or
/// `None` if nats-server is not installed (the test is then skipped).
pub async fn nats_on_fresh_store() -> Option<(tempfile::TempDir, Nats)> {
    if !have_nats() {
        return None;
    }
    let store = tempfile::tempdir().unwrap();
    let nats = Nats::start(store.path(), None).await;
    Some((store, nats))
}

/// Stops `nodes`, then the server.
pub async fn stop_all<const N: usize>(nodes: [Node; N], nats: Nats) {
    for n in nodes {
        n.stop().await;
    }
    nats.stop().await;
}

/// `netkit serve --broker URL EXTRA…`, the real binary, with its own data dir.
pub async fn serve_binary(url: &str, extra: &[&str]) -> (tempfile::TempDir, proc_util::Netkit) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--broker".to_string(), url.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let path = dir.path().to_path_buf();
    let k = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        proc_util::Netkit::serve_chat(&path, &args)
    })
    .await
    .unwrap();
    (dir, k)
}

/// A hub in broker mode with its own store.
pub struct Node {
    pub hub: Hub,
    pub broker: Arc<Broker>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    _writer: HubWriter,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn start(url: &str) -> Node {
        Node::start_keeping(url, 0).await
    }

    /// A hub whose `--broker-max-per-room` is `max_per_room` (it sets the
    /// stream's limit if it creates the stream).
    pub async fn start_keeping(url: &str, max_per_room: u64) -> Node {
        Node::start_with(BrokerArgs {
            broker: Some(url.to_string()),
            broker_max_per_room: max_per_room,
            broker_replicas: 1,
        })
        .await
    }

    /// A hub started with the broker flags `args`.
    pub async fn start_with(args: BrokerArgs) -> Node {
        Node::start_configured(args, HubConfig::default()).await
    }

    /// A hub with settings `cfg`, started with the broker flags `args`.
    pub async fn start_configured(args: BrokerArgs, cfg: HubConfig) -> Node {
        Node::start_in(tempfile::tempdir().unwrap(), args, cfg).await
    }

    /// A hub on the data dir `dir` (which it keeps), as [`Node::start_configured`].
    pub async fn start_in(dir: tempfile::TempDir, args: BrokerArgs, cfg: HubConfig) -> Node {
        let (hub, writer) = Hub::open(dir.path(), cfg).unwrap();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let meta = netkit::cluster::NodeMeta::default();
        let broker = broker::start(&args, &hub, meta, shutdown.clone(), &tracker)
            .await
            .unwrap()
            .unwrap();
        Node {
            hub,
            broker,
            shutdown,
            tracker,
            _writer: writer,
            _dir: dir,
        }
    }

    /// A client `nick` in room `lobby` (joined after `after`, if given).
    pub async fn client(&self, nick: &str, after: Option<u64>) -> (Session, Inbox) {
        let (s, inbox) = self.hub.connect(Some(nick)).unwrap();
        s.join("lobby", after).await.unwrap();
        s.settle().await;
        (s, inbox)
    }

    /// Waits until this hub has applied the stream up to `seq`.
    pub async fn applied(&self, seq: u64) {
        let mut w = self.hub.logged();
        tokio::time::timeout(T, w.wait_for(|&v| v >= seq))
            .await
            .expect("hub applies the stream")
            .unwrap();
    }

    /// Stops reading the stream; the writer ends with the last hub handle
    /// (sessions of the test hold some).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.hub.shutdown();
        self.tracker.close();
        tokio::time::timeout(T, self.tracker.wait()).await.unwrap();
    }
}

/// The next room message in `inbox` (other events are passed over).
pub async fn next_message(inbox: &mut Inbox) -> ChatMessage {
    loop {
        match tokio::time::timeout(T, inbox.recv())
            .await
            .expect("a message")
        {
            Received::Event(ev) => {
                if let ServerMsg::Message(m) = &ev.msg {
                    return m.clone();
                }
            }
            other => panic!("client gone: {other:?}"),
        }
    }
}

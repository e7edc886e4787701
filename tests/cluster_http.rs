//! `GET /api/cluster`: the router called directly (standalone, and with two
//! in-process memberships gossiping on 127.0.0.1), and two real `netkit serve`
//! processes. Every wait polls with a deadline; nothing sleeps for correctness.

mod proc_util;

use proc_util::{Netkit, cluster_node_command};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use clap::Parser;
use netkit::chat::hub::{Hub, HubConfig};
use netkit::cluster::{ClusterArgs, ClusterInfo, NodeMeta};
use netkit::http::{AppParts, AppState, HttpConfig, router};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(20);

fn state(hub: Hub, cluster: ClusterInfo) -> AppState {
    AppState::from(AppParts {
        hub,
        config: std::sync::Arc::new(HttpConfig::default()),
        started: std::time::Instant::now(),
        sessions: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        cluster: std::sync::Arc::new(cluster),
        pages: Default::default(),
        fetches: Default::default(),
        sessions_rt: tokio::runtime::Handle::current(),
    })
}

async fn get_json(app: &AppState, path: &str) -> Value {
    let resp = router(app.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn standalone_node_reports_itself_and_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _writer) = Hub::open(dir.path(), HubConfig::default()).unwrap();
    let meta = NodeMeta {
        http: Some("127.0.0.1:8080".parse().unwrap()),
        chat: Some("127.0.0.1:8330".parse().unwrap()),
    };
    let app = state(hub.clone(), ClusterInfo::standalone("solo", meta));
    let (_ann, _inbox) = hub.connect(Some("ann")).unwrap();
    let v = get_json(&app, "/api/cluster").await;
    assert_eq!(v["clustering"], false);
    assert_eq!(v["node"], "solo");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["name"], "solo");
    assert_eq!(members[0]["self"], true);
    assert_eq!(members[0]["state"], "alive");
    assert_eq!(members[0]["http"], "127.0.0.1:8080");
    assert_eq!(members[0]["chat"], "127.0.0.1:8330");
    assert_eq!(members[0]["gossip"], Value::Null);
    assert_eq!(members[0]["users"], serde_json::json!(["ann"]));
    hub.shutdown();
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    cluster: ClusterArgs,
}

fn cluster_args(name: &str, join: &str) -> ClusterArgs {
    Flags::parse_from([
        "t",
        "--node-name",
        name,
        "--cluster-listen",
        "127.0.0.1:0",
        "--join",
        join,
        "--cluster-probe-period",
        "200ms",
        "--cluster-probe-rtt",
        "80ms",
        "--cluster-suspect-timeout",
        "600ms",
        "--cluster-gossip-interval",
        "50ms",
    ])
    .cluster
}

#[tokio::test]
async fn router_reports_members_of_a_live_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _writer) = Hub::open(dir.path(), HubConfig::default()).unwrap();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let a_meta = NodeMeta {
        http: Some("127.0.0.1:1111".parse().unwrap()),
        chat: None,
    };
    let b_meta = NodeMeta {
        http: Some("127.0.0.1:2222".parse().unwrap()),
        chat: Some("127.0.0.1:3333".parse().unwrap()),
    };
    let a_bound = netkit::cluster::bind(&cluster_args("a", ""))
        .await
        .unwrap()
        .unwrap();
    let a_addr = a_bound.id.addr;
    let a = netkit::cluster::membership::spawn(a_bound, a_meta.clone(), shutdown.clone(), &tracker)
        .unwrap();
    let b_bound = netkit::cluster::bind(&cluster_args("b", &a_addr.to_string()))
        .await
        .unwrap()
        .unwrap();
    let b_addr = b_bound.id.addr;
    let b =
        netkit::cluster::membership::spawn(b_bound, b_meta, shutdown.clone(), &tracker).unwrap();
    let app = state(
        hub.clone(),
        ClusterInfo {
            name: "a".into(),
            meta: a_meta,
            membership: Some(a),
            remote_users: Default::default(),
            broker: None,
        },
    );
    let deadline = Instant::now() + DEADLINE;
    let v = loop {
        let v = get_json(&app, "/api/cluster").await;
        let b_seen =
            v["members"].as_array().unwrap().iter().any(|m| {
                m["name"] == "b" && m["state"] == "alive" && m["chat"] == "127.0.0.1:3333"
            });
        if b_seen {
            break v;
        }
        assert!(Instant::now() < deadline, "b never reported alive: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a wait for correctness
    };
    assert_eq!(v["clustering"], true);
    assert_eq!(v["node"], "a");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{v}");
    assert_eq!(members[0]["self"], true);
    assert_eq!(members[0]["gossip"], a_addr.to_string());
    assert_eq!(members[0]["http"], "127.0.0.1:1111");
    assert_eq!(members[1]["self"], false);
    assert_eq!(members[1]["gossip"], b_addr.to_string());
    assert_eq!(members[1]["http"], "127.0.0.1:2222");
    assert!(members[1].get("users").is_none(), "{v}");

    drop(b);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    hub.shutdown();
}

/// A `netkit serve` cluster node and its data dir.
struct Node {
    p: Netkit,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(name: &str, join: &str, chat: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cmd = cluster_node_command(name, dir.path(), "127.0.0.1:0", join, chat);
        Node {
            p: Netkit::start(cmd),
            _dir: dir,
        }
    }

    /// The HTTP address from the ready line.
    fn http(&self) -> SocketAddr {
        self.p.ready.http.expect("http door")
    }

    /// The gossip address from the ready line.
    fn gossip(&self) -> SocketAddr {
        self.p.ready.cluster.expect("clustering is on")
    }
}

/// `GET /api/cluster` over a real socket.
fn fetch(http: SocketAddr) -> Value {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET /api/cluster HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

#[test]
fn two_real_nodes_report_each_other() {
    let a = Node::start("a", "", true);
    let (a_http, a_gossip) = (a.http(), a.gossip());
    let a_chat = a.p.ready.chat.expect("line chat door");
    let mut b = Node::start("b", &a_gossip.to_string(), false);
    let (b_http, b_gossip) = (b.http(), b.gossip());

    // A line-chat user on a shows up among a's users.
    let mut user = TcpStream::connect(a_chat).unwrap();
    user.write_all(b"/nick zed\n").unwrap();

    let deadline = Instant::now() + DEADLINE;
    let (va, vb) = loop {
        let (va, vb) = (fetch(a_http), fetch(b_http));
        let sees = |v: &Value, name: &str, http: SocketAddr| {
            v["members"].as_array().unwrap().iter().any(|m| {
                m["name"] == name && m["state"] == "alive" && m["http"] == http.to_string()
            })
        };
        let zed = va["members"][0]["users"] == serde_json::json!(["zed"]);
        if sees(&va, "b", b_http) && sees(&vb, "a", a_http) && zed {
            break (va, vb);
        }
        assert!(
            Instant::now() < deadline,
            "nodes never saw each other:\n{va}\n{vb}"
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    };
    assert_eq!(va["node"], "a");
    assert_eq!(va["clustering"], true);
    assert_eq!(va["members"][0]["gossip"], a_gossip.to_string());
    assert_eq!(va["members"][0]["chat"], a_chat.to_string());
    assert_eq!(vb["node"], "b");
    assert_eq!(vb["members"][0]["gossip"], b_gossip.to_string());
    assert_eq!(vb["members"][0]["chat"], Value::Null);
    assert_eq!(vb["members"][0]["users"], serde_json::json!([]));
    let a_in_b = &vb["members"][1];
    assert_eq!(a_in_b["chat"], a_chat.to_string());
    assert_eq!(a_in_b["gossip"], a_gossip.to_string());
    // a's users reach b through the chat relay.
    let deadline = Instant::now() + DEADLINE;
    while fetch(b_http)["members"][1]["users"] != serde_json::json!(["zed"]) {
        assert!(
            Instant::now() < deadline,
            "b never heard a's users: {}",
            fetch(b_http)
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
    // And a change too.
    user.write_all(b"/nick zoe\n").unwrap();
    let deadline = Instant::now() + DEADLINE;
    while fetch(b_http)["members"][1]["users"] != serde_json::json!(["zoe"]) {
        assert!(Instant::now() < deadline, "b never heard the new nick");
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }

    // kill -9 of b: a reports it down.
    b.p.kill9();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let va = fetch(a_http);
        if va["members"][1]["name"] == "b" && va["members"][1]["state"] == "down" {
            break;
        }
        assert!(Instant::now() < deadline, "b never reported down: {va}");
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
}

/// `netkit members URL [--json]`: the real binary against a real node.
#[test]
fn members_command_prints_the_table_and_json() {
    let a = Node::start("a", "", false);
    let (a_http, a_gossip) = (a.http(), a.gossip());
    let b = Node::start("b", &a_gossip.to_string(), false);
    let b_http = b.http();
    let url = format!("http://{a_http}");
    let deadline = Instant::now() + DEADLINE;
    let table = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
            .args(["members", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let table = String::from_utf8(out.stdout).unwrap();
        if table
            .lines()
            .any(|l| l.starts_with("b ") && l.contains("alive"))
        {
            break table;
        }
        assert!(Instant::now() < deadline, "b never in the table:\n{table}");
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    };
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("a *") && lines[1].contains(&a_gossip.to_string()),
        "{table}"
    );
    assert!(lines[2].contains(&b_http.to_string()), "{table}");

    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["members", &url, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "a");
    assert_eq!(v["members"][1]["name"], "b");
    assert_eq!(v["members"][1]["http"], b_http.to_string());

    // A wrong URL and a dead port fail with exit 1 and say what to give.
    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["members", &a_http.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://HOST:PORT"));
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args(["members", &format!("http://{dead_addr}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

/// The web page carries the cluster panel, and its script fills it from `/api/cluster`.
#[tokio::test]
async fn page_has_the_cluster_view() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _writer) = Hub::open(dir.path(), HubConfig::default()).unwrap();
    let app = state(
        hub.clone(),
        ClusterInfo::standalone("solo", NodeMeta::default()),
    );
    let text = |path: &'static str| {
        let app = app.clone();
        async move {
            let resp = router(app)
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            String::from_utf8(body.to_vec()).unwrap()
        }
    };
    let html = text("/").await;
    assert!(html.contains(r#"<ul id="cluster-list""#), "{html}");
    let js = text("/app.js").await;
    assert!(js.contains(r#"getElementById("cluster-list")"#));
    assert!(js.contains(r#"fetch("/api/cluster""#));
    // Node names and users are text, never HTML.
    assert!(!js.contains("innerHTML"));
    hub.shutdown();
}

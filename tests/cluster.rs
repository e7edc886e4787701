//! Real `netkit serve` processes gossiping on 127.0.0.1: convergence, `kill -9`
//! detection, restart and rejoin, graceful leave, and a wrong cluster key.
//! Every wait reads the nodes' `--status-json` lines (or their logs) with a
//! deadline; nothing sleeps for correctness.

mod proc_util;

use std::time::{Duration, Instant};

use proc_util::{Netkit, bin};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);

/// One running node; its status lines follow the ready line on stdout.
struct Node {
    name: String,
    p: Netkit,
    last: Option<Value>,
}

impl Node {
    fn start(name: &str, listen: &str, join: &str, key: Option<&str>) -> Node {
        let data = std::env::temp_dir().join("netkit-cluster-test");
        let mut cmd = bin();
        cmd.args([
            "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--relay", "off", "--http",
            "off", "--chat", "off",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(["--node-name", name, "--cluster-listen", listen])
        .args(["--join", join, "--status-json", "50ms"])
        // Fast protocol timings keep the suite short.
        .args(["--cluster-probe-period", "200ms"])
        .args(["--cluster-probe-rtt", "80ms"])
        .args(["--cluster-suspect-timeout", "600ms"])
        .args(["--cluster-gossip-interval", "50ms"])
        .args(["--cluster-push-pull-interval", "2s"])
        .env_remove("NETKIT_CLUSTER_KEY")
        .stdin(std::process::Stdio::null());
        if let Some(k) = key {
            cmd.args(["--cluster-key", k]);
        }
        let mut node = Node {
            name: name.to_string(),
            p: Netkit::start(cmd),
            last: None,
        };
        node.wait_status(|_| true, "a first status line");
        node
    }

    /// Waits for a status line satisfying `pred`.
    fn wait_status(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.p.next_stdout(left) {
                Ok(line) => {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    self.last = Some(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => {
                    let log = self.p.drain_log().to_vec();
                    panic!(
                        "{}: no status line with {what} within {DEADLINE:?}; last: {:?}; log: {log:?}",
                        self.name, self.last
                    )
                }
            }
        }
    }

    fn wait_members(&mut self, n: u64) -> Value {
        self.wait_status(|v| v["members"] == n, &format!("members == {n}"))
    }

    /// The latest status line (waits for the next one).
    fn current(&mut self) -> Value {
        self.wait_status(|_| true, "any content")
    }

    /// Waits for a log line containing every one of `parts`.
    fn wait_log(&mut self, parts: &[&str]) -> String {
        self.p.wait_log(parts, DEADLINE)
    }

    /// The gossip address, from the ready line.
    fn addr(&self) -> String {
        self.p.ready.cluster.expect("clustering is on").to_string()
    }
}

/// Nodes a, b and c (joining through a), once each counts three members.
fn three_nodes() -> (Node, Node, Node) {
    let a = Node::start("a", "127.0.0.1:0", "", None);
    let seed = a.addr();
    let b = Node::start("b", "127.0.0.1:0", &seed, None);
    let c = Node::start("c", "127.0.0.1:0", &seed, None);
    let (mut a, mut b, mut c) = (a, b, c);
    for n in [&mut a, &mut b, &mut c] {
        n.wait_members(3);
    }
    (a, b, c)
}

#[test]
fn a_killed_node_is_detected_down() {
    let (mut a, mut b, mut c) = three_nodes();
    c.p.kill9(); // SIGKILL: no goodbye
    for n in [&mut a, &mut b] {
        n.wait_members(2);
        n.wait_log(&["member is down", "c ("]);
    }
    // The first datagram sent to c's unbound port drew an ICMP "port
    // unreachable", which its sender took as an early failed probe.
    let early = [&mut a, &mut b].into_iter().any(|n| {
        n.p.drain_log()
            .iter()
            .any(|l| l.contains("gossip port is unreachable") && l.contains("c ("))
    });
    assert!(
        early,
        "a or b suspected c from ICMP: {:?} {:?}",
        a.p.seen, b.p.seen
    );
}

#[test]
fn a_killed_node_restarted_on_its_address_rejoins() {
    let (mut a, mut b, mut c) = three_nodes();
    let c_addr = c.addr();
    c.p.kill9();
    for n in [&mut a, &mut b] {
        n.wait_members(2);
    }
    // Same name, same address: a new generation that wins over the down one.
    let b_addr = b.addr();
    let mut c = Node::start("c", &c_addr, &b_addr, None);
    for n in [&mut a, &mut b, &mut c] {
        n.wait_members(3);
    }
}

#[test]
fn a_node_stopped_by_sigterm_leaves_and_is_not_detected_down() {
    let (mut a, mut b, mut c) = three_nodes();
    // Graceful leave: the others log "left", not "down".
    let status = b.p.terminate();
    assert!(status.success(), "b exits cleanly on SIGTERM: {status:?}");
    for n in [&mut a, &mut c] {
        n.wait_members(2);
        n.wait_log(&["member left", "b ("]);
    }
    assert!(
        !a.p.drain_log()
            .iter()
            .any(|l| l.contains("member is down") && l.contains("b (")),
        "b left; it was not detected as failed"
    );
}

#[test]
fn a_node_with_another_key_is_refused() {
    let mut a = Node::start("ka", "127.0.0.1:0", "", Some("right key"));
    let seed = a.addr();
    let mut wrong = Node::start("kw", "127.0.0.1:0", &seed, Some("wrong key"));
    let mut keyless = Node::start("kn", "127.0.0.1:0", &seed, None);
    // Both intruders announce as they start; the seed logs and ignores them.
    a.wait_log(&["ignoring gossip packet", "does not authenticate"]);
    a.wait_log(&["ignoring gossip packet", "unencrypted packet"]);
    let mut good = Node::start("kg", "127.0.0.1:0", &seed, Some("right key"));
    a.wait_members(2);
    good.wait_members(2);
    assert_eq!(wrong.current()["members"], 1);
    assert_eq!(keyless.current()["members"], 1);
    assert_eq!(a.current()["members"], 2);
}

/// `netkit serve` with every door off and `flags`; it must fail before serving.
fn serve_refuses(flags: &[&str]) -> String {
    let out = bin()
        .args([
            "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--relay", "off", "--http",
            "off", "--chat", "off",
        ])
        .args(flags)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn status_json_without_clustering_names_join() {
    assert!(serve_refuses(&["--status-json", "1s"]).contains("--join"));
}

#[test]
fn a_bad_node_name_is_refused_before_serving() {
    let err = serve_refuses(&[
        "--join",
        "",
        "--node-name",
        "a b",
        "--cluster-listen",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("--node-name"));
}

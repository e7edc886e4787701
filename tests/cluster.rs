//! Real `netkit serve` processes gossiping on 127.0.0.1: convergence, `kill -9`
//! detection, restart and rejoin, graceful leave, and a wrong cluster key.
//! Every wait reads the nodes' `--status-json` lines (or their logs) with a
//! deadline; nothing sleeps for correctness.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);

/// One running node, with its status lines and log lines arriving on channels.
struct Node {
    name: String,
    child: Child,
    status: Receiver<Value>,
    log: Receiver<String>,
    last: Option<Value>,
    logs: Vec<String>,
}

impl Node {
    fn start(name: &str, listen: &str, join: &str, key: Option<&str>) -> Node {
        let data = std::env::temp_dir().join("netkit-cluster-test");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netkit"));
        cmd.args([
            "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--http", "off", "--chat",
            "off",
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
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("NETKIT_CLUSTER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(k) = key {
            cmd.args(["--cluster-key", k]);
        }
        let mut child = cmd.spawn().expect("spawn netkit");
        let (stx, status) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && stx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let (ltx, log) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if ltx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Node {
            name: name.to_string(),
            child,
            status,
            log,
            last: None,
            logs: Vec::new(),
        };
        node.wait_status(|_| true, "a first status line");
        node
    }

    /// Waits for a status line satisfying `pred`.
    fn wait_status(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.status.recv_timeout(left) {
                Ok(v) => {
                    self.last = Some(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => {
                    let log = self.drain_log();
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

    fn drain_log(&mut self) -> Vec<String> {
        while let Ok(l) = self.log.try_recv() {
            self.logs.push(l);
        }
        self.logs.clone()
    }

    /// Waits for a log line containing every one of `parts`.
    fn wait_log(&mut self, parts: &[&str]) -> String {
        let matches = |l: &String| parts.iter().all(|p| l.contains(p));
        if let Some(l) = self.logs.iter().find(|l| matches(l)) {
            return l.clone();
        }
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) => {
                    self.logs.push(l.clone());
                    if matches(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "{}: no log line with {parts:?} within {DEADLINE:?}; log: {:?}",
                    self.name, self.logs
                ),
            }
        }
    }

    fn addr(&self) -> String {
        self.last.as_ref().unwrap()["addr"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn terminate(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn three_nodes_detect_a_kill_and_the_restarted_node_rejoins() {
    let mut a = Node::start("a", "127.0.0.1:0", "", None);
    let seed = a.addr();
    let mut b = Node::start("b", "127.0.0.1:0", &seed, None);
    let mut c = Node::start("c", "127.0.0.1:0", &seed, None);
    for n in [&mut a, &mut b, &mut c] {
        n.wait_members(3);
    }
    let c_addr = c.addr();

    c.child.kill().unwrap(); // SIGKILL: no goodbye
    c.child.wait().unwrap();
    for n in [&mut a, &mut b] {
        n.wait_members(2);
        n.wait_log(&["member is down", "c ("]);
    }
    // The first datagram sent to c's unbound port drew an ICMP "port
    // unreachable", which its sender took as an early failed probe.
    let early = [&mut a, &mut b].into_iter().any(|n| {
        n.drain_log()
            .iter()
            .any(|l| l.contains("gossip port is unreachable") && l.contains("c ("))
    });
    assert!(
        early,
        "a or b suspected c from ICMP: {:?} {:?}",
        a.logs, b.logs
    );

    // Same name, same address: a new generation that wins over the down one.
    let b_addr = b.addr();
    let mut c = Node::start("c", &c_addr, &b_addr, None);
    for n in [&mut a, &mut b, &mut c] {
        n.wait_members(3);
    }

    // Graceful leave: the others log "left", not "down".
    b.terminate();
    let status = b.child.wait().unwrap();
    assert!(status.success(), "b exits cleanly on SIGTERM: {status:?}");
    for n in [&mut a, &mut c] {
        n.wait_members(2);
        n.wait_log(&["member left", "b ("]);
    }
    a.drain_log();
    assert!(
        !a.logs
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

#[test]
fn cluster_flags_are_checked_before_serving() {
    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args([
            "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--http", "off", "--chat",
            "off",
        ])
        .args(["--status-json", "1s"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--join"));

    let out = Command::new(env!("CARGO_BIN_EXE_netkit"))
        .args([
            "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--http", "off", "--chat",
            "off", "--join", "",
        ])
        .args(["--node-name", "a b", "--cluster-listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-name"));
}

//! Runs the real `netkit` binary for integration tests: starts it with
//! `--ready-json` and learns its bound addresses from that one stdout line,
//! keeps its stderr log for assertions, signals it, and collects its exit.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub use netkit::ready::Ready;

/// How long a start waits for the ready line.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running netkit process: its stdout and stderr lines arrive on channels.
pub struct Netkit {
    pub child: Child,
    lines: Receiver<String>,
    stdout: Receiver<String>,
    /// Every stderr (log) line read so far.
    pub seen: Vec<String>,
    /// The addresses from the ready line (all `None` until [`Netkit::wait_ready`]).
    pub ready: Ready,
}

/// The binary, logging at `info`.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_netkit"));
    c.env("RUST_LOG", "info").env_remove("NO_COLOR");
    c
}

/// Sends each line of `from` on a channel, from a thread of its own.
fn line_channel(from: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Netkit {
    /// Starts `netkit --ready-json ARGS` and returns once it has bound its
    /// sockets (their addresses are in [`Netkit::ready`]).
    pub fn spawn(args: &[&str]) -> Netkit {
        let mut cmd = bin();
        cmd.arg("--ready-json").args(args);
        Self::start(cmd)
    }

    /// Starts `netkit serve` with its HTTP and chat doors on free loopback
    /// ports, the other doors off, state in `data_dir`, and `extra` flags.
    pub fn serve_chat(data_dir: &std::path::Path, extra: &[&str]) -> Netkit {
        Self::serve_chat_drop(data_dir, "off", extra)
    }

    /// [`Netkit::serve_chat`] with the drop door at `drop` (`off` or an address).
    pub fn serve_chat_drop(data_dir: &std::path::Path, drop: &str, extra: &[&str]) -> Netkit {
        Self::spawn(&Self::serve_chat_args(data_dir, drop, extra))
    }

    /// The arguments of [`Netkit::serve_chat_drop`] (after `--ready-json`).
    pub fn serve_chat_args<'a>(
        data_dir: &'a std::path::Path,
        drop: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let dir = data_dir.to_str().unwrap();
        let mut args = vec![
            "serve",
            "--relay",
            "off",
            "--http",
            "127.0.0.1:0",
            "--chat",
            "127.0.0.1:0",
            "--tcp",
            "off",
            "--udp",
            "off",
            "--drop",
            drop,
            "--data-dir",
            dir,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Starts `cmd` with `NETKIT_READY_JSON=1` and returns once it has bound
    /// its sockets (their addresses are in [`Netkit::ready`]).
    pub fn start(mut cmd: Command) -> Netkit {
        cmd.env("NETKIT_READY_JSON", "1");
        let mut p = Self::from_command(cmd);
        p.wait_ready();
        p
    }

    /// Starts `cmd` with stdout and stderr piped, without waiting for anything.
    pub fn from_command(mut cmd: Command) -> Netkit {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn netkit");
        let lines = line_channel(child.stderr.take().unwrap());
        let stdout = line_channel(child.stdout.take().unwrap());
        Netkit {
            child,
            lines,
            stdout,
            seen: Vec::new(),
            ready: Ready::default(),
        }
    }

    /// Reads the ready line, which is the first line on stdout, into [`Netkit::ready`].
    pub fn wait_ready(&mut self) -> &Ready {
        let line = match self.stdout.recv_timeout(READY_WITHIN) {
            Ok(line) => line,
            Err(e) => {
                self.drain_log();
                panic!(
                    "no ready line within {READY_WITHIN:?} ({e:?}); log:\n{}",
                    self.seen.join("\n")
                )
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the first stdout line is not JSON ({e}): {line}"));
        assert_eq!(v["ready"], true, "not a ready line: {line}");
        self.ready = serde_json::from_value(v).unwrap();
        &self.ready
    }

    /// The next stdout line after the ready line, or `None` once stdout is
    /// closed; panics after `timeout`.
    pub fn stdout_line(&mut self, timeout: Duration) -> Option<String> {
        match self.next_stdout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no stdout line within {timeout:?}"),
        }
    }

    /// The next stdout line after the ready line, or why there was none within `timeout`.
    pub fn next_stdout(&mut self, timeout: Duration) -> Result<String, RecvTimeoutError> {
        self.stdout.recv_timeout(timeout)
    }

    /// Everything left on stdout, up to its end (call once the process exits).
    pub fn stdout_string(&mut self) -> String {
        let mut s = String::new();
        while let Some(l) = self.stdout_line(Duration::from_secs(20)) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    }

    /// Moves the stderr lines that have already arrived into [`Netkit::seen`].
    pub fn drain_log(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    /// Waits for a stderr line containing `needle`, failing after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_log(&[needle], timeout)
    }

    /// Waits for a stderr line containing every one of `parts`, failing after `timeout`.
    pub fn wait_log(&mut self, parts: &[&str], timeout: Duration) -> String {
        let matches = |l: &String| parts.iter().all(|p| l.contains(p));
        if let Some(l) = self.seen.iter().find(|l| matches(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {parts:?} within {timeout:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "netkit ended before logging {parts:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Sends signal `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20))
    }

    /// `kill -9`, and the exit collected.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits (bounded) for the exit; the whole log is then in [`Netkit::seen`].
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if !exited_within(&self.child, timeout) {
            let _ = self.child.kill();
            panic!(
                "netkit did not exit within {timeout:?}; saw:\n{}",
                self.seen.join("\n")
            );
        }
        let st = self.child.wait().unwrap();
        // Keep what it logged for failure messages.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        st
    }
}

impl Drop for Netkit {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs netkit to completion with `stdin` fed in, bounded by `timeout`.
pub fn run_with_stdin(
    args: &[&str],
    stdin: &[u8],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let mut cmd = bin();
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    if !exited_within(&child, timeout) {
        let _ = child.kill();
        panic!("netkit {args:?} did not finish within {timeout:?}");
    }
    let status = child.wait().unwrap();
    writer.join().unwrap();
    (status, o.join().unwrap(), e.join().unwrap())
}

/// Blocks until `child` has exited or `timeout` passed, and says which. The
/// child is not reaped (`WNOWAIT`), so `Child::wait` still gets its status.
pub fn exited_within(child: &Child, timeout: Duration) -> bool {
    let pid = child.id();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        // SAFETY: waitid(2) writes only into the zeroed siginfo we own.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        let _ = tx.send(rc == 0);
    });
    rx.recv_timeout(timeout).unwrap_or(false)
}

/// Every front door of `netkit serve` that takes `ADDR|off`.
pub const SERVE_DOORS: [&str; 6] = ["--http", "--chat", "--tcp", "--udp", "--drop", "--relay"];

/// `netkit serve ARGS --data-dir DATA`, every door that `args` does not name
/// turned off; returns once it is ready.
pub fn serve_only(data: &std::path::Path, args: &[&str]) -> Netkit {
    let mut all = vec!["serve"];
    for door in SERVE_DOORS {
        if !args.contains(&door) {
            all.extend([door, "off"]);
        }
    }
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().unwrap()]);
    Netkit::spawn(&all)
}

/// Every file under `dir`, part files included.
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// Raises this process's open-file limit to at least `n` (up to the hard
/// limit); returns the limit now.
pub fn raise_nofile(n: u64) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur < n {
            l.rlim_cur = n.min(l.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        }
    }
    l.rlim_cur
}

/// `netkit serve` as a cluster node on 127.0.0.1 with fast failure detection:
/// HTTP on port 0, line chat on port 0 when `chat`, every other door off.
/// Callers may add flags before starting it with [`Netkit::start`].
pub fn cluster_node_command(
    name: &str,
    data: &std::path::Path,
    listen: &str,
    join: &str,
    chat: bool,
) -> Command {
    let mut cmd = bin();
    cmd.args([
        "serve", "--tcp", "off", "--udp", "off", "--drop", "off", "--relay", "off",
    ])
    .args(["--http", "127.0.0.1:0"])
    .args(["--chat", if chat { "127.0.0.1:0" } else { "off" }])
    .arg("--data-dir")
    .arg(data)
    .args(["--node-name", name, "--cluster-listen", listen])
    .args(["--join", join])
    .args(["--cluster-probe-period", "200ms"])
    .args(["--cluster-probe-rtt", "80ms"])
    .args(["--cluster-suspect-timeout", "600ms"])
    .args(["--cluster-gossip-interval", "50ms"])
    .env_remove("NETKIT_CLUSTER_KEY")
    .stdin(Stdio::null());
    cmd
}

/// A `netkit serve` cluster node (see [`cluster_node_command`]) and its
/// bound addresses.
pub struct ClusterNode {
    pub p: Netkit,
    pub http: SocketAddr,
    /// The line-chat address, when started with chat.
    pub chat: Option<SocketAddr>,
    pub gossip: SocketAddr,
}

impl ClusterNode {
    /// Starts node `name` gossiping on `listen`, joining through `join`,
    /// with line chat when `chat`, and no chat rate limit.
    pub fn start(
        name: &str,
        data: &std::path::Path,
        listen: &str,
        join: &str,
        chat_on: bool,
    ) -> Self {
        let mut cmd = cluster_node_command(name, data, listen, join, chat_on);
        cmd.args(["--chat-rate", "0"]);
        let p = Netkit::start(cmd);
        let http = p.ready.http.expect("http is on");
        let chat = p.ready.chat;
        assert_eq!(chat.is_some(), chat_on, "line chat is on only when asked");
        let gossip = p.ready.cluster.expect("clustering is on");
        ClusterNode {
            p,
            http,
            chat,
            gossip,
        }
    }

    /// Nodes `a` (in `dirs[0]`) and `b` (in `dirs[1]`, joining through a),
    /// gossiping on free ports, returned once each lists the other as alive.
    pub fn pair(dirs: &[tempfile::TempDir], chat: bool) -> (Self, Self) {
        let a = Self::start("a", dirs[0].path(), "127.0.0.1:0", "", chat);
        let b = Self::start(
            "b",
            dirs[1].path(),
            "127.0.0.1:0",
            &a.gossip.to_string(),
            chat,
        );
        wait_until("a and b see each other", Duration::from_secs(30), || {
            a.alive_peers() == 1 && b.alive_peers() == 1
        });
        (a, b)
    }

    /// The line-chat address (the node was started with chat).
    pub fn chat(&self) -> SocketAddr {
        self.chat.expect("started with line chat")
    }

    /// `kill -9`, and the exit collected.
    pub fn kill9(&mut self) {
        self.p.kill9();
    }

    /// `GET path` on the node's HTTP server, as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        http_get_json(self.http, path)
    }

    /// How many other members `/api/cluster` lists as alive.
    pub fn alive_peers(&self) -> usize {
        self.get("/api/cluster")["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["self"] == false && m["state"] == "alive")
            .count()
    }
}

/// `GET path` over HTTP/1.0 with a 30 s read timeout; the body as JSON
/// (the status must be 200).
pub fn http_get_json(http: SocketAddr, path: &str) -> serde_json::Value {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

/// Polls `ok` every 50 ms until it holds; panics after `deadline`. For state
/// that is only visible by asking (an HTTP API), not for anything awaitable.
pub fn wait_until(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !ok() {
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
}

/// A line-chat (TCP) user; every line read is kept.
pub struct LineUser {
    out: std::net::TcpStream,
    lines: BufReader<std::net::TcpStream>,
    /// Every line read so far.
    pub seen: Vec<String>,
    /// Lines before this index were consumed by an earlier wait.
    mark: usize,
}

impl LineUser {
    /// Connects to `chat` and takes the nick `nick` (waits for the answer).
    pub fn connect(chat: SocketAddr, nick: &str) -> LineUser {
        let out = std::net::TcpStream::connect(chat).unwrap();
        out.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let lines = BufReader::new(out.try_clone().unwrap());
        let mut u = LineUser {
            out,
            lines,
            seen: Vec::new(),
            mark: 0,
        };
        u.send(&format!("/nick {nick}"));
        u.wait_for(&format!("is now known as {nick}"));
        u
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) {
        self.out.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// Sends raw bytes as they are (no newline added).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.write_all(bytes).unwrap();
    }

    /// Waits for a line containing `needle` after the last one waited for;
    /// returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            if let Some(i) = self.seen[self.mark..]
                .iter()
                .position(|l| l.contains(needle))
            {
                self.mark += i + 1;
                return self.seen[self.mark - 1].clone();
            }
            let mut l = String::new();
            match self.lines.read_line(&mut l) {
                Ok(n) if n > 0 => self.seen.push(l.trim_end().to_string()),
                other => panic!(
                    "no line with {needle:?} ({other:?}); saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// How many lines seen so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }

    /// The texts of `<nick>` messages seen, in order.
    pub fn texts_from(&self, nick: &str) -> Vec<String> {
        let tag = format!(" <{nick}> ");
        self.seen
            .iter()
            .filter_map(|l| l.split_once(&tag).map(|(_, t)| t.to_string()))
            .collect()
    }
}

/// `netkit recv --listen 127.0.0.1:0 --dir DIR FLAGS…`, and the address its ready line names.
pub fn recv(dir: &std::path::Path, flags: &[&str]) -> (Netkit, SocketAddr) {
    let mut args = vec![
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let p = Netkit::spawn(&args);
    let addr = p.ready.recv.expect("recv's ready line");
    (p, addr)
}

/// An application token (HS256 with `secret`) for `sub`, valid for 10 minutes.
pub fn hs256_token(secret: &[u8], sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

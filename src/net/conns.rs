//! The TCP connection table, IPv4 and IPv6, with states and owning processes,
//! like `netstat -antp`. Read from /proc through the procfs crate.

use std::collections::HashMap;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::cli::parse_duration;

/// Command-line options of `netkit conns`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// Only connections with this local or remote port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only connections in this state (LISTEN, ESTABLISHED, TIME_WAIT, …).
    #[arg(long)]
    pub state: Option<TcpState>,
    /// Redraw every interval and mark what changed (+ new, * state changed, - gone).
    #[arg(long)]
    pub watch: bool,
    /// Time between redraws with --watch.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// With --watch, stop after this many redraws.
    #[arg(long)]
    pub count: Option<u64>,
    /// Print JSON (one array per redraw with --watch).
    #[arg(long)]
    pub json: bool,
}

/// A TCP state, named as netstat names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    /// Waiting for connections.
    Listen,
    /// Connect sent, waiting for SYN-ACK.
    SynSent,
    /// SYN received, handshake not complete.
    SynRecv,
    /// Open; data flows both ways.
    Established,
    /// Closed locally, FIN not yet acknowledged.
    #[serde(rename = "FIN_WAIT1")]
    FinWait1,
    /// Closed locally and acknowledged; waiting for the peer's FIN.
    #[serde(rename = "FIN_WAIT2")]
    FinWait2,
    /// The peer closed; waiting for the local side to close.
    CloseWait,
    /// Both closed; waiting for the last ACK.
    LastAck,
    /// Both sides closed at once.
    Closing,
    /// Closed; waiting out stray segments.
    TimeWait,
    /// Not in use.
    Close,
    /// A request socket in the SYN queue.
    NewSynRecv,
}

impl TcpState {
    const ALL: [TcpState; 12] = [
        TcpState::Listen,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Closing,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::NewSynRecv,
    ];

    /// The netstat name: `LISTEN`, `TIME_WAIT`, …
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Listen => "LISTEN",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Closing => "CLOSING",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    fn from_procfs(s: &procfs::net::TcpState) -> TcpState {
        use procfs::net::TcpState as P;
        match s {
            P::Established => TcpState::Established,
            P::SynSent => TcpState::SynSent,
            P::SynRecv => TcpState::SynRecv,
            P::FinWait1 => TcpState::FinWait1,
            P::FinWait2 => TcpState::FinWait2,
            P::TimeWait => TcpState::TimeWait,
            P::Close => TcpState::Close,
            P::CloseWait => TcpState::CloseWait,
            P::LastAck => TcpState::LastAck,
            P::Listen => TcpState::Listen,
            P::Closing => TcpState::Closing,
            P::NewSynRecv => TcpState::NewSynRecv,
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TcpState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        let norm = match norm.as_str() {
            "FIN_WAIT_1" => "FIN_WAIT1".to_string(),
            "FIN_WAIT_2" => "FIN_WAIT2".to_string(),
            _ => norm,
        };
        TcpState::ALL
            .into_iter()
            .find(|st| st.name() == norm)
            .ok_or_else(|| {
                let names: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
                format!("unknown TCP state '{s}'; use one of {}", names.join(", "))
            })
    }
}

/// One row of the connection table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conn {
    /// `tcp` or `tcp6`.
    pub proto: &'static str,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address (`0.0.0.0:0` for a listener).
    pub remote: SocketAddr,
    /// The state.
    pub state: TcpState,
    /// Bytes queued for receiving.
    pub rx_queue: u32,
    /// Bytes queued for sending.
    pub tx_queue: u32,
    /// Owner's user id.
    pub uid: u32,
    /// The socket's inode (0 for sockets no process holds, e.g. TIME_WAIT).
    pub inode: u64,
    /// Owning process id, where it can be read.
    pub pid: Option<i32>,
    /// Owning process name, where it can be read.
    pub program: Option<String>,
}

impl Conn {
    /// Whether the local or remote port is `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.local.port() == port || self.remote.port() == port
    }
}

/// Reads the whole TCP table (IPv4 and IPv6) with owning processes.
pub fn table() -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::new();
    for (proto, entries) in [("tcp", procfs::net::tcp()), ("tcp6", procfs::net::tcp6())] {
        let entries = match entries {
            Ok(e) => e,
            // A kernel without IPv6 has no tcp6 table.
            Err(_) if proto == "tcp6" => continue,
            Err(e) => anyhow::bail!("cannot read /proc/net/tcp: {e} — is /proc mounted?"),
        };
        conns.extend(entries.into_iter().map(|e| Conn {
            proto,
            local: e.local_address,
            remote: e.remote_address,
            state: TcpState::from_procfs(&e.state),
            rx_queue: e.rx_queue,
            tx_queue: e.tx_queue,
            uid: e.uid,
            inode: e.inode,
            pid: None,
            program: None,
        }));
    }
    let owners = socket_owners();
    for c in &mut conns {
        if let Some((pid, name)) = owners.get(&c.inode).filter(|_| c.inode != 0) {
            c.pid = Some(*pid);
            c.program = Some(name.clone());
        }
    }
    conns.sort_by(|a, b| {
        (a.state, a.local.port(), a.local, a.remote).cmp(&(
            b.state,
            b.local.port(),
            b.local,
            b.remote,
        ))
    });
    Ok(conns)
}

/// Maps socket inodes to the process holding them, for the processes we may read.
fn socket_owners() -> HashMap<u64, (i32, String)> {
    let mut map = HashMap::new();
    let Ok(procs) = procfs::process::all_processes() else {
        return map;
    };
    for p in procs.flatten() {
        let Ok(fds) = p.fd() else { continue };
        let mut name = None;
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                let name = name.get_or_insert_with(|| p.stat().map(|s| s.comm).unwrap_or_default());
                map.entry(inode).or_insert_with(|| (p.pid, name.clone()));
            }
        }
    }
    map
}

/// Keeps the rows that match the filters.
pub fn filter(conns: Vec<Conn>, port: Option<u16>, state: Option<TcpState>) -> Vec<Conn> {
    conns
        .into_iter()
        .filter(|c| port.is_none_or(|p| c.has_port(p)))
        .filter(|c| state.is_none_or(|s| c.state == s))
        .collect()
}

/// How a row changed since the previous redraw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Unchanged.
    Same,
    /// Not there before.
    New,
    /// There before, in another state.
    StateChanged,
    /// Gone since the previous redraw.
    Gone,
}

impl Change {
    fn mark(self) -> char {
        match self {
            Change::Same => ' ',
            Change::New => '+',
            Change::StateChanged => '*',
            Change::Gone => '-',
        }
    }
}

/// Compares two tables by (local, remote) pair: rows of `now` marked new or
/// changed, followed by the rows of `before` that are gone.
pub fn diff(before: &[Conn], now: &[Conn]) -> Vec<(Change, Conn)> {
    let key = |c: &Conn| (c.local, c.remote);
    let old: HashMap<_, _> = before.iter().map(|c| (key(c), c.state)).collect();
    let cur: HashMap<_, _> = now.iter().map(|c| (key(c), c.state)).collect();
    let mut out: Vec<(Change, Conn)> = now
        .iter()
        .map(|c| {
            let change = match old.get(&key(c)) {
                None => Change::New,
                Some(s) if *s != c.state => Change::StateChanged,
                Some(_) => Change::Same,
            };
            (change, c.clone())
        })
        .collect();
    out.extend(
        before
            .iter()
            .filter(|c| !cur.contains_key(&key(c)))
            .map(|c| (Change::Gone, c.clone())),
    );
    out
}

fn render(rows: &[(Change, Conn)], marks: bool) -> String {
    let mut s = String::new();
    let m = if marks { "  " } else { "" };
    s.push_str(&format!(
        "{m}{:<5} {:<46} {:<46} {:<12} {}\n",
        "PROTO", "LOCAL ADDRESS", "REMOTE ADDRESS", "STATE", "PID/PROGRAM"
    ));
    for (change, c) in rows {
        let owner = match (&c.pid, &c.program) {
            (Some(pid), Some(p)) => format!("{pid}/{p}"),
            _ => "-".into(),
        };
        let m = if marks {
            format!("{} ", change.mark())
        } else {
            String::new()
        };
        s.push_str(&format!(
            "{m}{:<5} {:<46} {:<46} {:<12} {}\n",
            c.proto,
            c.local.to_string(),
            c.remote.to_string(),
            c.state.name(),
            owner
        ));
    }
    s
}

/// Runs `netkit conns`.
pub async fn run_command(args: ConnsArgs) -> anyhow::Result<()> {
    let read = || -> anyhow::Result<Vec<Conn>> { Ok(filter(table()?, args.port, args.state)) };
    let mut out = std::io::stdout().lock();
    if !args.watch {
        let rows = read()?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        } else {
            let rows: Vec<_> = rows.into_iter().map(|c| (Change::Same, c)).collect();
            write!(out, "{}", render(&rows, false))?;
        }
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let mut before: Option<Vec<Conn>> = None;
    let mut ticks = 0u64;
    let mut interval = tokio::time::interval(args.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = crate::shutdown::signal() => return Ok(()),
        }
        let now = read()?;
        let rows = match &before {
            Some(b) => diff(b, &now),
            None => now.iter().map(|c| (Change::Same, c.clone())).collect(),
        };
        if args.json {
            let v: Vec<_> = rows
                .iter()
                .map(|(ch, c)| {
                    let mut v = serde_json::to_value(c).unwrap_or_default();
                    v["change"] = format!("{ch:?}").to_lowercase().into();
                    v
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            if tty {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            writeln!(
                out,
                "{stamp}  {} connections  (+ new, * state changed, - gone)",
                now.len()
            )?;
            write!(out, "{}", render(&rows, true))?;
            if !tty {
                writeln!(out)?;
            }
        }
        out.flush()?;
        before = Some(now);
        ticks += 1;
        if args.count.is_some_and(|c| ticks >= c) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(local: &str, remote: &str, state: TcpState) -> Conn {
        Conn {
            proto: "tcp",
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            rx_queue: 0,
            tx_queue: 0,
            uid: 0,
            inode: 1,
            pid: None,
            program: None,
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in TcpState::ALL {
            assert_eq!(s.name().parse::<TcpState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert_eq!("time-wait".parse::<TcpState>().unwrap(), TcpState::TimeWait);
        assert_eq!(
            "fin_wait_2".parse::<TcpState>().unwrap(),
            TcpState::FinWait2
        );
        assert!("OPEN".parse::<TcpState>().unwrap_err().contains("LISTEN"));
    }

    #[test]
    fn diff_marks_new_changed_and_gone() {
        let a = conn("127.0.0.1:1", "127.0.0.1:2", TcpState::Established);
        let b = conn("127.0.0.1:3", "127.0.0.1:4", TcpState::Established);
        let c = conn("127.0.0.1:5", "0.0.0.0:0", TcpState::Listen);
        let mut a2 = a.clone();
        a2.state = TcpState::FinWait2;
        let d = diff(&[a, b.clone()], &[a2, c]);
        let marks: Vec<_> = d.iter().map(|(ch, c)| (*ch, c.local.port())).collect();
        assert_eq!(
            marks,
            vec![
                (Change::StateChanged, 1),
                (Change::New, 5),
                (Change::Gone, 3)
            ]
        );
        let text = render(&d, true);
        assert!(text.contains("* tcp"), "{text}");
        assert!(text.contains("FIN_WAIT2"));
    }

    #[test]
    fn filters() {
        let rows = vec![
            conn("127.0.0.1:80", "0.0.0.0:0", TcpState::Listen),
            conn("127.0.0.1:5000", "127.0.0.1:80", TcpState::Established),
            conn("127.0.0.1:6000", "127.0.0.1:7000", TcpState::Established),
        ];
        assert_eq!(filter(rows.clone(), Some(80), None).len(), 2);
        assert_eq!(
            filter(rows.clone(), Some(80), Some(TcpState::Listen)).len(),
            1
        );
        assert_eq!(filter(rows, None, Some(TcpState::Established)).len(), 2);
    }

    #[test]
    fn reads_a_real_listener_with_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let rows = filter(table().unwrap(), Some(port), Some(TcpState::Listen));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].pid, Some(std::process::id() as i32));
    }
}

//! The UDP client: sends each message, retransmits when no reply comes in
//! time, prints each reply's round-trip time, and ends with a loss summary.
//!
//! The retransmission rule lives in [`Exchange`], free of sockets and clocks,
//! so it is tested directly; [`run_command`] drives it over a real socket.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::cli::{parse_duration, parse_size};

/// Command-line options of `netkit udp send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Server address, `host:port` or `[v6]:port`.
    pub addr: String,
    /// The message to send; without it, every line of stdin is sent.
    pub message: Option<String>,
    /// How many times to send MESSAGE.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub count: u64,
    /// How long to wait for a reply before retransmitting.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Retransmissions per message before it counts as lost.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Pause between messages.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Receive buffer; a larger reply is reported as truncated.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub buffer: u64,
    /// Print one JSON object per reply and a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The retransmission state of one message (sans-IO: the caller owns time and sockets).
#[derive(Debug, Clone)]
pub struct Exchange {
    timeout: Duration,
    retries: u32,
    sends: u32,
    first_sent: Instant,
    last_sent: Instant,
}

/// What the caller does next for an [`Exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send (again) and wait until the given instant.
    SendAndWaitUntil(Instant),
    /// No reply after every retry: the message is lost.
    GiveUp,
}

/// A reply matched to its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// Time since the latest transmission.
    pub rtt: Duration,
    /// Time since the first transmission.
    pub total: Duration,
    /// How many times the message was sent.
    pub sends: u32,
}

impl Exchange {
    /// A new exchange: send now, then wait `timeout`; retransmit up to `retries` times.
    pub fn start(now: Instant, timeout: Duration, retries: u32) -> (Self, Next) {
        let ex = Exchange {
            timeout,
            retries,
            sends: 1,
            first_sent: now,
            last_sent: now,
        };
        (ex, Next::SendAndWaitUntil(now + timeout))
    }

    /// The wait ran out at `now`: retransmit or give up.
    pub fn on_timeout(&mut self, now: Instant) -> Next {
        if self.sends > self.retries {
            return Next::GiveUp;
        }
        self.sends += 1;
        self.last_sent = now;
        Next::SendAndWaitUntil(now + self.timeout)
    }

    /// A reply arrived at `now`.
    pub fn on_reply(&self, now: Instant) -> Answered {
        Answered {
            rtt: now - self.last_sent,
            total: now - self.first_sent,
            sends: self.sends,
        }
    }
}

/// Counts and round-trip statistics over a run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Messages sent (not counting retransmissions).
    pub sent: u64,
    /// Messages answered.
    pub received: u64,
    /// Retransmissions over all messages.
    pub retransmits: u64,
    /// Replies cut because they did not fit the buffer.
    pub truncated: u64,
    rtts: Vec<Duration>,
}

impl Summary {
    /// Records an answered message.
    pub fn answered(&mut self, a: &Answered) {
        self.sent += 1;
        self.received += 1;
        self.retransmits += u64::from(a.sends - 1);
        self.rtts.push(a.rtt);
    }

    /// Records a lost message that was sent `sends` times.
    pub fn lost(&mut self, sends: u32) {
        self.sent += 1;
        self.retransmits += u64::from(sends.saturating_sub(1));
    }

    /// Messages with no reply.
    pub fn lost_count(&self) -> u64 {
        self.sent - self.received
    }

    /// Minimum, mean and maximum round-trip time, if any reply came.
    pub fn rtt_min_avg_max(&self) -> Option<(Duration, Duration, Duration)> {
        let min = *self.rtts.iter().min()?;
        let max = *self.rtts.iter().max()?;
        let avg = self.rtts.iter().sum::<Duration>() / self.rtts.len() as u32;
        Some((min, avg, max))
    }

    /// The closing line, like ping's.
    pub fn text(&self, target: &str) -> String {
        let pct = if self.sent == 0 {
            0.0
        } else {
            100.0 * self.lost_count() as f64 / self.sent as f64
        };
        let mut s = format!(
            "--- {target}: {} sent, {} received, {} lost ({pct:.1}% loss), {} retransmits",
            self.sent,
            self.received,
            self.lost_count(),
            self.retransmits
        );
        if self.truncated > 0 {
            let _ = write!(s, ", {} truncated", self.truncated);
        }
        if let Some((min, avg, max)) = self.rtt_min_avg_max() {
            let _ = write!(
                s,
                "; rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
                ms(min),
                ms(avg),
                ms(max)
            );
        }
        s
    }

    /// The summary as JSON.
    pub fn json(&self, target: &str) -> serde_json::Value {
        let rtt = self.rtt_min_avg_max();
        serde_json::json!({
            "summary": true,
            "target": target,
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost_count(),
            "retransmits": self.retransmits,
            "truncated": self.truncated,
            "rtt_min_ms": rtt.map(|r| ms(r.0)),
            "rtt_avg_ms": rtt.map(|r| ms(r.1)),
            "rtt_max_ms": rtt.map(|r| ms(r.2)),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `netkit udp send`. Fails (exit 1) when any message got no reply.
pub async fn run_command(args: SendArgs) -> anyhow::Result<()> {
    let target: SocketAddr = tokio::net::lookup_host(&args.addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot resolve {}: {e} — give HOST:PORT, e.g. 127.0.0.1:8002",
                args.addr
            )
        })?
        .next()
        .with_context(|| format!("{} resolved to no address", args.addr))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)
        .await
        .context("cannot open a UDP socket")?;
    socket
        .connect(target)
        .await
        .with_context(|| format!("cannot set {target} as the peer"))?;
    let buffer = usize::try_from(args.buffer)
        .unwrap_or(usize::MAX)
        .clamp(1, 65_536);
    let mut client = Client {
        socket,
        buf: vec![0u8; buffer],
        args: &args,
        target,
        summary: Summary::default(),
    };

    if let Some(msg) = &args.message {
        for i in 0..args.count {
            if i > 0 && !args.interval.is_zero() {
                tokio::time::sleep(args.interval).await;
            }
            client.exchange(i + 1, msg.as_bytes()).await?;
        }
    } else {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut seq = 0;
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            seq += 1;
            client.exchange(seq, line.as_bytes()).await?;
        }
    }

    let summary = client.summary;
    if args.json {
        println!("{}", summary.json(&args.addr));
    } else {
        println!("{}", summary.text(&args.addr));
    }
    if summary.lost_count() > 0 {
        anyhow::bail!(
            "{} of {} messages got no reply from {target} after {} retransmits each",
            summary.lost_count(),
            summary.sent,
            args.retries
        );
    }
    Ok(())
}

struct Client<'a> {
    socket: UdpSocket,
    buf: Vec<u8>,
    args: &'a SendArgs,
    target: SocketAddr,
    summary: Summary,
}

impl Client<'_> {
    /// Sends one message until it is answered or given up.
    async fn exchange(&mut self, seq: u64, payload: &[u8]) -> anyhow::Result<()> {
        // A late reply to an earlier message must not count for this one.
        while self.socket.try_recv(&mut self.buf).is_ok() {}
        let (mut ex, mut next) =
            Exchange::start(Instant::now(), self.args.timeout, self.args.retries);
        let mut refused = false;
        loop {
            let until = match next {
                Next::SendAndWaitUntil(t) => t,
                Next::GiveUp => {
                    self.summary.lost(ex.sends);
                    let why = if refused {
                        "port unreachable: nothing listens there"
                    } else {
                        "no reply"
                    };
                    if self.args.json {
                        println!(
                            "{}",
                            serde_json::json!({"seq": seq, "lost": true, "sends": ex.sends, "reason": why})
                        );
                    } else {
                        println!("seq={seq} lost: {why} after {} sends", ex.sends);
                    }
                    return Ok(());
                }
            };
            if let Err(e) = self.socket.send(payload).await {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    refused = true;
                } else {
                    return Err(anyhow::anyhow!("cannot send to {}: {e}", self.target));
                }
            }
            loop {
                match tokio::time::timeout_at(until, super::recv_from(&self.socket, &mut self.buf))
                    .await
                {
                    Err(_) => {
                        next = ex.on_timeout(Instant::now());
                        break;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        // ICMP port unreachable: keep waiting out the timeout, then retry.
                        refused = true;
                        continue;
                    }
                    Ok(Err(e)) => {
                        return Err(anyhow::anyhow!("cannot receive from {}: {e}", self.target));
                    }
                    Ok(Ok(got)) => {
                        let a = ex.on_reply(Instant::now());
                        self.summary.answered(&a);
                        self.report(seq, &got, &a);
                        return Ok(());
                    }
                }
            }
        }
    }

    fn report(&mut self, seq: u64, got: &super::Received, a: &Answered) {
        let text = String::from_utf8_lossy(&self.buf[..got.len]);
        let text = text.trim_end_matches(['\r', '\n']);
        if let Some(size) = got.truncated_from {
            self.summary.truncated += 1;
            tracing::warn!(
                "reply of {size} bytes truncated to {} (raise --buffer)",
                got.len
            );
        }
        if self.args.json {
            println!(
                "{}",
                serde_json::json!({
                    "seq": seq, "from": got.peer.to_string(), "reply": text, "bytes": got.len,
                    "truncated_from": got.truncated_from, "rtt_ms": ms(a.rtt), "sends": a.sends,
                })
            );
        } else {
            let mut line = format!(
                "seq={seq} from {}: {text:?} rtt={:.3} ms",
                got.peer,
                ms(a.rtt)
            );
            if a.sends > 1 {
                let _ = write!(
                    line,
                    " after {} sends ({:.3} ms since the first)",
                    a.sends,
                    ms(a.total)
                );
            }
            if let Some(size) = got.truncated_from {
                let _ = write!(line, " TRUNCATED: {size} bytes, buffer holds {}", got.len);
            }
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmits_then_gives_up() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(100);
        let (mut ex, next) = Exchange::start(t0, timeout, 2);
        assert_eq!(next, Next::SendAndWaitUntil(t0 + timeout));
        let t1 = t0 + timeout;
        assert_eq!(ex.on_timeout(t1), Next::SendAndWaitUntil(t1 + timeout));
        let t2 = t1 + timeout;
        assert_eq!(ex.on_timeout(t2), Next::SendAndWaitUntil(t2 + timeout));
        assert_eq!(ex.on_timeout(t2 + timeout), Next::GiveUp);
    }

    #[test]
    fn rtt_counts_from_the_latest_send() {
        let t0 = Instant::now();
        let (mut ex, _) = Exchange::start(t0, Duration::from_millis(100), 3);
        ex.on_timeout(t0 + Duration::from_millis(100));
        let a = ex.on_reply(t0 + Duration::from_millis(130));
        assert_eq!(a.rtt, Duration::from_millis(30));
        assert_eq!(a.total, Duration::from_millis(130));
        assert_eq!(a.sends, 2);
    }

    #[test]
    fn summary_counts_loss_and_retransmits() {
        let mut s = Summary::default();
        s.answered(&Answered {
            rtt: Duration::from_millis(1),
            total: Duration::from_millis(1),
            sends: 1,
        });
        s.answered(&Answered {
            rtt: Duration::from_millis(3),
            total: Duration::from_millis(9),
            sends: 2,
        });
        s.lost(4);
        assert_eq!(
            (s.sent, s.received, s.lost_count(), s.retransmits),
            (3, 2, 1, 4)
        );
        let (min, avg, max) = s.rtt_min_avg_max().unwrap();
        assert_eq!(
            (min, avg, max),
            (
                Duration::from_millis(1),
                Duration::from_millis(2),
                Duration::from_millis(3)
            )
        );
        let text = s.text("x:1");
        assert!(
            text.contains("3 sent, 2 received, 1 lost (33.3% loss), 4 retransmits"),
            "{text}"
        );
    }
}

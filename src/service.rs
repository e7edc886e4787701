//! The small services both the TCP and the UDP server run, free of sockets:
//! given what a client sent (a line, bytes or a datagram), what goes back.
//!
//! `rand` is the classic: every line gets a random integer 0–99 and a newline,
//! and the line `STOP` ends the connection. `echo` (RFC 862) returns every byte,
//! `daytime` (RFC 867) sends the time and closes, `discard` (RFC 863) drops
//! everything.

use rand::RngExt;

/// Which service a TCP or UDP server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// A random integer 0–99 per line; `STOP` closes.
    Rand,
    /// Every byte back as it came (RFC 862).
    Echo,
    /// The current time, then close (RFC 867).
    Daytime,
    /// Read and drop everything (RFC 863).
    Discard,
}

/// What the connection does after a line has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep reading.
    Continue,
    /// Flush what was written and close.
    Close,
}

impl Service {
    /// Whether the service works on lines (and so is bound by the line limit).
    pub fn is_line_based(self) -> bool {
        matches!(self, Service::Rand)
    }

    /// What the server sends as soon as a client connects; `Close` ends the
    /// connection after sending it.
    pub fn greet(self, out: &mut Vec<u8>) -> Control {
        match self {
            Service::Daytime => {
                out.extend_from_slice(daytime().as_bytes());
                out.extend_from_slice(b"\r\n");
                Control::Close
            }
            _ => Control::Continue,
        }
    }

    /// Handles one complete line (without its `\n`; a trailing `\r` is ignored).
    pub fn on_line(self, line: &[u8], out: &mut Vec<u8>) -> Control {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self {
            Service::Rand => {
                if line == b"STOP" {
                    return Control::Close;
                }
                let n: u8 = rand::rng().random_range(0..100);
                push_decimal(out, n);
                out.push(b'\n');
                Control::Continue
            }
            Service::Echo => {
                out.extend_from_slice(line);
                out.push(b'\n');
                Control::Continue
            }
            Service::Daytime | Service::Discard => Control::Continue,
        }
    }

    /// Handles raw bytes for the services that do not work on lines.
    pub fn on_bytes(self, data: &[u8], out: &mut Vec<u8>) {
        if self == Service::Echo {
            out.extend_from_slice(data);
        }
    }

    /// The answer to one datagram, for the UDP server; `None` sends nothing.
    pub fn on_datagram(self, data: &[u8], out: &mut Vec<u8>) -> Option<()> {
        match self {
            Service::Echo => out.extend_from_slice(data),
            Service::Rand => {
                let n: u8 = rand::rng().random_range(0..100);
                push_decimal(out, n);
                out.push(b'\n');
            }
            Service::Daytime => {
                out.extend_from_slice(daytime().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Service::Discard => return None,
        }
        Some(())
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u8) {
    if n >= 10 {
        out.push(b'0' + n / 10);
    }
    out.push(b'0' + n % 10);
}

/// The current time as RFC 3339 in UTC, e.g. `2026-11-21T20:05:00Z`.
pub fn daytime() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_answers_every_line_with_0_to_99() {
        let mut seen = [false; 100];
        for _ in 0..5000 {
            let mut out = Vec::new();
            assert_eq!(Service::Rand.on_line(b"hello", &mut out), Control::Continue);
            assert_eq!(out.last(), Some(&b'\n'));
            let n: usize = std::str::from_utf8(&out[..out.len() - 1])
                .unwrap()
                .parse()
                .unwrap();
            assert!(n < 100);
            seen[n] = true;
        }
        assert!(
            seen.iter().filter(|s| **s).count() > 90,
            "rand should spread over 0..100"
        );
    }

    #[test]
    fn rand_stops_on_stop_with_or_without_cr() {
        let mut out = Vec::new();
        assert_eq!(Service::Rand.on_line(b"STOP", &mut out), Control::Close);
        assert_eq!(Service::Rand.on_line(b"STOP\r", &mut out), Control::Close);
        assert!(out.is_empty());
        assert_eq!(
            Service::Rand.on_line(b"STOPPED", &mut out),
            Control::Continue
        );
    }

    #[test]
    fn rand_takes_invalid_utf8() {
        let mut out = Vec::new();
        assert_eq!(
            Service::Rand.on_line(&[0xff, 0xfe, 0x00], &mut out),
            Control::Continue
        );
        assert!(!out.is_empty());
    }

    #[test]
    fn daytime_greets_and_closes() {
        let mut out = Vec::new();
        assert_eq!(Service::Daytime.greet(&mut out), Control::Close);
        let s = String::from_utf8(out).unwrap();
        assert!(s.ends_with("Z\r\n"), "{s}");
        assert_eq!(Service::Rand.greet(&mut Vec::new()), Control::Continue);
    }

    #[test]
    fn echo_and_discard() {
        let mut out = Vec::new();
        Service::Echo.on_bytes(b"abc\xff", &mut out);
        assert_eq!(out, b"abc\xff");
        let mut out = Vec::new();
        Service::Discard.on_bytes(b"abc", &mut out);
        assert!(out.is_empty());
        assert!(Service::Discard.on_datagram(b"x", &mut out).is_none());
        assert!(Service::Echo.on_datagram(b"x", &mut out).is_some());
    }
}

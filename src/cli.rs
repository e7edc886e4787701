//! Parsers shared by the command line: durations, byte sizes and listen
//! addresses that may be `off`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Parses a duration such as `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        // Refuses negative, NaN, infinite, and more seconds than a Duration holds.
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("'{s}' is not a valid duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a valid duration ({e}); try 500ms, 5s or 2m"))
}

/// Parses a byte size such as `4096`, `64KiB`, `1MiB`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; try 4096, 64KiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}'; use B, KiB, MiB or GiB"
            ));
        }
    };
    let v = num * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v as u64)
}

/// A listen address for one of `netkit serve`'s front doors, or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// The service is not started.
    Off,
    /// Bind this address (`host:port`; port 0 picks a free port).
    Addr(String),
}

impl Listen {
    /// The address to bind, or `None` when the service is off.
    pub fn addr(&self) -> Option<&str> {
        match self {
            Listen::Off => None,
            Listen::Addr(a) => Some(a),
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        if s.is_empty() {
            return Err("empty address; give HOST:PORT or 'off'".into());
        }
        if !s.contains(':') {
            return Err(format!(
                "'{s}' has no port; give HOST:PORT (port 0 for any free port) or 'off'"
            ));
        }
        Ok(Listen::Addr(s.to_string()))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::Addr(a) => f.write_str(a),
        }
    }
}

/// Binds a TCP listener, with an error message that names the address and the fix.
pub async fn bind_tcp(addr: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(addr, flag, e))
}

/// Binds a UDP socket, with an error message that names the address and the fix.
pub async fn bind_udp(addr: &str, flag: &str) -> anyhow::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|e| bind_error(addr, flag, e))
}

/// The error for a failed bind: names the address and the flag that fixes it.
pub fn bind_error(addr: &str, flag: &str, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("address in use — pass {flag} 127.0.0.1:0 for any free port")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("permission denied — ports below 1024 need privileges; pass {flag} 127.0.0.1:0")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("address not available on this machine — pass {flag} 127.0.0.1:0")
        }
        _ => e.to_string(),
    };
    anyhow::anyhow!("cannot bind {addr}: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
        // More seconds than a Duration holds: an error, not a panic (a
        // line-chat `/ban NICK 66666666666666666666666` reached this).
        assert!(parse_duration("66666666666666666666666").is_err());
        assert!(parse_duration("1e300").is_err());
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("inf").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn listen() {
        assert_eq!("off".parse::<Listen>().unwrap(), Listen::Off);
        assert_eq!(
            "127.0.0.1:0".parse::<Listen>().unwrap().addr(),
            Some("127.0.0.1:0")
        );
        assert!("8080".parse::<Listen>().is_err());
        assert!("".parse::<Listen>().is_err());
    }
}

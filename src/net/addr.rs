//! Address resolution for the networks Go's `net` package names: tcp, tcp4,
//! tcp6, udp, udp4, udp6 (with `host:port`) and ip, ip4, ip6 (a host alone).
//! IPv6 literals go in brackets with a port (`[::1]:80`) and may carry a zone
//! (`[fe80::1%lo]:80`); ports may be numbers or names from /etc/services.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::cli::parse_duration;

/// Command-line options of `netkit resolve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResolveArgs {
    /// tcp, tcp4, tcp6, udp, udp4, udp6, ip, ip4 or ip6.
    pub network: Network,
    /// `host:port`, `[v6]:port`, `[fe80::1%lo]:80`, or just a host for the ip networks.
    pub address: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up on a name lookup after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// A network name as Go's `net` package spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// TCP over IPv4 or IPv6.
    Tcp,
    /// TCP over IPv4 only.
    Tcp4,
    /// TCP over IPv6 only.
    Tcp6,
    /// UDP over IPv4 or IPv6.
    Udp,
    /// UDP over IPv4 only.
    Udp4,
    /// UDP over IPv6 only.
    Udp6,
    /// Any IP host.
    Ip,
    /// An IPv4 host.
    Ip4,
    /// An IPv6 host.
    Ip6,
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

const NETWORKS: &str = "tcp, tcp4, tcp6, udp, udp4, udp6, ip, ip4, ip6";

impl FromStr for Network {
    type Err = ResolveError;
    fn from_str(s: &str) -> Result<Self, ResolveError> {
        Ok(match s {
            "tcp" => Network::Tcp,
            "tcp4" => Network::Tcp4,
            "tcp6" => Network::Tcp6,
            "udp" => Network::Udp,
            "udp4" => Network::Udp4,
            "udp6" => Network::Udp6,
            "ip" => Network::Ip,
            "ip4" => Network::Ip4,
            "ip6" => Network::Ip6,
            _ => return Err(ResolveError::UnknownNetwork(s.to_string())),
        })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

impl Network {
    /// The family this network is limited to, if any.
    pub fn family(self) -> Option<Family> {
        match self {
            Network::Tcp4 | Network::Udp4 | Network::Ip4 => Some(Family::Ipv4),
            Network::Tcp6 | Network::Udp6 | Network::Ip6 => Some(Family::Ipv6),
            _ => None,
        }
    }

    /// Whether addresses of this network carry a port.
    pub fn has_port(self) -> bool {
        !matches!(self, Network::Ip | Network::Ip4 | Network::Ip6)
    }

    fn proto(self) -> &'static str {
        match self {
            Network::Udp | Network::Udp4 | Network::Udp6 => "udp",
            _ => "tcp",
        }
    }
}

/// Why an address did not resolve. Each message names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The network name is not one we know.
    #[error("unknown network '{0}': use one of {NETWORKS}")]
    UnknownNetwork(String),
    /// A port network was given an address without a port.
    #[error("'{0}' has no port: {1} addresses are host:port, e.g. 127.0.0.1:80 or [::1]:80")]
    MissingPort(String, Network),
    /// An ip network was given a port.
    #[error("'{0}' has a port, but {1} addresses are a host alone, e.g. 127.0.0.1 or ::1")]
    UnexpectedPort(String, Network),
    /// An IPv6 literal with a port but without brackets, or other malformed input.
    #[error("malformed address '{0}': {1}")]
    Malformed(String, &'static str),
    /// The port is not a number in 0–65535 nor a known service name.
    #[error("bad port '{port}': use a number 0–65535 or a service name from /etc/services")]
    BadPort {
        /// The port as given.
        port: String,
    },
    /// A literal address of the other family.
    #[error("{network} needs an {want} address, but {addr} is {got}")]
    FamilyMismatch {
        /// The network asked for.
        network: Network,
        /// The family it needs.
        want: Family,
        /// The family given.
        got: Family,
        /// The address given.
        addr: String,
    },
    /// The name resolved, but to no address of the needed family.
    #[error("{host} has no {want} address (it resolves to {found}); try {alt}")]
    NoAddressOfFamily {
        /// The host name.
        host: String,
        /// The family asked for.
        want: Family,
        /// What it did resolve to.
        found: String,
        /// The network that would work.
        alt: String,
    },
    /// The name lookup failed.
    #[error("cannot resolve host '{host}': {reason}")]
    UnknownHost {
        /// The host name.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// A zone on an IPv4 address, or an interface that does not exist.
    #[error("bad zone '{zone}': {reason}")]
    BadZone {
        /// The zone as given.
        zone: String,
        /// What was wrong.
        reason: String,
    },
}

/// One resolved address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// The network it was resolved for.
    pub network: Network,
    /// IPv4 or IPv6.
    pub family: Family,
    /// The IP address.
    pub ip: IpAddr,
    /// The port, for tcp and udp networks.
    pub port: Option<u16>,
    /// The IPv6 zone (interface name or number), if one was given.
    pub zone: Option<String>,
    /// The interface index the zone names (0 when none).
    pub scope_id: u32,
}

impl Resolved {
    /// The address as one string: `1.2.3.4:80`, `[fe80::1%lo]:80`, or the IP alone.
    pub fn address(&self) -> String {
        let ip = match (&self.ip, &self.zone) {
            (IpAddr::V6(v6), Some(z)) => format!("{v6}%{z}"),
            (ip, _) => ip.to_string(),
        };
        match (self.port, self.family) {
            (Some(p), Family::Ipv6) => format!("[{ip}]:{p}"),
            (Some(p), Family::Ipv4) => format!("{ip}:{p}"),
            (None, _) => ip,
        }
    }

    /// The socket address, for the port networks.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let port = self.port?;
        Some(match self.ip {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V4(v4), port),
            IpAddr::V6(v6) => {
                SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, 0, self.scope_id))
            }
        })
    }
}

/// The parts of an address before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal (no brackets, no zone).
    pub host: String,
    /// Zone after `%`, if any.
    pub zone: Option<String>,
    /// Port, for the port networks.
    pub port: Option<u16>,
}

/// Splits `address` as `network` expects it, without any lookup.
pub fn split(network: Network, address: &str) -> Result<HostPort, ResolveError> {
    let malformed = |why| ResolveError::Malformed(address.to_string(), why);
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| malformed("'[' without ']'"))?;
        let port = if after.is_empty() {
            None
        } else {
            Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| malformed("expected ':' after ']'"))?,
            )
        };
        if !inside.contains(':') {
            return Err(malformed("brackets are for IPv6 addresses only"));
        }
        (inside, port)
    } else if network.has_port() {
        match address.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(malformed(
                    "an IPv6 address with a port needs brackets, e.g. [::1]:80",
                ));
            }
            Some((h, p)) => (h, Some(p)),
            None => (address, None),
        }
    } else {
        // An ip-network host: a colon means IPv6, unless it is `host:port`.
        match address.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (address, None),
        }
    };
    if host.contains(['[', ']']) {
        return Err(malformed("stray bracket"));
    }
    let port = match (network.has_port(), port) {
        (true, None) => return Err(ResolveError::MissingPort(address.to_string(), network)),
        (false, Some(_)) => return Err(ResolveError::UnexpectedPort(address.to_string(), network)),
        (false, None) => None,
        (true, Some(p)) => Some(parse_port(p, network.proto())?),
    };
    let (host, zone) = match host.split_once('%') {
        Some((h, "")) => {
            return Err(ResolveError::BadZone {
                zone: String::new(),
                reason: format!("empty zone after '%' in {h}"),
            });
        }
        Some((h, z)) => (h, Some(z.to_string())),
        None => (host, None),
    };
    if !network.has_port() && host.is_empty() {
        return Err(malformed("no host"));
    }
    Ok(HostPort {
        host: host.to_string(),
        zone,
        port,
    })
}

fn parse_port(p: &str, proto: &str) -> Result<u16, ResolveError> {
    if p.is_empty() {
        return Err(ResolveError::BadPort {
            port: p.to_string(),
        });
    }
    if p.bytes().all(|b| b.is_ascii_digit()) {
        return p.parse().map_err(|_| ResolveError::BadPort {
            port: p.to_string(),
        });
    }
    service_port(p, proto).ok_or_else(|| ResolveError::BadPort {
        port: p.to_string(),
    })
}

/// Looks a service name up in /etc/services.
fn service_port(name: &str, proto: &str) -> Option<u16> {
    let text = std::fs::read_to_string("/etc/services").ok()?;
    text.lines().find_map(|line| {
        let line = line.split('#').next()?;
        let mut words = line.split_whitespace();
        let svc = words.next()?;
        let (port, p) = words.next()?.split_once('/')?;
        let matches = svc == name || words.any(|alias| alias == name);
        (matches && p == proto).then(|| port.parse().ok()).flatten()
    })
}

fn zone_index(zone: &str, ip: &IpAddr) -> Result<u32, ResolveError> {
    if ip.is_ipv4() {
        return Err(ResolveError::BadZone {
            zone: zone.to_string(),
            reason: "zones belong to IPv6 addresses only".into(),
        });
    }
    if let Ok(n) = zone.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(zone).map_err(|_| ResolveError::BadZone {
        zone: zone.escape_debug().to_string(),
        reason: "contains NUL".into(),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(ResolveError::BadZone {
            zone: zone.to_string(),
            reason: "no such network interface (see `ip link`)".into(),
        });
    }
    Ok(idx)
}

/// Resolves `address` for `network`: literals directly, names through the
/// system resolver (within `timeout`), filtered by the network's family.
pub async fn resolve(
    network: Network,
    address: &str,
    timeout: Duration,
) -> Result<Vec<Resolved>, ResolveError> {
    let hp = split(network, address)?;
    let want = network.family();
    let make = |ip: IpAddr, scope_id: u32, zone: Option<String>| Resolved {
        network,
        family: Family::of(&ip),
        ip,
        port: hp.port,
        zone,
        scope_id,
    };

    if hp.host.is_empty() {
        // ":80" means every local address, as with Go's ResolveTCPAddr.
        let mut out = Vec::new();
        if want != Some(Family::Ipv6) {
            out.push(make(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, None));
        }
        if want != Some(Family::Ipv4) {
            out.push(make(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0, None));
        }
        return Ok(out);
    }

    if let Ok(ip) = hp.host.parse::<IpAddr>() {
        let got = Family::of(&ip);
        if let Some(want) = want.filter(|w| *w != got) {
            return Err(ResolveError::FamilyMismatch {
                network,
                want,
                got,
                addr: address.to_string(),
            });
        }
        let scope = match &hp.zone {
            Some(z) => zone_index(z, &ip)?,
            None => 0,
        };
        return Ok(vec![make(ip, scope, hp.zone.clone())]);
    }
    if let Some(z) = &hp.zone {
        return Err(ResolveError::BadZone {
            zone: z.clone(),
            reason: format!("a zone needs an IPv6 literal, not the name '{}'", hp.host),
        });
    }

    let host = hp.host.clone();
    let lookup = tokio::net::lookup_host((host.clone(), hp.port.unwrap_or(0)));
    let addrs = match tokio::time::timeout(timeout, lookup).await {
        Err(_) => {
            return Err(ResolveError::UnknownHost {
                host,
                reason: format!(
                    "no answer within {} (--timeout)",
                    humantime::format_duration(timeout)
                ),
            });
        }
        Ok(Err(e)) => {
            return Err(ResolveError::UnknownHost {
                host,
                reason: clean_gai(&e),
            });
        }
        Ok(Ok(a)) => a,
    };
    let mut all: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if !all.contains(&a.ip()) {
            all.push(a.ip());
        }
    }
    let out: Vec<Resolved> = all
        .iter()
        .filter(|ip| want.is_none_or(|w| Family::of(ip) == w))
        .map(|ip| make(*ip, 0, None))
        .collect();
    if out.is_empty() {
        let want = want.unwrap_or(Family::Ipv4);
        let found = all
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let alt = network.to_string().trim_end_matches(['4', '6']).to_string();
        return Err(ResolveError::NoAddressOfFamily {
            host,
            want,
            found,
            alt,
        });
    }
    Ok(out)
}

fn clean_gai(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = s
        .strip_prefix("failed to lookup address information: ")
        .unwrap_or(&s);
    s.to_string()
}

/// Runs `netkit resolve`.
pub async fn run_command(args: ResolveArgs) -> anyhow::Result<()> {
    let list = resolve(args.network, &args.address, args.timeout).await?;
    if args.json {
        let rows: Vec<_> = list
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["address"] = r.address().into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<6} {:<40} {:>5}  ZONE", "FAMILY", "IP", "PORT");
        for r in &list {
            let port = r.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let zone = match (&r.zone, r.scope_id) {
                (Some(z), id) => format!("{z} (index {id})"),
                (None, _) => "-".into(),
            };
            println!("{:<6} {:<40} {:>5}  {}", r.family, r.ip, port, zone);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    #[test]
    fn splits() {
        let hp = split(net("tcp"), "127.0.0.1:80").unwrap();
        assert_eq!(
            (hp.host.as_str(), hp.port, hp.zone),
            ("127.0.0.1", Some(80), None)
        );
        let hp = split(net("tcp6"), "[fe80::1%lo]:8080").unwrap();
        assert_eq!(
            (hp.host.as_str(), hp.port, hp.zone.as_deref()),
            ("fe80::1", Some(8080), Some("lo"))
        );
        let hp = split(net("ip6"), "::1").unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("::1", None));
        let hp = split(net("ip"), "[::1]").unwrap();
        assert_eq!(hp.host, "::1");
        assert_eq!(split(net("tcp"), ":80").unwrap().host, "");
    }

    #[test]
    fn split_errors_name_the_problem() {
        assert!(matches!(
            split(net("tcp"), "localhost"),
            Err(ResolveError::MissingPort(..))
        ));
        assert!(matches!(
            split(net("tcp"), "::1:80"),
            Err(ResolveError::Malformed(..))
        ));
        assert!(matches!(
            split(net("tcp"), "[::1"),
            Err(ResolveError::Malformed(..))
        ));
        assert!(matches!(
            split(net("tcp"), "[127.0.0.1]:80"),
            Err(ResolveError::Malformed(..))
        ));
        assert!(matches!(
            split(net("tcp"), "host:99999"),
            Err(ResolveError::BadPort { .. })
        ));
        assert!(matches!(
            split(net("tcp"), "host:"),
            Err(ResolveError::BadPort { .. })
        ));
        assert!(matches!(
            split(net("udp"), "host:nosuchservice"),
            Err(ResolveError::BadPort { .. })
        ));
        assert!(matches!(
            split(net("ip4"), "1.2.3.4:80"),
            Err(ResolveError::UnexpectedPort(..))
        ));
        assert!(matches!(
            split(net("tcp6"), "[fe80::1%]:80"),
            Err(ResolveError::BadZone { .. })
        ));
        let e = "tcp5".parse::<Network>().unwrap_err();
        assert!(e.to_string().contains("unknown network 'tcp5'"), "{e}");
    }

    #[tokio::test]
    async fn literals_and_family_checks() {
        let r = resolve(net("tcp"), "127.0.0.1:80", T).await.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].address(), "127.0.0.1:80");
        assert_eq!(r[0].family, Family::Ipv4);
        let r = resolve(net("udp6"), "[::1]:53", T).await.unwrap();
        assert_eq!(r[0].socket_addr().unwrap(), "[::1]:53".parse().unwrap());
        let e = resolve(net("tcp4"), "[::1]:80", T).await.unwrap_err();
        assert!(matches!(
            e,
            ResolveError::FamilyMismatch {
                want: Family::Ipv4,
                got: Family::Ipv6,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "tcp4 needs an IPv4 address, but [::1]:80 is IPv6"
        );
        assert!(resolve(net("ip6"), "10.0.0.1", T).await.is_err());
        let r = resolve(net("ip"), "::1", T).await.unwrap();
        assert_eq!((r[0].port, r[0].address()), (None, "::1".to_string()));
    }

    #[tokio::test]
    async fn zones() {
        let r = resolve(net("tcp6"), "[fe80::1%lo]:80", T).await.unwrap();
        assert_eq!(r[0].zone.as_deref(), Some("lo"));
        assert!(r[0].scope_id > 0);
        assert_eq!(r[0].address(), "[fe80::1%lo]:80");
        let e = resolve(net("tcp6"), "[fe80::1%nosuchif0]:80", T)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no such network interface"), "{e}");
        let e = resolve(net("ip"), "127.0.0.1%lo", T).await.unwrap_err();
        assert!(e.to_string().contains("IPv6 addresses only"), "{e}");
    }

    #[tokio::test]
    async fn names_and_wildcards() {
        let r = resolve(net("tcp4"), "localhost:8080", T).await.unwrap();
        assert!(
            r.iter()
                .all(|a| a.family == Family::Ipv4 && a.port == Some(8080))
        );
        assert!(r.iter().any(|a| a.ip == IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let r = resolve(net("tcp"), ":80", T).await.unwrap();
        assert_eq!(r.len(), 2);
        let e = resolve(net("tcp"), "no-such-host.invalid:80", T)
            .await
            .unwrap_err();
        assert!(matches!(e, ResolveError::UnknownHost { .. }), "{e}");
        assert!(e.to_string().contains("no-such-host.invalid"));
    }
}

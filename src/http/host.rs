//! The names the HTTP server answers to: a request whose `Host` is not one of
//! them is refused (421) on every route, and a WebSocket `Origin` is checked
//! against them, so a page on a rebound DNS name (DNS rebinding) can neither
//! read the API nor open the chat.
//!
//! Allowed by default: an IP address (it cannot be rebound) with the bound
//! port, and `localhost` with the bound port when the server is bound to a
//! loopback or unspecified address. `--http-host NAME` adds public names
//! (`NAME` for any port, `NAME:PORT` for one). A request without `Host`
//! (HTTP/1.0) is allowed: every browser sends one, so it is not a browser page.

use std::net::{IpAddr, SocketAddr};

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The `Host` values (and `Origin` authorities) this server answers to.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Names from `--http-host`, lowercase, with their port if one was given.
    names: Vec<(String, Option<u16>)>,
    /// The bound address, once known (without it any port is accepted).
    bound: Option<SocketAddr>,
}

impl AllowedHosts {
    /// The hosts allowed for a server bound to `bound` with the extra
    /// `names` (`NAME` or `NAME:PORT`; unparsable ones are skipped).
    pub fn new(names: &[String], bound: Option<SocketAddr>) -> AllowedHosts {
        let names = names
            .iter()
            .filter_map(|n| split_authority(n.trim()))
            .collect();
        AllowedHosts { names, bound }
    }

    /// True if `authority` (a `Host` value: `name`, `name:port`, `[v6]:port`)
    /// names this server. Without a port it stands for `default_port`.
    pub fn allows(&self, authority: &str, default_port: u16) -> bool {
        let Some((host, port)) = split_authority(authority) else {
            return false;
        };
        if self
            .names
            .iter()
            .any(|(n, p)| *n == host && p.is_none_or(|p| Some(p) == port))
        {
            return true;
        }
        let port = port.unwrap_or(default_port);
        if self.bound.is_some_and(|b| b.port() != port) {
            return false;
        }
        if host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
        {
            return true;
        }
        host == "localhost"
            && self
                .bound
                .is_none_or(|b| b.ip().is_loopback() || b.ip().is_unspecified())
    }

    /// True if a page from `origin` (`scheme://authority`) is one of this
    /// server's own: its authority is allowed (the scheme's port when none is given).
    pub fn allows_origin(&self, origin: &str) -> bool {
        let Some((scheme, authority)) = origin.trim_end_matches('/').split_once("://") else {
            return false;
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        self.allows(authority, default_port)
    }
}

/// `name[:port]` (or `[v6][:port]`) as a lowercase name and its port; None if malformed.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority = authority.to_ascii_lowercase();
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        match &authority[end + 1..] {
            "" => (&authority[..=end], None),
            rest => (&authority[..=end], Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority.as_str(), None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host.to_string(), port))
}

/// The 421 Misdirected Request answer (saying how to allow the name) for a
/// request whose `Host` (or, without one, URI authority) this server does not
/// answer to; `None` lets the request through.
pub fn refusal(hosts: &AllowedHosts, req: &Request) -> Option<Response> {
    let host = match req.headers().get(header::HOST) {
        Some(v) => v.to_str().unwrap_or("\u{fffd}"),
        None => req.uri().authority()?.as_str(),
    };
    if hosts.allows(host, 80) {
        return None;
    }
    let shown: String = host.chars().take(100).collect();
    tracing::info!(host = %shown, "http: unknown host refused");
    Some(
        (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server does not answer to host '{shown}'; if that is its public name, \
                 start it with --http-host {shown}\n"
            ),
        )
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> AllowedHosts {
        AllowedHosts::new(&[], Some("127.0.0.1:8080".parse().unwrap()))
    }

    #[test]
    fn own_addresses_and_localhost_with_the_bound_port() {
        let h = loopback();
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
        ] {
            assert!(h.allows(ok, 80), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost:8081",
            "127.0.0.1:9",
            "localhost",
            "",
            "a@b:8080",
            "[::1",
            "127.0.0.1:x",
        ] {
            assert!(!h.allows(bad, 80), "{bad}");
        }
    }

    #[test]
    fn localhost_only_when_bound_to_loopback_or_any() {
        let public = AllowedHosts::new(&[], Some("192.0.2.7:8080".parse().unwrap()));
        assert!(public.allows("192.0.2.7:8080", 80));
        assert!(!public.allows("localhost:8080", 80));
        let any = AllowedHosts::new(&[], Some("0.0.0.0:8080".parse().unwrap()));
        assert!(any.allows("localhost:8080", 80));
        assert!(any.allows("10.1.2.3:8080", 80));
        assert!(!any.allows("evil.example:8080", 80));
    }

    #[test]
    fn configured_names_with_or_without_a_port() {
        let names = ["chat.example.org".to_string(), "Other.example:9000".into()];
        let h = AllowedHosts::new(&names, Some("127.0.0.1:8080".parse().unwrap()));
        assert!(h.allows("chat.example.org", 80));
        assert!(h.allows("chat.example.org:443", 80));
        assert!(h.allows("other.example:9000", 80));
        assert!(!h.allows("other.example:8080", 80));
        assert!(!h.allows("evil.example:8080", 80));
    }

    #[test]
    fn origins_are_checked_as_hosts() {
        let h = loopback();
        assert!(h.allows_origin("http://localhost:8080"));
        assert!(h.allows_origin("http://127.0.0.1:8080/"));
        assert!(!h.allows_origin("http://evil.example:8080"));
        assert!(!h.allows_origin("http://localhost"));
        assert!(!h.allows_origin("null"));
        assert!(!h.allows_origin("file://localhost:8080"));
    }
}

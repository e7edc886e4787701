//! Hardening headers on every HTTP response: a strict Content-Security-Policy
//! (no inline script or style; connections only to the page's own origin,
//! `/ws` included), nosniff, no referrer, no framing, and HSTS when serving TLS.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

/// How long browsers should insist on HTTPS once they saw it (one year).
const HSTS: &str = "max-age=31536000";

/// The policy for a page served from `host` (the request's Host header).
/// `'self'` in `connect-src` does not cover `ws:`/`wss:` in every browser, so
/// the WebSocket origin of the same host is named too.
pub fn content_security_policy(host: Option<&str>, tls: bool) -> String {
    let ws = host
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
        })
        .map(|h| format!(" {}://{h}", if tls { "wss" } else { "ws" }))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{ws}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// Middleware: adds the hardening headers; `tls` adds Strict-Transport-Security.
pub async fn add_headers(State(tls): State<bool>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    // A handler's own, stricter policy (a shared file's `sandbox`) stays.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY)
        && let Ok(v) = HeaderValue::from_str(&content_security_policy(host.as_deref(), tls))
    {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_own_websocket_origin_and_nothing_inline() {
        let p = content_security_policy(Some("chat.example:8443"), true);
        assert!(
            p.contains("connect-src 'self' wss://chat.example:8443;"),
            "{p}"
        );
        assert!(p.contains("frame-ancestors 'none'"));
        assert!(!p.contains("unsafe-inline"));
        let p = content_security_policy(Some("a:1"), false);
        assert!(p.contains("connect-src 'self' ws://a:1;"), "{p}");
        // A Host with odd characters is left out rather than echoed.
        let p = content_security_policy(Some("a; script-src *"), false);
        assert!(p.contains("connect-src 'self';"), "{p}");
    }
}

//! Hardening headers on every HTTP response: a strict Content-Security-Policy
//! (on pages: no inline script or style, connections only to the page's own
//! origin, `/ws` included; on everything else: nothing at all), nosniff, no
//! referrer, no framing, and HSTS when serving TLS.

use std::cell::RefCell;

use axum::http::{HeaderMap, HeaderValue, header};

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

/// A policy made for (Host bytes, TLS).
type MadePolicy = (Box<[u8]>, bool, HeaderValue);

thread_local! {
    /// The last policy made on this thread and the (Host, TLS) it was made
    /// for: a keep-alive client sends the same Host on every request.
    static LAST_POLICY: RefCell<Option<MadePolicy>> = const { RefCell::new(None) };
}

/// The Content-Security-Policy header for a request with this `Host`
/// ([`content_security_policy`]), reused while the Host stays the same.
pub fn policy_for(host: Option<&HeaderValue>, tls: bool) -> Option<HeaderValue> {
    let key = host.map_or(&[][..], HeaderValue::as_bytes);
    LAST_POLICY.with_borrow_mut(|last| {
        if let Some((h, t, v)) = last.as_ref()
            && *t == tls
            && **h == *key
        {
            return Some(v.clone());
        }
        let host = host.and_then(|v| v.to_str().ok());
        let v = HeaderValue::from_str(&content_security_policy(host, tls)).ok()?;
        *last = Some((key.into(), tls, v.clone()));
        Some(v)
    })
}

/// The policy of every response that is not an HTML page (the API's JSON,
/// scripts, styles, images, plain text): such a response loads nothing and
/// is framed by nobody, even when opened directly. Stricter than the page's
/// and a third of its size on the API's small answers.
pub const NOT_A_PAGE_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// Whether the response headers `h` are those of an HTML document.
fn is_html(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.get(..9)
                .is_some_and(|m| m.eq_ignore_ascii_case("text/html"))
        })
}

/// Adds the hardening headers to a response for a request with this
/// `host`: the page's policy ([`policy_for`]) on HTML, [`NOT_A_PAGE_POLICY`]
/// on anything else, either unless the handler set its own, stricter policy
/// (a shared file's `sandbox`); and Strict-Transport-Security when `tls`.
pub fn harden(h: &mut HeaderMap, host: Option<&HeaderValue>, tls: bool) {
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        let csp = if is_html(h) {
            policy_for(host, tls)
        } else {
            Some(HeaderValue::from_static(NOT_A_PAGE_POLICY))
        };
        if let Some(v) = csp {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
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

    #[test]
    fn pages_get_the_page_policy_and_everything_else_loads_nothing() {
        let host = HeaderValue::from_static("a:1");
        let with = |ct: Option<&'static str>, own: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            if let Some(own) = own {
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(own),
                );
            }
            harden(&mut h, Some(&host), false);
            h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .to_string()
        };
        let page = content_security_policy(Some("a:1"), false);
        assert_eq!(with(Some("text/html; charset=utf-8"), None), page);
        assert_eq!(with(Some("TEXT/HTML"), None), page);
        for ct in [
            Some("application/json"),
            Some("text/plain"),
            Some("image/png"),
            None,
        ] {
            assert_eq!(with(ct, None), NOT_A_PAGE_POLICY, "{ct:?}");
        }
        // A handler's own policy stands.
        let own = "default-src 'none'; sandbox";
        assert_eq!(with(Some("text/html"), Some(own)), own);
    }

    #[test]
    fn the_reused_policy_follows_host_and_tls() {
        let a = HeaderValue::from_static("a:1");
        let b = HeaderValue::from_static("b:2");
        let p = |h: Option<&HeaderValue>, tls| policy_for(h, tls).unwrap();
        assert_eq!(
            p(Some(&a), false),
            content_security_policy(Some("a:1"), false)
        );
        assert_eq!(
            p(Some(&a), false),
            content_security_policy(Some("a:1"), false)
        );
        assert_eq!(
            p(Some(&a), true),
            content_security_policy(Some("a:1"), true)
        );
        assert_eq!(
            p(Some(&b), true),
            content_security_policy(Some("b:2"), true)
        );
        assert_eq!(p(None, true), content_security_policy(None, true));
    }
}

//! The HTTP front door (axum): the embedded web app at `/`, the chat WebSocket
//! at `/ws`, the JSON API under `/api`, files shared in rooms ([`files`]),
//! Prometheus `/metrics` and `/healthz`, behind tower layers for timeouts,
//! body size and concurrency.

pub mod api;
pub mod assets;
pub mod files;
pub mod files_fetch;
pub mod get;
pub mod guard;
pub mod host;
pub mod loops;
pub mod metrics;
pub mod page_cache;
pub mod security;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{Instrument, info, info_span};

use crate::chat::ConnConfig;
use crate::chat::hub::Hub;
use crate::chat::ws;
use crate::cli::{parse_duration, parse_size};
use crate::cluster::report::ClusterInfo;
use crate::net::accept::Acceptor;

/// HTTP limits of `netkit serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Longest time an HTTP request may take (not counting WebSocket sessions).
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_HTTP_TIMEOUT")]
    pub http_timeout: Duration,
    /// Longest time a connection may take to deliver a request's headers,
    /// counted from its opening or from the previous response; a slower (or
    /// idle keep-alive) one is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: Duration,
    /// Largest HTTP request body accepted.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, env = "NETKIT_HTTP_BODY_LIMIT")]
    pub http_body_limit: u64,
    /// Most HTTP requests handled at once; more wait their turn.
    #[arg(long, default_value_t = 1024, env = "NETKIT_HTTP_CONCURRENCY")]
    pub http_concurrency: usize,
    /// Threads serving HTTP connections, each its own event loop; a
    /// connection stays on one (0: one per CPU). WebSocket sessions run on
    /// the shared runtime.
    #[arg(long, default_value_t = 0, env = "NETKIT_HTTP_THREADS")]
    pub http_threads: usize,
    /// Extra browser origins allowed to open /ws (e.g. http://example.org:8080),
    /// comma-separated; `*` allows any. The server's own host is always allowed.
    #[arg(long, value_delimiter = ',', env = "NETKIT_ALLOW_ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Public names the server answers to (NAME for any port, or NAME:PORT),
    /// repeatable or comma-separated. The bound address, any IP address with
    /// the bound port, and localhost (when bound to loopback or any address)
    /// always work; other Host values get 421 (DNS rebinding defence).
    #[arg(long, value_delimiter = ',', env = "NETKIT_HTTP_HOST")]
    pub http_host: Vec<String>,
    /// PEM file of the CA(s) that issued the other hubs' certificates: trusted
    /// instead of the system roots when this hub fetches a room file from
    /// another hub over HTTPS (their certificates must name the addresses
    /// their doors are reached at, e.g. an IP address SAN).
    #[arg(long, env = "NETKIT_CLUSTER_TLS_CA", value_name = "FILE")]
    pub cluster_tls_ca: Option<std::path::PathBuf>,
}

/// How the HTTP front door behaves.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Request timeout.
    pub timeout: Duration,
    /// How long a connection may take to deliver a request's headers.
    pub header_timeout: Duration,
    /// Body size limit in bytes.
    pub body_limit: usize,
    /// Concurrent request limit.
    pub concurrency: usize,
    /// Event-loop threads for the connections (0: one per CPU; see [`loops`]).
    pub threads: usize,
    /// Extra allowed origins (`*` = any).
    pub allow_origins: Vec<String>,
    /// Public names the server answers to besides its own addresses (see [`host`]).
    pub hosts: Vec<String>,
    /// The bound address (set by [`run`]): with it, Host values must carry its port.
    pub bound: Option<SocketAddr>,
    /// Per-connection WebSocket settings.
    pub conn: ConnConfig,
    /// TLS (HTTPS and WSS) and the per-address limit of this door.
    pub door: crate::net::door::Door,
    /// Files shared in rooms; `None` turns the file routes off.
    pub files: Option<Arc<crate::chat::files::FileStore>>,
    /// How the other hubs' HTTPS doors are checked when a room file is
    /// fetched from them (`--cluster-tls-ca`, else the system roots).
    pub peer_tls: crate::tls::ClientTlsArgs,
}

impl HttpConfig {
    /// Builds the configuration from flags.
    pub fn new(args: &HttpArgs, conn: ConnConfig) -> Self {
        HttpConfig {
            timeout: args.http_timeout,
            header_timeout: args.http_header_timeout,
            body_limit: usize::try_from(args.http_body_limit).unwrap_or(usize::MAX),
            concurrency: args.http_concurrency.max(1),
            threads: args.http_threads,
            allow_origins: args
                .allow_origin
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            hosts: args.http_host.clone(),
            bound: None,
            conn,
            door: crate::net::door::Door::plain("http"),
            files: None,
            peer_tls: crate::tls::ClientTlsArgs {
                tls_ca: args.cluster_tls_ca.clone(),
                ..Default::default()
            },
        }
    }
}

impl HttpConfig {
    /// The Host values (and WebSocket origins) this server answers to.
    pub fn allowed_hosts(&self) -> host::AllowedHosts {
        host::AllowedHosts::new(&self.hosts, self.bound)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_limit: 64 * 1024,
            concurrency: 1024,
            threads: 0,
            allow_origins: Vec::new(),
            hosts: Vec::new(),
            bound: None,
            conn: ConnConfig::default(),
            door: crate::net::door::Door::plain("http"),
            files: None,
            peer_tls: Default::default(),
        }
    }
}

/// What every handler shares: one reference-counted [`AppParts`], so the
/// copy axum makes for every request is one atomic increment (cloning the
/// parts one by one took seven, and a lock in the cancellation token's tree).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl From<AppParts> for AppState {
    fn from(parts: AppParts) -> Self {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    /// The chat hub.
    pub hub: Hub,
    /// Limits.
    pub config: Arc<HttpConfig>,
    /// When the server started.
    pub started: Instant,
    /// WebSocket sessions, waited for on shutdown.
    pub sessions: TaskTracker,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// This node and, when clustering is on, the membership (`GET /api/cluster`).
    pub cluster: Arc<ClusterInfo>,
    /// The newest page of each room's history, as last served.
    pub pages: page_cache::PageCache,
    /// Room files being fetched from other hubs.
    pub fetches: files_fetch::Fetches,
    /// The runtime WebSocket sessions run on (the process's, not the
    /// connection's event loop: see [`loops`]).
    pub sessions_rt: tokio::runtime::Handle,
}

/// The router with every route and layer. The file routes ([`files::routes`])
/// share the host check, the hardening headers, the request count and the
/// concurrency limit, but not the request timeout or the body limit.
pub fn router(state: AppState) -> Router {
    let cfg = state.config.clone();
    let guard = guard::GuardLayer::new(cfg.allowed_hosts(), cfg.door.is_tls());
    let files = files::routes()
        .with_state(state.clone())
        .layer(guard.clone());
    let api = Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::app_js))
        .route("/style.css", get(assets::style_css))
        .route("/ws", get(ws_upgrade))
        .route("/api/rooms", get(api::rooms))
        .route("/api/rooms/{room}/messages", get(api::messages))
        .route("/api/stats", get(api::stats))
        .route("/api/cluster", get(api::cluster))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try / or /api/rooms\n") })
        .with_state(state);
    api.layer(guard)
        .layer(RequestBodyLimitLayer::new(cfg.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            cfg.timeout,
        ))
        .merge(files)
        .layer(ConcurrencyLimitLayer::new(cfg.concurrency))
}

/// `ok`, or 503 `degraded: WHY` while the message broker is unreachable
/// (sends fail then; the rest of the server works).
async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.hub.log_trouble() {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {why}\n"),
        ),
    }
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then closes every
/// WebSocket (1001) and waits for the sessions to end. `cluster` tells
/// `/api/cluster` about this node and its membership; `None` reports a
/// standalone node named after the host.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: HttpConfig,
    cluster: Option<ClusterInfo>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = metrics::handle();
    let local = listener.local_addr()?;
    let cluster = match cluster {
        Some(c) => c,
        None => {
            let meta = crate::cluster::NodeMeta {
                http: Some(local),
                chat: None,
            };
            ClusterInfo::standalone(crate::cluster::host_name(), meta)
        }
    };
    let door = config.door.clone();
    let scheme = if door.is_tls() { "https" } else { "http" };
    info!("http: listening on {scheme}://{local}");
    let config = HttpConfig {
        bound: config.bound.or(Some(local)),
        ..config
    };
    let state = AppState::from(AppParts {
        hub,
        config: Arc::new(config),
        started: Instant::now(),
        sessions: TaskTracker::new(),
        shutdown: shutdown.clone(),
        // Behind an Arc: axum clones the state for every request.
        cluster: Arc::new(cluster),
        pages: Default::default(),
        fetches: Default::default(),
        sessions_rt: tokio::runtime::Handle::current(),
    });
    let sessions = state.sessions.clone();
    let header_timeout = state.config.header_timeout;
    let threads = state.config.threads;
    let app = router(state);
    // Our own accept loop rather than `axum::serve`, which sets neither
    // TCP_NODELAY nor a header timeout: without one, a client that sends half
    // a request line and waits holds its connection for ever.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD);
    let connections = TaskTracker::new();
    let loops = loops::Loops::start(threads);
    let mut acceptor = Acceptor::new("http");
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        // Nagle's algorithm would hold a small frame back until the client
        // ACKs the previous one, and a chat client that only listens ACKs
        // late (delayed ACK, up to 40 ms): every frame goes out at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("http: cannot set TCP_NODELAY: {e}");
        }
        let Some(permit) = door.admit(peer) else {
            continue;
        };
        // Shared with a WebSocket session upgraded from this connection, which outlives it.
        let permit = Arc::new(permit);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(permit.clone());
            app.clone().oneshot(req)
        });
        let (shutdown, door, http1) = (shutdown.clone(), door.clone(), http1.clone());
        // The connection moves to its event loop: registered there, not here.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "http: cannot hand the connection over: {e}");
                continue;
            }
        };
        loops.spawn(&connections, async move {
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "http: cannot take the connection: {e}");
                    return;
                }
            };
            let Some(stream) = door.handshake(stream).await else {
                return;
            };
            let conn = http1
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    // Finish the request in progress (bounded by the request
                    // timeout), then close; an idle connection closes at once.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "http: connection ended: {e}");
            }
        });
    }
    connections.close();
    connections.wait().await;
    sessions.close();
    sessions.wait().await;
    loops.stop().await;
    info!("http: stopped");
    Ok(())
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
        .into_response()
}

/// Query of `GET /ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// Nickname to ask for.
    pub nick: Option<String>,
    /// An application token (JWT) to log in with at once.
    pub token: Option<String>,
}

/// The largest request head (request line and headers) read; a larger one
/// gets `431 Request Header Fields Too Large`. hyper's own default is about
/// 400 KiB, which let one client make the server buffer 100 KB of headers.
pub const MAX_HEAD: usize = 32 * 1024;

/// True if a browser page from `origin` may open the WebSocket: it is the
/// server's own `host`, or in the allow-list. Requests without an Origin are
/// not from a browser page and are allowed (RFC 6455 §10.2).
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allow: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let origin = origin.trim_end_matches('/');
    if allow
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

async fn ws_upgrade(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<WsQuery>,
    permit: Option<axum::Extension<Arc<crate::net::limit::IpPermit>>>,
    upgrade: ws::WsUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    // The Host was checked already (see `host`): an Origin equal to it, or
    // naming another of the server's own hosts, is the server's own page.
    let own = origin.is_some_and(|o| app.config.allowed_hosts().allows_origin(o));
    if !own && !origin_allowed(origin, host, &app.config.allow_origins) {
        tracing::info!(%peer, origin, "ws: origin refused");
        return (
            StatusCode::FORBIDDEN,
            format!(
                "origin {} may not open this WebSocket; start the server with --allow-origin {}\n",
                origin.unwrap_or_default(),
                origin.unwrap_or_default()
            ),
        )
            .into_response();
    }
    let wanted = q.nick.as_deref().filter(|n| !n.is_empty());
    let (mut session, inbox) = match app.hub.connect_from(wanted, Some(peer.ip())) {
        Ok(pair) => pair,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
    };
    // A refused token is told over the socket (a page cannot read a failed
    // upgrade's status); the client stays a guest.
    if let Some(token) = q.token.as_deref().filter(|t| !t.is_empty())
        && let Err(e) = session.auth(token)
    {
        session.report(e);
    }
    let conn = app.config.conn.clone();
    let shutdown = app.shutdown.clone();
    let sessions = app.sessions.clone();
    upgrade.on_upgrade(&app.sessions_rt, move |socket| {
        sessions.track_future(
            async move {
                ws::serve_socket(socket, session, inbox, conn, shutdown).await;
                // The address's slot is held until the session ends.
                drop(permit);
            }
            .instrument(info_span!("chat-ws", %peer)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(None, Some("a:1"), &none));
        assert!(origin_allowed(Some("http://a:1"), Some("a:1"), &none));
        assert!(!origin_allowed(Some("http://evil:1"), Some("a:1"), &none));
        assert!(!origin_allowed(Some("http://a:1"), None, &none));
        let allow = vec!["http://evil:1".to_string()];
        assert!(origin_allowed(Some("http://evil:1"), Some("a:1"), &allow));
        assert!(origin_allowed(
            Some("http://x"),
            Some("a:1"),
            &["*".to_string()]
        ));
    }
}

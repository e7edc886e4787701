//! The concurrent TCP server: an accept loop that gives every connection its
//! own task, caps how many run at once, times out idle peers, bounds line
//! length, and drains on shutdown.
//!
//! Shutdown rule: once the shutdown token is cancelled the listener is
//! dropped (new clients are refused), idle connections close at once, and a
//! connection holding a partly received request keeps reading until that
//! request is complete and answered. After the grace period every remaining
//! connection is closed.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::cli::{Listen, parse_duration, parse_size};
use crate::service::{Control, Service};

/// Command-line options of `netkit tcp serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8001", env = "NETKIT_TCP_LISTEN")]
    pub listen: Listen,
    /// The service to run.
    #[arg(long, value_enum, default_value = "rand", env = "NETKIT_TCP_SERVICE")]
    pub service: Service,
    /// Connection limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Threads, each with its own listener (SO_REUSEPORT) and runtime; default: one per core.
    #[arg(long, env = "NETKIT_TCP_THREADS")]
    pub threads: Option<usize>,
    /// TLS for the service (`--tls-cert/--tls-key`).
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
    /// Connections per address.
    #[command(flatten)]
    pub per_ip: crate::net::limit::PerIpArgs,
}

/// Limits of a TCP line server, shared by `tcp serve` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Most connections served at once; a client over the cap gets an error line and is closed.
    #[arg(long, default_value_t = 10_000, env = "NETKIT_TCP_MAX_CONNS")]
    pub max_conns: usize,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration, env = "NETKIT_TCP_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// Longest line accepted, in bytes; a longer one gets an error line and the connection is closed.
    #[arg(long, default_value = "8KiB", value_parser = parse_size, env = "NETKIT_TCP_MAX_LINE")]
    pub max_line: u64,
    /// How long shutdown waits for in-flight requests before closing connections.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "NETKIT_TCP_GRACE")]
    pub grace: Duration,
}

/// How a server behaves; built from [`ServeArgs`] or by hand in tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service every connection gets.
    pub service: Service,
    /// Most connections served at once.
    pub max_conns: usize,
    /// Idle timeout per connection.
    pub idle_timeout: Duration,
    /// Longest accepted line in bytes.
    pub max_line: usize,
    /// Grace period on shutdown.
    pub grace: Duration,
    /// TLS (if any) and the per-address limit.
    pub door: crate::net::door::Door,
}

impl Config {
    /// A configuration for `service` from the limit flags.
    pub fn new(service: Service, limits: &LimitArgs) -> Self {
        Config {
            service,
            max_conns: limits.max_conns.max(1),
            idle_timeout: limits.idle_timeout,
            max_line: usize::try_from(limits.max_line)
                .unwrap_or(usize::MAX)
                .max(1),
            grace: limits.grace,
            door: crate::net::door::Door::plain("tcp"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            service: Service::Rand,
            max_conns: 10_000,
            idle_timeout: Duration::from_secs(300),
            max_line: 8192,
            grace: Duration::from_secs(5),
            door: crate::net::door::Door::plain("tcp"),
        }
    }
}

/// Counters of a running server, readable while it runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and served (or being served).
    pub served: AtomicU64,
    /// Connections turned away because the cap was reached.
    pub refused: AtomicU64,
    /// Requests (lines) answered over all connections.
    pub requests: AtomicU64,
}

/// Runs `netkit tcp serve` until SIGINT or SIGTERM.
pub async fn run_command(args: ServeArgs) -> anyhow::Result<()> {
    let Some(addr) = args.listen.addr() else {
        anyhow::bail!("--listen off leaves nothing to serve");
    };
    let shutdown = crate::shutdown::on_signal();
    let tls = match args.tls.files() {
        Some(files) => Some(args.tls.acceptor(&files, &shutdown)?),
        None => None,
    };
    let config = Config {
        door: crate::net::door::Door::new("tcp", tls, args.per_ip.max_conns_per_ip),
        ..Config::new(args.service, &args.limits)
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    if threads == 1 {
        let listener = crate::cli::bind_tcp(addr, "--listen").await?;
        announce_ready(listener.local_addr().ok());
        run(listener, config, Arc::new(Stats::default()), shutdown).await;
        return Ok(());
    }
    let listeners = bind_shards(addr, threads)?;
    announce_ready(listeners.first().and_then(|l| l.local_addr().ok()));
    let stats = Arc::new(Stats::default());
    tokio::task::spawn_blocking(move || run_sharded(listeners, config, stats, shutdown))
        .await
        .map_err(|e| anyhow::anyhow!("tcp server thread failed: {e}"))??;
    Ok(())
}

/// The `--ready-json` line of `netkit tcp serve`.
fn announce_ready(tcp: Option<std::net::SocketAddr>) {
    crate::ready::announce(&crate::ready::Ready {
        tcp,
        ..Default::default()
    });
}

/// Binds `n` listeners to one address with `SO_REUSEPORT`, so the kernel
/// spreads new connections over them. Port 0 is resolved by the first.
pub fn bind_shards(addr: &str, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut target: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("cannot bind {addr}: give IP:PORT, e.g. 127.0.0.1:8001"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bind = || -> std::io::Result<std::net::TcpListener> {
            let s = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&target.into())?;
            s.listen(4096)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        };
        let l = bind().map_err(|e| crate::cli::bind_error(addr, "--listen", e))?;
        target = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Serves on each listener from its own thread with a single-threaded
/// runtime (thread per core: no cross-thread wake-ups on the request path).
/// The connection cap, counters and shutdown are shared. Blocks until every
/// shard has drained.
pub fn run_sharded(
    listeners: Vec<std::net::TcpListener>,
    config: Config,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listeners.first().and_then(|l| l.local_addr().ok());
    log_listening(local, &config, listeners.len());
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_conns));
    let mut threads = Vec::new();
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let (config, permits, stats, shutdown) = (
            config.clone(),
            permits.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        let t = std::thread::Builder::new()
            .name(format!("tcp-shard-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener)?;
                    serve_listener(listener, config, permits, stats, shutdown).await;
                    anyhow::Ok(())
                })
            })?;
        threads.push(t);
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a tcp server thread panicked"))??;
    }
    info!(
        served = stats.served.load(Ordering::Relaxed),
        "tcp: server stopped"
    );
    Ok(())
}

fn log_listening(local: Option<std::net::SocketAddr>, config: &Config, threads: usize) {
    info!(
        addr = ?local,
        service = ?config.service,
        max_conns = config.max_conns,
        threads,
        "tcp: listening on {}",
        local.map(|a| a.to_string()).unwrap_or_default()
    );
}

/// Serves `config.service` on `listener` until `shutdown` is cancelled, then
/// drains (see the module docs) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    log_listening(listener.local_addr().ok(), &config, 1);
    let permits = Arc::new(Semaphore::new(config.max_conns));
    serve_listener(listener, Arc::new(config), permits, stats.clone(), shutdown).await;
    info!(
        served = stats.served.load(Ordering::Relaxed),
        "tcp: server stopped"
    );
}

/// The accept loop of one listener; `permits` caps connections over every
/// listener that shares it.
async fn serve_listener(
    listener: TcpListener,
    config: Arc<Config>,
    permits: Arc<Semaphore>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let hard = CancellationToken::new();
    let mut acceptor = crate::net::accept::Acceptor::new("tcp");
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        let Some(ip_permit) = config.door.admit(peer) else {
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max_conns = config.max_conns, "tcp: connection cap reached, refusing client");
            let max = config.max_conns;
            if config.door.is_tls() {
                // No plaintext line on a TLS door: the close says it.
                continue;
            }
            tracker.spawn(async move {
                let mut stream = stream;
                let msg = format!(
                    "ERR server busy: {max} connections already (the --max-conns limit); try again later\n"
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
            });
            continue;
        };
        let n = stats.served.fetch_add(1, Ordering::Relaxed) + 1;
        // The span is at debug level: entering an enabled span on every poll
        // costs a shared lock in the log filter, and the hot path polls once
        // per request. The close line below names the peer itself.
        let span = debug_span!("conn", %peer);
        let (config, stats, shutdown, hard) = (
            config.clone(),
            stats.clone(),
            shutdown.clone(),
            hard.clone(),
        );
        tracker.spawn(
            async move {
                debug!(served = n, "accepted");
                let mut requests = 0u64;
                let result = match config.door.handshake(stream).await {
                    Some(Either::Right(tcp)) => {
                        handle(tcp, &config, &mut requests, &shutdown, &hard).await
                    }
                    Some(Either::Left(tls)) => {
                        handle(tls, &config, &mut requests, &shutdown, &hard).await
                    }
                    None => return,
                };
                stats.requests.fetch_add(requests, Ordering::Relaxed);
                match result {
                    Ok(end) => info!(%peer, requests, served = n, "tcp: connection closed: {end}"),
                    Err(e) => info!(%peer, requests, served = n, "tcp: connection closed: {e}"),
                }
                drop((permit, ip_permit));
            }
            .instrument(span),
        );
    }
    drop(listener);
    info!(
        connections = tracker.len(),
        "tcp: no longer accepting; waiting up to {} for connections to finish",
        humantime::format_duration(config.grace)
    );
    let clean = crate::shutdown::drain(&tracker, config.grace, &hard).await;
    debug!(clean, "tcp: listener drained");
}

/// What [`handle`] needs of a stream besides async reads and writes.
trait ServeIo: AsyncRead + tokio::io::AsyncWrite + Unpin {
    /// Writes what the socket takes now, without waiting.
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize>;
    /// Reads what the kernel holds, bypassing the reactor.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl ServeIo for TcpStream {
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::io::Read::read(&mut &*socket2::SockRef::from(self), buf)
    }
}

/// TLS has no shortcut past its record layer: every write and read goes the async way.
impl ServeIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn try_write_now(&self, _buf: &[u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn read_now(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// Why a connection ended without an I/O error.
#[derive(Debug)]
enum End {
    PeerClosed,
    Stop,
    Idle,
    LineTooLong,
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            End::PeerClosed => "peer closed",
            End::Stop => "client sent STOP",
            End::Idle => "idle timeout",
            End::LineTooLong => "line too long",
            End::Shutdown => "server shutting down",
        })
    }
}

/// Serves one connection. Reads go through a stack buffer and `try_read`, so
/// an idle connection holds no read buffer at all.
async fn handle<S: ServeIo>(
    mut stream: S,
    config: &Config,
    requests: &mut u64,
    shutdown: &CancellationToken,
    hard: &CancellationToken,
) -> io::Result<End> {
    let service = config.service;
    let mut out = Vec::new();
    if service.greet(&mut out) == Control::Close {
        stream.write_all(&out).await?;
        let _ = stream.shutdown().await;
        return Ok(End::PeerClosed);
    }
    let mut pending: Vec<u8> = Vec::new();
    // The idle timer is reset lazily: activity only records the time, and the
    // timer, when it fires early, is pushed to the real deadline. Resetting a
    // timer per request would cost a lock on the timer wheel each time.
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(config.idle_timeout);
    // Child tokens: each connection polls its own, so thousands of
    // connections do not contend on the server's token.
    let (shutdown, hard) = (shutdown.child_token(), hard.child_token());
    let cancelled = shutdown.cancelled();
    let abandoned = hard.cancelled();
    tokio::pin!(idle, cancelled, abandoned);
    let mut draining = false;

    loop {
        if draining && pending.is_empty() {
            return Ok(End::Shutdown);
        }
        let step = tokio::select! {
            biased;
            _ = &mut abandoned => return Ok(End::Shutdown),
            r = read_and_serve(&mut stream, config, &mut pending, &mut out, requests) => r?,
            // Bytes already received count as a request in flight: read them
            // before deciding whether this connection is idle.
            _ = &mut cancelled, if !draining => {
                draining = true;
                match read_direct(&stream, config, &mut pending, &mut out, requests) {
                    Ok(step) => step,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            _ = &mut idle => {
                if last_activity.elapsed() < config.idle_timeout {
                    idle.as_mut().reset(last_activity + config.idle_timeout);
                    continue;
                }
                let msg = format!("ERR idle for {}, closing\n", humantime::format_duration(config.idle_timeout));
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
                return Ok(End::Idle);
            }
        };
        last_activity = Instant::now();
        if !out.is_empty() {
            write_out(&mut stream, &mut out, config.idle_timeout, &mut abandoned).await?;
        }
        if let Some(end) = step {
            // After the peer's close too: TLS then sends its close_notify.
            if matches!(end, End::Stop | End::LineTooLong | End::PeerClosed) {
                let _ = stream.shutdown().await;
            }
            return Ok(end);
        }
    }
}

/// Writes and clears `out`: at once if the socket takes it, otherwise waiting
/// (bounded by `timeout`) for a slow reader.
async fn write_out<S: ServeIo>(
    stream: &mut S,
    out: &mut Vec<u8>,
    timeout: Duration,
    abandoned: &mut std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
) -> io::Result<()> {
    let written = match stream.try_write_now(out) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written < out.len() {
        tokio::select! {
            biased;
            _ = abandoned.as_mut() => return Err(io::Error::other("server shutting down")),
            r = tokio::time::timeout(timeout, stream.write_all(&out[written..])) => {
                r.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading"))??
            }
        }
    }
    out.clear();
    if out.capacity() > 4096 {
        out.shrink_to(256);
    }
    Ok(())
}

/// Reads what is there and runs the service over it. `Ok(Some(end))` ends the
/// connection once `out` is flushed.
fn read_and_serve<'a, S: ServeIo>(
    stream: &'a mut S,
    config: &'a Config,
    pending: &'a mut Vec<u8>,
    out: &'a mut Vec<u8>,
    requests: &'a mut u64,
) -> impl Future<Output = io::Result<Option<End>>> + 'a {
    // The read buffer lives on the stack of one poll, never in the task: an
    // idle connection holds no buffer. `poll_read` (unlike `try_read`) also
    // knows that a short read drained the socket, saving an EAGAIN read per
    // request.
    std::future::poll_fn(move |cx| {
        // Uninitialised: zeroing 4 KiB per read showed up in profiles.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut rb = ReadBuf::uninit(&mut buf);
        std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut rb))?;
        let data = rb.filled();
        if data.is_empty() {
            return Poll::Ready(Ok(Some(End::PeerClosed)));
        }
        Poll::Ready(Ok(serve_bytes(config, data, pending, out, requests)))
    })
}

/// Reads what the kernel holds, bypassing the reactor's readiness: used when
/// shutdown starts, since bytes that already arrived may not be reported yet.
fn read_direct<S: ServeIo>(
    stream: &S,
    config: &Config,
    pending: &mut Vec<u8>,
    out: &mut Vec<u8>,
    requests: &mut u64,
) -> io::Result<Option<End>> {
    let mut buf = [0u8; 4096];
    let n = stream.read_now(&mut buf)?;
    if n == 0 {
        return Ok(Some(End::PeerClosed));
    }
    Ok(serve_bytes(config, &buf[..n], pending, out, requests))
}

/// The service over one chunk of input: complete lines are answered, a partial
/// line is kept in `pending`. Free of sockets so it is tested directly.
fn serve_bytes(
    config: &Config,
    mut data: &[u8],
    pending: &mut Vec<u8>,
    out: &mut Vec<u8>,
    requests: &mut u64,
) -> Option<End> {
    let service = config.service;
    if !service.is_line_based() {
        service.on_bytes(data, out);
        *requests += 1;
        return None;
    }
    while let Some(pos) = data.iter().position(|&b| b == b'\n') {
        let control = if pending.is_empty() {
            if pos > config.max_line {
                return Some(too_long(config, out));
            }
            service.on_line(&data[..pos], out)
        } else {
            pending.extend_from_slice(&data[..pos]);
            if pending.len() > config.max_line {
                return Some(too_long(config, out));
            }
            let c = service.on_line(pending, out);
            pending.clear();
            c
        };
        data = &data[pos + 1..];
        if control == Control::Close {
            return Some(End::Stop);
        }
        *requests += 1;
    }
    if pending.len() + data.len() > config.max_line {
        return Some(too_long(config, out));
    }
    pending.extend_from_slice(data);
    if pending.is_empty() && pending.capacity() > 0 {
        *pending = Vec::new();
    }
    None
}

fn too_long(config: &Config, out: &mut Vec<u8>) -> End {
    out.extend_from_slice(
        format!(
            "ERR line longer than {} bytes (the --max-line limit), closing\n",
            config.max_line
        )
        .as_bytes(),
    );
    End::LineTooLong
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_line: usize) -> Config {
        Config {
            max_line,
            ..Config::default()
        }
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let c = cfg(100);
        let (mut pending, mut out, mut req) = (Vec::new(), Vec::new(), 0);
        assert!(serve_bytes(&c, b"hel", &mut pending, &mut out, &mut req).is_none());
        assert!(out.is_empty());
        assert!(serve_bytes(&c, b"lo\nworld\nx", &mut pending, &mut out, &mut req).is_none());
        assert_eq!(req, 2);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
        assert_eq!(pending, b"x");
    }

    #[test]
    fn stop_ends_after_answering_earlier_lines() {
        let c = cfg(100);
        let (mut pending, mut out, mut req) = (Vec::new(), Vec::new(), 0);
        let end = serve_bytes(&c, b"1\n2\nSTOP\n3\n", &mut pending, &mut out, &mut req);
        assert!(matches!(end, Some(End::Stop)));
        assert_eq!(req, 2);
    }

    #[test]
    fn long_lines_are_refused_whole_or_in_pieces() {
        let c = cfg(8);
        let (mut pending, mut out, mut req) = (Vec::new(), Vec::new(), 0);
        let end = serve_bytes(&c, b"0123456789\n", &mut pending, &mut out, &mut req);
        assert!(matches!(end, Some(End::LineTooLong)));
        assert!(String::from_utf8_lossy(&out).contains("longer than 8 bytes"));

        let (mut pending, mut out) = (Vec::new(), Vec::new());
        assert!(serve_bytes(&c, b"01234", &mut pending, &mut out, &mut req).is_none());
        let end = serve_bytes(&c, b"56789", &mut pending, &mut out, &mut req);
        assert!(matches!(end, Some(End::LineTooLong)));

        let (mut pending, mut out) = (Vec::new(), Vec::new());
        assert!(serve_bytes(&c, b"01234567\n", &mut pending, &mut out, &mut req).is_none());
    }
}

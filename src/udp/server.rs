//! The UDP server: answers each datagram to its sender with the chosen
//! service. One socket, no per-peer state; a datagram larger than the receive
//! buffer is logged as truncated and not answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cli::{Listen, parse_size};
use crate::service::Service;

/// Command-line options of `netkit udp serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8002", env = "NETKIT_UDP_LISTEN")]
    pub listen: Listen,
    /// The service to run (echo, rand or daytime).
    #[arg(long, value_enum, default_value = "echo", env = "NETKIT_UDP_SERVICE")]
    pub service: Service,
    /// Receive buffer per datagram; larger datagrams are reported as truncated and dropped.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, env = "NETKIT_UDP_MAX_DATAGRAM")]
    pub max_datagram: u64,
}

/// Counters of a running UDP server.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Datagrams answered.
    pub answered: AtomicU64,
    /// Datagrams dropped because they did not fit the buffer.
    pub truncated: AtomicU64,
}

/// The receive buffer for a `--max-datagram` value: 1 byte to 64 KiB (the
/// largest UDP payload fits).
pub fn buffer_size(max_datagram: u64) -> usize {
    usize::try_from(max_datagram)
        .unwrap_or(usize::MAX)
        .clamp(1, 65_536)
}

/// Runs `netkit udp serve` until SIGINT or SIGTERM.
pub async fn run_command(args: ServeArgs) -> anyhow::Result<()> {
    let Some(addr) = args.listen.addr() else {
        anyhow::bail!("--listen off leaves nothing to serve");
    };
    let socket = crate::cli::bind_udp(addr, "--listen").await?;
    let shutdown = crate::shutdown::on_signal();
    crate::ready::announce(&crate::ready::Ready {
        udp: socket.local_addr().ok(),
        ..Default::default()
    });
    let max = buffer_size(args.max_datagram);
    run(
        socket,
        args.service,
        max,
        Arc::new(Stats::default()),
        shutdown,
    )
    .await;
    Ok(())
}

/// Answers datagrams on `socket` until `shutdown` is cancelled.
pub async fn run(
    socket: UdpSocket,
    service: Service,
    max_datagram: usize,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let local = socket.local_addr().ok();
    info!(addr = ?local, ?service, "udp: listening on {}", local.map(|a| a.to_string()).unwrap_or_default());
    let mut buf = vec![0u8; max_datagram];
    let mut out = Vec::with_capacity(512);
    loop {
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = super::recv_from(&socket, &mut buf) => r,
        };
        let got = match got {
            Ok(g) => g,
            // ICMP errors from earlier replies surface here; they concern one peer only.
            Err(e) => {
                debug!("udp: receive error: {e}");
                continue;
            }
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
        if let Some(size) = got.truncated_from {
            stats.truncated.fetch_add(1, Ordering::Relaxed);
            warn!(peer = %got.peer, size, max_datagram, "udp: datagram larger than the receive buffer (--max-datagram); dropped");
            continue;
        }
        out.clear();
        if service.on_datagram(&buf[..got.len], &mut out).is_none() {
            continue;
        }
        match socket.send_to(&out, got.peer).await {
            Ok(_) => {
                stats.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!(peer = %got.peer, "udp: cannot answer: {e}"),
        }
    }
    info!(
        received = stats.received.load(Ordering::Relaxed),
        answered = stats.answered.load(Ordering::Relaxed),
        "udp: server stopped"
    );
}

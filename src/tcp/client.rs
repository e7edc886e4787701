//! The nc-like TCP client: stdin to the socket, the socket to stdout. On
//! stdin EOF it half-closes (sends FIN) and keeps reading until the server
//! closes; refused, reset and timed-out connections are clear errors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::parse_duration;

/// Command-line options of `netkit tcp connect`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server address, `host:port` or `[v6]:port`.
    pub addr: String,
    /// Give up connecting after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Speak TLS to the server (like `ncat --ssl`), checking its certificate.
    #[arg(long)]
    pub tls: bool,
    /// How the server's certificate is checked (with --tls).
    #[command(flatten)]
    pub tls_check: crate::tls::ClientTlsArgs,
}

/// Runs `netkit tcp connect`.
pub async fn run_command(args: ConnectArgs) -> anyhow::Result<()> {
    let stream = connect(&args.addr, args.connect_timeout).await?;
    let peer = stream.peer_addr().ok();
    tracing::debug!(?peer, "connected");
    let (stdin, stdout) = (tokio::io::stdin(), tokio::io::stdout());
    let done = if args.tls {
        let tls = args
            .tls_check
            .connect(stream, &args.addr, &[], args.connect_timeout)
            .await?;
        let (rd, wr) = tokio::io::split(tls);
        pipe_halves(rd, wr, stdin, stdout).await
    } else {
        pipe(stream, stdin, stdout).await
    };
    done.with_context(|| format!("connection to {}", args.addr))
}

/// Connects to `addr` (resolving names), trying each address in turn within `timeout`.
pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot resolve {addr}: timed out after {}",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| {
            anyhow::anyhow!("cannot resolve {addr}: {e} — give HOST:PORT, e.g. 127.0.0.1:8001")
        })?
        .collect();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + timeout;
    for a in &addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(describe_connect_error(*a, &e)),
            Err(_) => {
                last = Some(format!(
                    "cannot connect to {a}: timed out after {} — is the host up and the port open? (--connect-timeout)",
                    humantime::format_duration(timeout)
                ));
                break;
            }
        }
    }
    Err(anyhow::anyhow!(last.unwrap_or_else(|| format!(
        "{addr} resolved to no address"
    ))))
}

fn describe_connect_error(addr: SocketAddr, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            format!("cannot connect to {addr}: connection refused — nothing is listening there")
        }
        io::ErrorKind::TimedOut => format!("cannot connect to {addr}: timed out"),
        _ => format!("cannot connect to {addr}: {e}"),
    }
}

/// Copies `input` to the socket and the socket to `output` until the server
/// closes. When `input` ends, the write half is shut down (FIN) and reading
/// goes on. A reset is an error.
pub async fn pipe<R, W>(stream: TcpStream, input: R, output: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (rd, wr) = stream.into_split();
    pipe_halves(rd, wr, input, output).await
}

/// [`pipe`] over the two halves of any stream (a TLS one included).
pub async fn pipe_halves<SR, SW, R, W>(
    mut rd: SR,
    mut wr: SW,
    mut input: R,
    mut output: W,
) -> anyhow::Result<()>
where
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let upload = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = input.read(&mut buf).await.context("reading stdin")?;
            if n == 0 {
                // Half-close: the server sees EOF and may still answer.
                wr.shutdown().await.ok();
                return anyhow::Ok(());
            }
            wr.write_all(&buf[..n]).await.map_err(peer_error)?;
        }
    };
    let download = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = rd.read(&mut buf).await.map_err(peer_error)?;
            if n == 0 {
                output.flush().await.ok();
                return anyhow::Ok(());
            }
            output
                .write_all(&buf[..n])
                .await
                .context("writing stdout")?;
            output.flush().await.context("writing stdout")?;
        }
    };
    tokio::pin!(upload, download);
    // The server closing ends the session whatever stdin is doing; a failed
    // upload (e.g. a reset) is reported unless the download ends cleanly first.
    let mut upload_done = false;
    loop {
        tokio::select! {
            r = &mut download => return r,
            r = &mut upload, if !upload_done => { r?; upload_done = true; }
        }
    }
}

fn peer_error(e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::ConnectionReset => anyhow::anyhow!("connection reset by peer"),
        io::ErrorKind::BrokenPipe => {
            anyhow::anyhow!("the server closed the connection (broken pipe)")
        }
        _ => anyhow::Error::new(e),
    }
}

//! `netkit chat URL`: a terminal client for the hub. Lines typed on stdin are
//! the line protocol's commands (`/join`, `/msg`, plain text …); what the hub
//! sends is printed one line per message. `ws://HOST:PORT/ws` (`wss://` with TLS)
//! speaks JSON over WebSocket; `tcp://HOST:PORT` (`tls://`) the line protocol directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use super::line::{HELP, LineCommand, format_line, parse_line};
use super::protocol::{ClientMsg, ServerMsg};

/// Command-line options of `netkit chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// The hub: ws://HOST:PORT/ws (WebSocket) or tcp://HOST:PORT (line protocol).
    pub url: String,
    /// Nickname to ask for (else the server assigns a guest name).
    #[arg(long, env = "NETKIT_CHAT_NICK")]
    pub nick: Option<String>,
    /// Room to join on connect.
    #[arg(long, env = "NETKIT_CHAT_ROOM")]
    pub room: Option<String>,
    /// Print the server's messages as JSON lines instead of text (WebSocket only).
    #[arg(long)]
    pub json: bool,
    /// Give up connecting after this long.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub connect_timeout: Duration,
    /// How the server's certificate is checked (wss:// and tls://).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
}

/// Runs `netkit chat` until stdin ends, `/quit`, or the server closes.
pub async fn run_command(args: ChatArgs) -> anyhow::Result<()> {
    if let Some(rest) = args.url.strip_prefix("tcp://") {
        let addr = rest.trim_end_matches('/');
        let (rd, wr) = connect_tcp(addr, "--chat", &args).await?.into_split();
        run_lines(rd, wr, &args).await
    } else if let Some(rest) = args.url.strip_prefix("tls://") {
        let addr = rest.trim_end_matches('/');
        let tcp = connect_tcp(addr, "--chat", &args).await?;
        let tls = args
            .tls
            .connect(tcp, addr, &[], args.connect_timeout)
            .await?;
        let (rd, wr) = tokio::io::split(tls);
        run_lines(rd, wr, &args).await
    } else if args.url.starts_with("ws://") || args.url.starts_with("wss://") {
        run_ws(&args).await
    } else {
        bail!(
            "'{}' is not a chat URL; use ws://HOST:PORT/ws, wss://HOST:PORT/ws, tcp://HOST:PORT or tls://HOST:PORT",
            args.url
        )
    }
}

/// `authority` with `port` added when it names none (`ws://host/ws` means port 80).
fn with_port(authority: &str, port: u16) -> String {
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty() && !p.contains(']'));
    if has_port && !(authority.starts_with('[') && authority.ends_with(']')) {
        authority.to_string()
    } else {
        format!("{authority}:{port}")
    }
}

/// TCP to `addr`; `door` (`--chat`, `--http`) names the server flag in the hint.
async fn connect_tcp(
    addr: &str,
    door: &str,
    args: &ChatArgs,
) -> anyhow::Result<tokio::net::TcpStream> {
    tokio::time::timeout(args.connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect to {addr}: timed out — is `netkit serve` running with {door} {addr}?"))?
        .with_context(|| format!("cannot connect to {addr} — is `netkit serve` running with {door} {addr}?"))
}

/// The line protocol over a stream's two halves (plain TCP or TLS).
async fn run_lines<R, W>(rd: R, mut wr: W, args: &ChatArgs) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if let Some(n) = &args.nick {
        wr.write_all(format!("/nick {n}\n").as_bytes()).await?;
    }
    if let Some(r) = &args.room {
        wr.write_all(format!("/join {r}\n").as_bytes()).await?;
    }
    let to_stdout = async {
        let mut lines = BufReader::new(rd).lines();
        let mut out = tokio::io::stdout();
        while let Some(l) = lines.next_line().await? {
            out.write_all(format!("{l}\n").as_bytes()).await?;
            out.flush().await?;
        }
        anyhow::Ok(())
    };
    let from_stdin = async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(l) = lines.next_line().await? {
            wr.write_all(format!("{l}\n").as_bytes()).await?;
            if matches!(parse_line(&l, None), Ok(LineCommand::Quit)) {
                break;
            }
        }
        // Half-close: the server answers what is pending, then closes.
        wr.shutdown().await?;
        std::future::pending::<()>().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = to_stdout => r,
        r = from_stdin => r,
    }
}

async fn run_ws(args: &ChatArgs) -> anyhow::Result<()> {
    let url = &args.url;
    let (ws, _) = if let Some(rest) = url.strip_prefix("wss://") {
        // TLS first (our checks, our errors), then the WebSocket handshake over it.
        let addr = with_port(rest.split('/').next().unwrap_or_default(), 443);
        let tcp = connect_tcp(&addr, "--http", args).await?;
        let tls = args
            .tls
            .connect(tcp, &addr, &[b"http/1.1"], args.connect_timeout)
            .await?;
        tokio::time::timeout(
            args.connect_timeout,
            tokio_tungstenite::client_async(url.as_str(), tokio_util::either::Either::Left(tls)),
        )
        .await
    } else {
        let addr = with_port(
            url["ws://".len()..].split('/').next().unwrap_or_default(),
            80,
        );
        let tcp = connect_tcp(&addr, "--http", args).await?;
        tokio::time::timeout(
            args.connect_timeout,
            tokio_tungstenite::client_async(url.as_str(), tokio_util::either::Either::Right(tcp)),
        )
        .await
    }
    .map_err(|_| anyhow::anyhow!("cannot connect to {url}: timed out"))?
    .with_context(|| {
        format!("cannot connect to {url} — is `netkit serve` running with --http there?")
    })?;
    let (mut sink, mut stream) = ws.split();
    let rooms: Arc<Mutex<Vec<String>>> = Arc::default();
    let send = |m: &ClientMsg| Message::Text(serde_json::to_string(m).expect("serializes").into());
    if let Some(n) = &args.nick {
        sink.send(send(&ClientMsg::Nick { nick: n.clone() }))
            .await?;
    }
    if let Some(r) = &args.room {
        sink.send(send(&ClientMsg::Join {
            room: r.clone(),
            after: None,
            since: None,
        }))
        .await?;
    }
    let json = args.json;
    let rooms_in = rooms.clone();
    let ignored = Arc::new(super::line::Ignored::default());
    let ignored_out = ignored.clone();
    let to_stdout = async move {
        let mut out = tokio::io::stdout();
        while let Some(frame) = stream.next().await {
            let text = match frame? {
                Message::Text(t) => t,
                Message::Close(c) => {
                    if let Some(c) = c {
                        out.write_all(
                            format!(
                                "-- server closed the connection ({}: {})\n",
                                u16::from(c.code),
                                c.reason
                            )
                            .as_bytes(),
                        )
                        .await?;
                    }
                    break;
                }
                _ => continue,
            };
            let line = match serde_json::from_str::<ServerMsg>(text.as_str()) {
                Ok(msg) => {
                    track_rooms(&rooms_in, &msg);
                    if ignored_out.hides(&msg) {
                        continue;
                    }
                    if json {
                        text.to_string()
                    } else {
                        format_line(&msg)
                    }
                }
                Err(_) => text.to_string(),
            };
            out.write_all(format!("{line}\n").as_bytes()).await?;
            out.flush().await?;
        }
        anyhow::Ok(())
    };
    let from_stdin = async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut err = tokio::io::stderr();
        while let Some(l) = lines.next_line().await? {
            let current = rooms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last()
                .cloned();
            match parse_line(&l, current.as_deref()) {
                Ok(LineCommand::Hub(m)) => sink.send(send(&m)).await?,
                Ok(LineCommand::Help) => err.write_all(format!("{HELP}\n").as_bytes()).await?,
                Ok(LineCommand::Quit) => break,
                Ok(LineCommand::Nothing) => {}
                Ok(LineCommand::Ignore(nick, on)) => {
                    let told = ignored.set(&nick, on);
                    err.write_all(format!("-- {told}\n").as_bytes()).await?
                }
                Err(e) => {
                    err.write_all(format!("netkit chat: {e}\n").as_bytes())
                        .await?
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        // Keep printing until the server answers the close.
        std::future::pending::<()>().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = to_stdout => r,
        r = from_stdin => r,
    }
}

fn track_rooms(rooms: &Mutex<Vec<String>>, msg: &ServerMsg) {
    let mut rooms = rooms.lock().unwrap_or_else(|e| e.into_inner());
    match msg {
        ServerMsg::Joined { room, .. } => {
            rooms.retain(|r| r != room);
            rooms.push(room.clone());
        }
        ServerMsg::Parted { room } => rooms.retain(|r| r != room),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_port_is_the_scheme_default() {
        assert_eq!(with_port("a:1", 80), "a:1");
        assert_eq!(with_port("a", 443), "a:443");
        assert_eq!(with_port("[::1]", 80), "[::1]:80");
        assert_eq!(with_port("[::1]:9", 80), "[::1]:9");
    }
}

//! A chat server on 127.0.0.1 port 0 (HTTP with the WebSocket, and TCP
//! lines) and a line client, shared by the chat integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use netkit::chat::hub::{Hub, HubConfig};
use netkit::chat::{ConnConfig, line};
use netkit::http::{self, HttpConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::ws_util::{Ws, recv};

/// A server taking files under the default limits changed by `limits`
/// (with no free-space reserve); the temp dir holds its store.
pub async fn files_server(
    limits: impl FnOnce(&mut netkit::chat::files::FileLimits),
) -> (Server, tempfile::TempDir) {
    use netkit::chat::files::{FileLimits, FileStore};
    let dir = tempfile::tempdir().unwrap();
    let mut l = FileLimits {
        min_free: 0,
        ..FileLimits::default()
    };
    limits(&mut l);
    let files = FileStore::open(dir.path(), l).unwrap();
    let http = HttpConfig {
        files: Some(std::sync::Arc::new(files)),
        ..HttpConfig::default()
    };
    let s = Server::start_with(HubConfig::default(), ConnConfig::default(), http).await;
    (s, dir)
}

/// How long a test waits for anything.
pub const T: Duration = Duration::from_secs(10);

/// A running server and what stops it.
pub struct Server {
    pub http: SocketAddr,
    pub chat: SocketAddr,
    pub shutdown: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(hub_cfg: HubConfig, conn: ConnConfig) -> Server {
        Self::start_with(hub_cfg, conn, HttpConfig::default()).await
    }

    pub async fn start_with(hub_cfg: HubConfig, conn: ConnConfig, http_cfg: HttpConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (hub, _writer) = Hub::open(dir.path(), hub_cfg).unwrap();
        let hl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http, chat) = (hl.local_addr().unwrap(), cl.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let cfg = HttpConfig {
            conn: conn.clone(),
            ..http_cfg
        };
        let tasks = vec![
            tokio::spawn({
                let (hub, s) = (hub.clone(), shutdown.clone());
                async move { http::run(hl, hub, cfg, None, s).await.unwrap() }
            }),
            tokio::spawn(line::run(
                cl,
                hub,
                conn,
                netkit::net::door::Door::plain("chat"),
                shutdown.clone(),
            )),
        ];
        Server {
            http,
            chat,
            shutdown,
            tasks,
            _dir: dir,
        }
    }

    /// The hub's data directory (its SQLite file is `chat.sqlite3` there).
    #[allow(dead_code)]
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub async fn ws(&self, nick: &str) -> Ws {
        let url = format!("ws://{}/ws?nick={nick}", self.http);
        let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
            .await
            .unwrap()
            .unwrap();
        let welcome = recv(&mut ws).await;
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["nick"], nick);
        ws
    }

    /// A WebSocket client whose socket has a 4 KiB receive buffer, so that
    /// the server's writes block soon once it stops reading.
    pub async fn ws_small_window(&self, nick: &str) -> Ws {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let stream = sock.connect(self.http).await.unwrap();
        let url = format!("ws://{}/ws?nick={nick}", self.http);
        let (mut ws, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .unwrap();
        assert_eq!(recv(&mut ws).await["type"], "welcome");
        ws
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path, &[]).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(T, t).await.unwrap().unwrap();
        }
    }
}

/// GET `path` with `Host` set to `addr`, plus `headers`; the status and body.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A TCP line client.
pub struct LineClient {
    pub rd: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    pub wr: tokio::net::tcp::OwnedWriteHalf,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> LineClient {
        let s = TcpStream::connect(addr).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut c = LineClient {
            rd: BufReader::new(rd).lines(),
            wr,
        };
        assert!(c.line().await.starts_with("-- welcome"));
        c
    }
    pub async fn send(&mut self, l: &str) {
        self.wr
            .write_all(format!("{l}\n").as_bytes())
            .await
            .unwrap();
    }
    pub async fn line(&mut self) -> String {
        tokio::time::timeout(T, self.rd.next_line())
            .await
            .expect("timed out waiting for a line")
            .unwrap()
            .expect("connection closed")
    }
    pub async fn until(&mut self, pat: &str) -> String {
        loop {
            let l = self.line().await;
            if l.contains(pat) {
                return l;
            }
        }
    }
}

/// The sum of a metric's values (over its labels) in a `/metrics` text.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

//! A bare HTTP/1.1 client over a real socket for the room-file tests:
//! requests with any method, headers and body, responses with their
//! headers and (plain or chunked) body; and a chat member with a ticket.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ws_util::{Ws, recv_type, send};

/// How long a test waits for anything.
pub const T: std::time::Duration = std::time::Duration::from_secs(10);

/// A response: status, headers (names in lower case) and body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|s| s.as_str()).unwrap_or("")
    }
}

/// The request head for `method path` with `headers` and `Content-Length: len`.
pub fn head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    len: Option<u64>,
) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = len {
        req.push_str(&format!("Content-Length: {n}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends one request with `body` and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let h = head(addr, method, path, headers, Some(body.len() as u64));
    s.write_all(h.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    read_response(&mut s, method == "HEAD").await
}

/// Downloads the file of a message's absolute `url`.
pub async fn download(addr: SocketAddr, url: &str) -> Resp {
    request(addr, "GET", &path_of(url), &[], b"").await
}

/// Reads a response to the end of the connection.
pub async fn read_response(s: &mut TcpStream, head_only: bool) -> Resp {
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    parse_response(&buf, head_only)
}

fn parse_response(buf: &[u8], head_only: bool) -> Resp {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let body = if head_only {
        Vec::new()
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let n =
            usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
        rest = &rest[nl + 4 + n..];
    }
}

/// A chat member of `room` over WebSocket, with an upload ticket for it.
pub struct Member {
    pub ws: Ws,
    pub ticket: String,
    pub room: String,
}

impl Member {
    pub async fn join(http: SocketAddr, nick: &str, room: &str) -> Member {
        let url = format!("ws://{http}/ws?nick={nick}");
        let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(recv_type(&mut ws, "welcome").await["nick"], nick);
        send(&mut ws, json!({"type": "join", "room": room})).await;
        recv_type(&mut ws, "joined").await;
        let ticket = ticket(&mut ws, room).await;
        Member {
            ws,
            ticket,
            room: room.to_string(),
        }
    }

    pub fn auth(&self) -> String {
        format!("Bearer {}", self.ticket)
    }

    /// Sends `method path` with the ticket, `headers` and `body`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let auth = self.auth();
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        request(addr, method, path, &all, body).await
    }

    /// The head of a PATCH sending the upload at `location` from byte 0,
    /// `len` bytes in all (the body is the caller's to stream).
    pub fn patch_head(&self, addr: SocketAddr, location: &str, len: u64) -> String {
        head(
            addr,
            "PATCH",
            location,
            &[
                ("Authorization", &self.auth()),
                ("Upload-Offset", "0"),
                ("Content-Type", "application/offset+octet-stream"),
            ],
            Some(len),
        )
    }

    /// Uploads `data` as `name` in one POST.
    pub async fn upload(&self, addr: SocketAddr, name: &str, data: &[u8]) -> Resp {
        let path = format!(
            "/api/rooms/{}/files?name={}&size={}",
            self.room,
            enc(name),
            data.len()
        );
        request(
            addr,
            "POST",
            &path,
            &[("Authorization", &self.auth())],
            data,
        )
        .await
    }
}

/// Asks for a ticket for `room` over `ws`.
pub async fn ticket(ws: &mut Ws, room: &str) -> String {
    send(ws, json!({"type": "file_ticket", "room": room})).await;
    let t = recv_type(ws, "file_ticket").await;
    assert_eq!(t["room"], room);
    t["ticket"].as_str().unwrap().to_string()
}

/// Percent-encodes every byte but ASCII letters and digits.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The path part of an absolute URL.
pub fn path_of(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    rest[rest.find('/').unwrap()..].to_string()
}

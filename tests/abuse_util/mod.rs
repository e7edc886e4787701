//! Shared pieces of the abuse suites: `netkit serve` with only the doors a
//! test asks for, raw HTTP exchanges, a raw WebSocket peer that writes any
//! frame header it likes, and snapshots of what the server has stored.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

#[path = "../proc_util/mod.rs"]
mod proc_util;
#[allow(unused_imports)]
pub use proc_util::{LineUser, Netkit, cluster_node_command, http_get_json, wait_until};

/// The longest any single read in these suites waits.
pub const T: Duration = Duration::from_secs(20);

/// A `netkit serve` process with its data folder.
pub struct Serve {
    /// The process.
    pub p: Netkit,
    /// Its `--data-dir`.
    pub dir: tempfile::TempDir,
}

impl Serve {
    /// Starts `netkit serve ARGS` on a fresh data folder; every door that
    /// `args` does not name is turned off, and the chat rate limit is off
    /// unless `args` sets it.
    pub fn start(args: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let mut all: Vec<String> = vec!["serve".into()];
        for door in ["--http", "--chat", "--tcp", "--udp", "--drop", "--relay"] {
            if !args.contains(&door) {
                all.extend([door.to_string(), "off".to_string()]);
            }
        }
        if !args.contains(&"--chat-rate") {
            all.extend(["--chat-rate".to_string(), "0".to_string()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        all.push("--data-dir".into());
        all.push(dir.path().to_str().unwrap().into());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        Serve {
            p: Netkit::spawn(&refs),
            dir,
        }
    }

    /// The HTTP address.
    pub fn http(&self) -> SocketAddr {
        self.p.ready.http.expect("http is on")
    }

    /// The line-chat address.
    pub fn chat(&self) -> SocketAddr {
        self.p.ready.chat.expect("line chat is on")
    }

    /// The stored history of `room` and the room list, as the API shows them.
    pub fn stored(&self, room: &str) -> (Value, Value) {
        let msgs = http_get_json(
            self.http(),
            &format!("/api/rooms/{room}/messages?limit=500"),
        );
        let rooms = http_get_json(self.http(), "/api/rooms");
        (msgs["messages"].clone(), rooms)
    }

    /// Every path under the data folder but the chat database's own files
    /// (SQLite creates its journals on its own schedule; compare the history
    /// through [`Serve::stored`] instead).
    pub fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p.clone());
                }
                let name = p
                    .strip_prefix(self.dir.path())
                    .unwrap()
                    .display()
                    .to_string();
                if !name.starts_with("chat.sqlite3") {
                    out.push(name);
                }
            }
        }
        out.sort();
        out
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.p.child.try_wait(), Ok(None))
    }
}

/// Writes `req` to `addr` and reads the answer until the server closes (or
/// [`T`] passes); the bytes read, lossily as text.
pub async fn http_raw(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it read everything: a failed
    // write is part of what is being tested, the answer is what counts.
    let _ = s.write_all(req).await;
    read_to_close(&mut s).await
}

/// Everything `s` delivers until the peer closes or resets, bounded by [`T`].
pub async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16384];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await {
            Err(_) => panic!(
                "no close within {T:?}; read so far: {}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A WebSocket frame opcode.
pub mod op {
    /// Continuation.
    pub const CONT: u8 = 0x0;
    /// Text.
    pub const TEXT: u8 = 0x1;
    /// Binary.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
}

/// A WebSocket client written by hand, so it can send frames no library would.
pub struct RawWs {
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
}

/// The header of a masked client frame with `fin`, `opcode` and a claimed
/// payload length `len` (the mask key is all zeros, so the payload goes as is).
pub fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![(u8::from(fin) << 7) | opcode];
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=0xffff => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

/// One whole masked frame (zero mask key).
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(fin, opcode, payload.len() as u64);
    f.extend_from_slice(payload);
    f
}

impl RawWs {
    /// Opens `/ws?nick=NICK` on `http` and reads the welcome.
    pub async fn connect(http: SocketAddr, nick: &str) -> RawWs {
        Self::handshake(TcpStream::connect(http).await.unwrap(), http, nick).await
    }

    /// Like [`RawWs::connect`], with a 4 KiB receive buffer, so that the
    /// server's writes block soon once this client stops reading.
    pub async fn connect_small_window(http: SocketAddr, nick: &str) -> RawWs {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        Self::handshake(sock.connect(http).await.unwrap(), http, nick).await
    }

    /// The upgrade of `s` to a WebSocket as `nick`, up to the welcome.
    async fn handshake(mut s: TcpStream, http: SocketAddr, nick: &str) -> RawWs {
        let req = format!(
            "GET /ws?nick={nick} HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut ws = RawWs {
            rd,
            wr: Some(wr),
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(ws.fill().await, "closed during the handshake");
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.buf.drain(..end);
        let welcome = ws.next_json().await.expect("a welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        ws
    }

    /// Reads more bytes; false once the peer closed.
    async fn fill(&mut self) -> bool {
        let mut b = vec![0u8; 65536];
        match tokio::time::timeout(T, self.rd.read(&mut b)).await {
            Err(_) => panic!("nothing from the server within {T:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// Sends raw bytes; false if the server already closed.
    pub async fn send_bytes(&mut self, b: &[u8]) -> bool {
        let wr = self.wr.as_mut().expect("the writer was taken");
        wr.write_all(b).await.is_ok()
    }

    /// Takes the writing half, to write from another task while this one reads.
    pub fn take_writer(&mut self) -> OwnedWriteHalf {
        self.wr.take().expect("the writer was taken")
    }

    /// The next (unmasked, unfragmented) server frame, or `None` once closed.
    pub async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next text frame as JSON (pings skipped), or `None` at a close.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            match self.next_frame().await? {
                (op::TEXT, p) => return Some(serde_json::from_slice(&p).unwrap()),
                (op::CLOSE, _) => return None,
                _ => continue,
            }
        }
    }

    /// The next JSON frame of type `ty`, skipping others; panics at a close.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self
                .next_json()
                .await
                .expect("closed before the frame came");
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Reads up to the close frame: its code and reason, and the JSON frames before it.
    pub async fn close_frame(&mut self) -> (u16, String, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame().await {
                None => panic!("connection ended without a close frame; got {before:?}"),
                Some((op::CLOSE, p)) => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    return (code, String::from_utf8_lossy(&p[2..]).into_owned(), before);
                }
                Some((op::TEXT, p)) => before.push(serde_json::from_slice(&p).unwrap()),
                Some(_) => {}
            }
        }
    }

    /// Reads to the end: the close frame's code and reason if one came
    /// before the connection ended, `None` if it just ended.
    pub async fn close_or_end(&mut self) -> Option<(u16, String)> {
        loop {
            match self.next_frame().await? {
                (op::CLOSE, p) => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    return Some((code, String::from_utf8_lossy(&p[2..]).into_owned()));
                }
                _ => continue,
            }
        }
    }

    /// Sends `v` as one text frame.
    pub async fn send_json(&mut self, v: Value) {
        assert!(
            self.send_bytes(&frame(true, op::TEXT, v.to_string().as_bytes()))
                .await
        );
    }
}

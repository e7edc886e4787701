//! Abuse of the file drop (`netkit serve --drop`), against the real binary:
//! frames out of order — a second offer in the middle of a file, data before
//! start, a start beyond what was accepted — and 200 silent connections while
//! a real sender goes through. Each case checks the reason the sender is
//! given, that a good sender is served after, and that nothing is stored.

mod abuse_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use abuse_util::{Serve, T};
use bytes::{Bytes, BytesMut};
use netkit::transfer::proto::{EntryKind, Offer, Preamble, ReceiverFrame, SenderFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A drop that gives up on a silent sender after `timeout`.
fn drop_server(timeout: &str) -> Serve {
    Serve::start(&["--drop", "127.0.0.1:0", "--drop-timeout", timeout])
}

/// The drop's address.
fn drop_addr(s: &Serve) -> SocketAddr {
    s.p.ready.drop.expect("the drop is on")
}

/// The names stored in the drop's folder (partial files included).
fn stored(s: &Serve) -> Vec<String> {
    let dir = s.dir.path().join("files");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A sender written frame by frame.
struct Sender {
    s: TcpStream,
    buf: BytesMut,
}

impl Sender {
    /// Connects and exchanges preambles.
    async fn connect(addr: SocketAddr) -> Sender {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&Preamble::OURS.encode()).await.unwrap();
        let mut p = [0u8; 12];
        tokio::time::timeout(T, s.read_exact(&mut p))
            .await
            .expect("the receiver's preamble")
            .unwrap();
        Preamble::decode(&p).unwrap().check_compatible().unwrap();
        Sender {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Sends frames in one write.
    async fn send(&mut self, frames: &[SenderFrame]) {
        let mut b = BytesMut::new();
        for f in frames {
            f.encode(&mut b);
        }
        self.s.write_all(&b).await.unwrap();
    }

    /// The next frame, or `None` once the receiver closed.
    async fn next(&mut self) -> Option<ReceiverFrame> {
        loop {
            if let Some(f) = ReceiverFrame::decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let n = tokio::time::timeout(T, self.s.read_buf(&mut self.buf))
                .await
                .expect("the receiver answers or closes")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Expects an error frame whose reason contains `words`, then the close.
    async fn expect_error(&mut self, words: &str) -> String {
        let reason = loop {
            match self.next().await {
                Some(ReceiverFrame::Error { reason }) => break reason,
                Some(ReceiverFrame::Accept { .. }) => continue,
                other => panic!("expected an error about {words:?}, got {other:?}"),
            }
        };
        assert!(
            reason.to_lowercase().contains(words),
            "{reason:?} should say {words:?}"
        );
        assert_eq!(self.next().await, None, "closed after the error");
        reason
    }
}

fn offer(path: &str, size: u64) -> SenderFrame {
    SenderFrame::Offer(Offer {
        path: path.into(),
        kind: EntryKind::File,
        size: Some(size),
        mode: 0o644,
        mtime: None,
    })
}

/// Sends `name` with `data` as a well-behaved sender and expects it stored.
async fn good_send(addr: SocketAddr, name: &str, data: &[u8]) {
    let mut p = Sender::connect(addr).await;
    p.send(&[offer(name, data.len() as u64)]).await;
    assert!(matches!(
        p.next().await,
        Some(ReceiverFrame::Accept { offset: 0, .. })
    ));
    p.send(&[
        SenderFrame::Start { offset: 0 },
        SenderFrame::Data(Bytes::copy_from_slice(data)),
        SenderFrame::Done {
            hash: *blake3::hash(data).as_bytes(),
        },
        SenderFrame::Bye,
    ])
    .await;
    match p.next().await {
        Some(ReceiverFrame::Stored { name: n, size }) => {
            assert_eq!((n.as_str(), size), (name, data.len() as u64));
        }
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_out_of_order_get_a_reason_and_store_nothing() {
    let s = drop_server("10s");
    let addr = drop_addr(&s);
    let before = stored(&s);
    let data = Bytes::from_static(b"0123456789");

    // A second offer in the middle of a file.
    let mut p = Sender::connect(addr).await;
    p.send(&[offer("a.txt", 10)]).await;
    assert!(matches!(p.next().await, Some(ReceiverFrame::Accept { .. })));
    p.send(&[
        SenderFrame::Start { offset: 0 },
        SenderFrame::Data(data.slice(..5)),
        offer("b.txt", 10),
    ])
    .await;
    p.expect_error("expected data or done, got offer").await;

    // Data before Start.
    let mut p = Sender::connect(addr).await;
    p.send(&[offer("c.txt", 10)]).await;
    assert!(matches!(p.next().await, Some(ReceiverFrame::Accept { .. })));
    p.send(&[SenderFrame::Data(data.clone())]).await;
    p.expect_error("got data").await;

    // Data before any offer.
    let mut p = Sender::connect(addr).await;
    p.send(&[SenderFrame::Data(data.clone())]).await;
    p.expect_error("got data").await;

    // A start beyond the offset that was accepted (0).
    let mut p = Sender::connect(addr).await;
    p.send(&[offer("d.txt", 10)]).await;
    assert!(matches!(
        p.next().await,
        Some(ReceiverFrame::Accept { offset: 0, .. })
    ));
    p.send(&[SenderFrame::Start { offset: 5 }]).await;
    p.expect_error("got start(5)").await;

    let after = stored(&s);
    for name in ["a.txt", "b.txt", "c.txt", "d.txt"] {
        assert!(
            !after.contains(&name.to_string()),
            "{name} stored: {after:?}"
        );
    }
    good_send(addr, "good.txt", b"fine").await;
    let mut want = before.clone();
    want.push("good.txt".into());
    want.sort();
    // The interrupted file's prefix is kept for a resume, as after any
    // broken transfer; no other file appeared.
    let (parts, files): (Vec<String>, Vec<String>) = stored(&s)
        .into_iter()
        .partition(|n| n.ends_with(".netkit-part"));
    assert_eq!(files, want);
    assert_eq!(parts, ["a.txt.netkit-part"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_silent_connections_do_not_hold_up_a_real_sender() {
    let timeout = Duration::from_secs(5);
    let s = drop_server("5s");
    let addr = drop_addr(&s);
    let mut silent = Vec::new();
    // From another loopback address than the real sender's, as an attacker's
    // would be: the drop caps pending connections per address.
    for _ in 0..200 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        silent.push(sock.connect(addr).await.unwrap());
    }
    let start = Instant::now();
    good_send(addr, "real.txt", b"through the crowd").await;
    let took = start.elapsed();
    assert!(
        took < timeout / 2,
        "the real sender took {took:?}, about as long as the silent ones are given ({timeout:?})"
    );
    assert_eq!(stored(&s), ["real.txt"]);
    drop(silent);
}

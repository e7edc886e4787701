//! A malicious sender, written here frame by frame, against a real receiver:
//! bad names, symlinks inside the folder, lying sizes, wrong hashes, oversized
//! frames, silence, wrong magic and version. Each gets a clear reason, nothing
//! is written outside the folder, nothing stored is damaged, and the receiver
//! keeps serving others.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netkit::transfer::proto::{EntryKind, Offer, Preamble, ReceiverFrame, SenderFrame};
use netkit::transfer::recv::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Receiver rooted at `<tmp>/inbox`, so `<tmp>` is "outside" and can be checked.
struct Setup {
    root: tempfile::TempDir,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn new(timeout: Duration) -> Setup {
        Setup::with(|c| c.timeout = timeout).await
    }

    /// A receiver whose default configuration `tune` changes.
    async fn with(tune: impl FnOnce(&mut Config)) -> Setup {
        let root = tempfile::tempdir().unwrap();
        let inbox = root.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = Config::new(&inbox);
        tune(&mut c);
        let stop = CancellationToken::new();
        let task = tokio::spawn(recv::run(listener, c, stop.clone()));
        Setup {
            root,
            addr,
            stop,
            task,
        }
    }

    fn inbox(&self) -> std::path::PathBuf {
        self.root.path().join("inbox")
    }

    /// Everything outside the inbox (must stay just the inbox itself).
    fn outside(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    async fn finish(self) {
        assert_eq!(self.outside(), vec!["inbox".to_string()]);
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

struct Peer {
    s: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn connect(addr: SocketAddr) -> Peer {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&Preamble::OURS.encode()).await.unwrap();
        let mut p = [0u8; 12];
        s.read_exact(&mut p).await.unwrap();
        Preamble::decode(&p).unwrap().check_compatible().unwrap();
        Peer {
            s,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, f: SenderFrame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.s.write_all(&b).await.unwrap();
    }

    async fn recv(&mut self) -> ReceiverFrame {
        loop {
            if let Some(f) = ReceiverFrame::decode(&mut self.buf).unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(&mut self.buf))
                .await
                .expect("receiver answers")
                .unwrap();
            assert!(n > 0, "receiver closed without a frame");
        }
    }

    /// Reads until the receiver closes; returns true if it did.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.s.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}

fn offer(path: &str, size: u64) -> SenderFrame {
    offer_mode(path, EntryKind::File, size, 0o644)
}

/// An offer of `kind` with permission bits `mode`.
fn offer_mode(path: &str, kind: EntryKind, size: u64, mode: u32) -> SenderFrame {
    SenderFrame::Offer(Offer {
        path: path.into(),
        kind,
        size: (kind == EntryKind::File).then_some(size),
        mode,
        mtime: None,
    })
}

/// Offers the folder `path` with `mode`; the receiver's answer.
async fn offer_dir(p: &mut Peer, path: &str, mode: u32) -> ReceiverFrame {
    p.send(offer_mode(path, EntryKind::Dir, 0, mode)).await;
    p.recv().await
}

/// Sends a whole good file on `p` and expects it stored.
async fn send_good(p: &mut Peer, name: &str, data: &[u8]) -> String {
    p.send(offer(name, data.len() as u64)).await;
    match p.recv().await {
        ReceiverFrame::Accept { offset: 0, .. } => {}
        other => panic!("expected Accept(0), got {other:?}"),
    }
    p.send(SenderFrame::Start { offset: 0 }).await;
    p.send(SenderFrame::Data(Bytes::copy_from_slice(data)))
        .await;
    p.send(SenderFrame::Done {
        hash: *blake3::hash(data).as_bytes(),
    })
    .await;
    match p.recv().await {
        ReceiverFrame::Stored { name, .. } => name,
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_names_are_rejected_with_a_reason_and_the_session_goes_on() {
    let s = Setup::new(Duration::from_secs(5)).await;
    let mut p = Peer::connect(s.addr).await;
    let long_component = "a".repeat(256);
    let long_path = vec!["d".repeat(100); 42].join("/");
    let cases: Vec<(String, &str)> = vec![
        ("/etc/passwd".into(), "absolute"),
        ("../escape.txt".into(), "'..'"),
        ("a/../../escape.txt".into(), "'..'"),
        ("a//b".into(), "empty component"),
        ("a/".into(), "empty component"),
        ("".into(), "empty name"),
        ("nul\0byte".into(), "control"),
        ("bell\x07".into(), "control"),
        ("new\nline".into(), "control"),
        (long_component, "255"),
        (long_path, "4096"),
        ("x.netkit-part".into(), "reserved"),
        ("./x".into(), "'.'"),
    ];
    for (name, why) in &cases {
        p.send(offer(name, 3)).await;
        match p.recv().await {
            ReceiverFrame::Reject { reason } => {
                assert!(reason.contains(why), "{name:?}: {reason}")
            }
            other => panic!("{name:?}: expected Reject, got {other:?}"),
        }
    }
    // Same connection, a good file still works.
    assert_eq!(send_good(&mut p, "fine.txt", b"fine").await, "fine.txt");
    p.send(SenderFrame::Bye).await;
    assert!(p.closed().await);
    let names: Vec<_> = std::fs::read_dir(s.inbox()).unwrap().collect();
    assert_eq!(names.len(), 1);
    s.finish().await;
}

#[tokio::test]
async fn symlinks_inside_the_folder_are_never_followed() {
    let s = Setup::new(Duration::from_secs(5)).await;
    let secret = tempfile::tempdir().unwrap();
    let target_file = secret.path().join("target.txt");
    std::fs::write(&target_file, "precious").unwrap();
    std::os::unix::fs::symlink(secret.path(), s.inbox().join("dirlink")).unwrap();
    std::os::unix::fs::symlink(&target_file, s.inbox().join("filelink")).unwrap();
    std::os::unix::fs::symlink(&target_file, s.inbox().join("p.netkit-part")).unwrap();

    let mut p = Peer::connect(s.addr).await;
    // Through a symlinked folder: refused.
    p.send(offer("dirlink/x.txt", 3)).await;
    match p.recv().await {
        ReceiverFrame::Reject { reason } => assert!(reason.contains("symlink"), "{reason}"),
        other => panic!("expected Reject, got {other:?}"),
    }
    // A symlink at the partial file's name: refused.
    p.send(offer("p", 3)).await;
    match p.recv().await {
        ReceiverFrame::Reject { reason } => {
            assert!(reason.contains("not a regular file"), "{reason}")
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    // Onto a symlinked file name: stored beside it, the link's target untouched.
    let stored = send_good(&mut p, "filelink", b"evil").await;
    assert_eq!(stored, "filelink (1)");
    p.send(SenderFrame::Bye).await;
    assert!(p.closed().await);
    assert_eq!(std::fs::read_to_string(&target_file).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(secret.path()).unwrap().count(), 1);
    assert!(
        std::fs::symlink_metadata(s.inbox().join("filelink"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    s.finish().await;
}

#[tokio::test]
async fn lying_sizes_and_wrong_hashes_fail_without_damage() {
    let s = Setup::new(Duration::from_secs(5)).await;
    std::fs::write(s.inbox().join("keep.txt"), "already here").unwrap();
    let mut p = Peer::connect(s.addr).await;

    // Declares 100 bytes, sends 50.
    p.send(offer("short.bin", 100)).await;
    assert!(matches!(
        p.recv().await,
        ReceiverFrame::Accept { offset: 0, .. }
    ));
    p.send(SenderFrame::Start { offset: 0 }).await;
    p.send(SenderFrame::Data(Bytes::from(vec![7u8; 50]))).await;
    p.send(SenderFrame::Done {
        hash: *blake3::hash(&[7u8; 50]).as_bytes(),
    })
    .await;
    match p.recv().await {
        ReceiverFrame::Failed { reason } => {
            assert!(reason.contains("declared 100 bytes"), "{reason}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    // Wrong hash, over an existing file of another size: the old file stays.
    p.send(offer("keep.txt", 4)).await;
    assert!(matches!(
        p.recv().await,
        ReceiverFrame::Accept { offset: 0, .. }
    ));
    p.send(SenderFrame::Start { offset: 0 }).await;
    p.send(SenderFrame::Data(Bytes::from_static(b"evil"))).await;
    p.send(SenderFrame::Done { hash: [0; 32] }).await;
    match p.recv().await {
        ReceiverFrame::Failed { reason } => assert!(reason.contains("BLAKE3 mismatch"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    // The session goes on.
    assert_eq!(send_good(&mut p, "after.txt", b"after").await, "after.txt");
    p.send(SenderFrame::Bye).await;
    assert!(p.closed().await);

    assert_eq!(
        std::fs::read_to_string(s.inbox().join("keep.txt")).unwrap(),
        "already here"
    );
    assert!(!s.inbox().join("short.bin").exists());
    assert!(!s.inbox().join("short.bin.netkit-part").exists());
    assert!(!s.inbox().join("keep.txt.netkit-part").exists());

    // Declares 4 bytes, sends 10: the connection is closed with a reason.
    let mut p = Peer::connect(s.addr).await;
    p.send(offer("long.bin", 4)).await;
    assert!(matches!(
        p.recv().await,
        ReceiverFrame::Accept { offset: 0, .. }
    ));
    p.send(SenderFrame::Start { offset: 0 }).await;
    p.send(SenderFrame::Data(Bytes::from_static(b"0123456789")))
        .await;
    match p.recv().await {
        ReceiverFrame::Error { reason } => assert!(reason.contains("declared size"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    assert!(p.closed().await);
    assert!(!s.inbox().join("long.bin").exists());

    // A Start at an offset the receiver did not offer is a violation.
    let mut p = Peer::connect(s.addr).await;
    p.send(offer("off.bin", 10)).await;
    assert!(matches!(
        p.recv().await,
        ReceiverFrame::Accept { offset: 0, .. }
    ));
    p.send(SenderFrame::Start { offset: 5 }).await;
    match p.recv().await {
        ReceiverFrame::Error { reason } => {
            assert!(reason.contains("protocol violation"), "{reason}")
        }
        other => panic!("expected Error, got {other:?}"),
    }
    s.finish().await;
}

#[tokio::test]
async fn oversized_frame_closes_the_connection_with_a_reason() {
    let s = Setup::new(Duration::from_secs(5)).await;
    let mut p = Peer::connect(s.addr).await;
    // An Offer announcing 16 MiB: refused from the header alone.
    p.s.write_all(&[0x01, 0x01, 0x00, 0x00, 0x00])
        .await
        .unwrap();
    match p.recv().await {
        ReceiverFrame::Error { reason } => assert!(reason.contains("oversized frame"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    assert!(p.closed().await);
    // The receiver still serves others.
    let mut q = Peer::connect(s.addr).await;
    send_good(&mut q, "ok.txt", b"ok").await;
    s.finish().await;
}

#[tokio::test]
async fn a_silent_sender_times_out_while_others_are_served() {
    let s = Setup::new(Duration::from_millis(400)).await;
    // Silent before the handshake.
    let mut mute = TcpStream::connect(s.addr).await.unwrap();
    // Silent in the middle of a file.
    let mut stalled = Peer::connect(s.addr).await;
    stalled.send(offer("stall.bin", 1000)).await;
    assert!(matches!(stalled.recv().await, ReceiverFrame::Accept { .. }));
    stalled.send(SenderFrame::Start { offset: 0 }).await;
    stalled
        .send(SenderFrame::Data(Bytes::from(vec![1u8; 500])))
        .await;

    // Meanwhile another sender is served.
    let mut good = Peer::connect(s.addr).await;
    send_good(&mut good, "good.txt", b"served").await;

    match stalled.recv().await {
        ReceiverFrame::Error { reason } => assert!(reason.contains("sent nothing"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    assert!(stalled.closed().await);
    // The mute peer gets our preamble, then an error frame, then EOF.
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), mute.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let mut rest = BytesMut::from(&all[12..]);
    match ReceiverFrame::decode(&mut rest).unwrap() {
        Some(ReceiverFrame::Error { reason }) => assert!(reason.contains("handshake"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    // The stalled file stays partial (for resume), never under its final name.
    assert!(!s.inbox().join("stall.bin").exists());
    assert_eq!(
        std::fs::metadata(s.inbox().join("stall.bin.netkit-part"))
            .unwrap()
            .len(),
        500
    );
    s.finish().await;
}

async fn raw_exchange(addr: SocketAddr, hello: &[u8]) -> (Vec<u8>, Option<ReceiverFrame>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    assert!(all.len() >= 12, "receiver sends its preamble first");
    let pre = all[..12].to_vec();
    let mut rest = BytesMut::from(&all[12..]);
    (pre, ReceiverFrame::decode(&mut rest).unwrap())
}

#[tokio::test]
async fn wrong_magic_and_wrong_version_get_a_clear_error_at_once() {
    let s = Setup::new(Duration::from_secs(30)).await;
    let (pre, f) = raw_exchange(s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(&pre[..8], b"NETKITXF");
    match f {
        Some(ReceiverFrame::Error { reason }) => {
            assert!(
                reason.contains("not a netkit transfer endpoint"),
                "{reason}"
            )
        }
        other => panic!("expected Error, got {other:?}"),
    }
    let future = Preamble {
        version: 99,
        auth: 0,
    }
    .encode();
    let (_, f) = raw_exchange(s.addr, &future).await;
    match f {
        Some(ReceiverFrame::Error { reason }) => assert!(reason.contains("version 99"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    let authed = Preamble {
        version: 1,
        auth: 7,
    }
    .encode();
    let (_, f) = raw_exchange(s.addr, &authed).await;
    match f {
        Some(ReceiverFrame::Error { reason }) => {
            assert!(reason.contains("auth method 7"), "{reason}")
        }
        other => panic!("expected Error, got {other:?}"),
    }
    s.finish().await;
}

#[tokio::test]
async fn a_second_sender_of_the_same_name_waits_then_is_refused() {
    let s = Setup::new(Duration::from_millis(600)).await;
    let mut first = Peer::connect(s.addr).await;
    first.send(offer("same.bin", 100)).await;
    assert!(matches!(first.recv().await, ReceiverFrame::Accept { .. }));
    first.send(SenderFrame::Start { offset: 0 }).await;
    first
        .send(SenderFrame::Data(Bytes::from(vec![1u8; 10])))
        .await;
    let mut second = Peer::connect(s.addr).await;
    second.send(offer("same.bin", 100)).await;
    match second.recv().await {
        ReceiverFrame::Reject { reason } => assert!(reason.contains("another sender"), "{reason}"),
        ReceiverFrame::Error { reason } => panic!("unexpected error {reason}"),
        other => panic!("expected Reject, got {other:?}"),
    }
    drop(first);
    s.finish().await;
}

#[tokio::test]
async fn format_characters_are_refused_in_file_and_folder_names() {
    let s = Setup::new(Duration::from_secs(5)).await;
    let mut p = Peer::connect(s.addr).await;
    // One of each class of Unicode format character (category Cf).
    let classes = [
        ('\u{202E}', "override"),
        ('\u{202B}', "embedding"),
        ('\u{2066}', "isolate"),
        ('\u{200E}', "mark"),
        ('\u{200B}', "zero-width"),
        ('\u{200C}', "zero-width"),
        ('\u{FEFF}', "byte order"),
        ('\u{00AD}', "soft hyphen"),
        ('\u{2062}', "format character"),
    ];
    for (c, class) in classes {
        let file = format!("{c}txt.exe");
        p.send(offer(&file, 3)).await;
        let folder = format!("dir{c}x");
        let dir_answer = {
            let file_answer = p.recv().await;
            let ReceiverFrame::Reject { reason } = file_answer else {
                panic!("{file:?}: expected Reject, got {file_answer:?}");
            };
            assert!(
                reason.contains("format character") && reason.contains(class),
                "{reason}"
            );
            offer_dir(&mut p, &folder, 0o755).await
        };
        let ReceiverFrame::Reject { reason } = dir_answer else {
            panic!("{folder:?}: expected Reject, got {dir_answer:?}");
        };
        assert!(reason.contains(class), "{reason}");
        // A file inside such a folder is refused too.
        p.send(offer(&format!("{folder}/a.txt"), 3)).await;
        assert!(matches!(p.recv().await, ReceiverFrame::Reject { .. }));
    }
    assert_eq!(send_good(&mut p, "plain.txt", b"ok").await, "plain.txt");
    assert_eq!(std::fs::read_dir(s.inbox()).unwrap().count(), 1);
    s.finish().await;
}

#[tokio::test]
async fn portable_names_refuses_what_windows_and_macos_cannot_store() {
    let unportable = [
        "CON", "nul.txt", "dir/COM1", "LPT9.log", "aux", "a\\b", "c:d", "star*", "q?", "\"q\"",
        "<a>", "p|q", "dot.", "space ", "dot./f",
    ];
    let s = Setup::with(|c| c.portable_names = true).await;
    let mut p = Peer::connect(s.addr).await;
    for name in unportable {
        p.send(offer(name, 3)).await;
        match p.recv().await {
            ReceiverFrame::Reject { reason } => {
                assert!(reason.contains("--portable-names"), "{name:?}: {reason}")
            }
            other => panic!("{name:?}: expected Reject, got {other:?}"),
        }
    }
    assert!(matches!(
        offer_dir(&mut p, "AUX", 0o755).await,
        ReceiverFrame::Reject { .. }
    ));
    assert_eq!(send_good(&mut p, "CONSOLE.txt", b"ok").await, "CONSOLE.txt");
    assert_eq!(std::fs::read_dir(s.inbox()).unwrap().count(), 1);
    s.finish().await;

    // Off by default: the same names are stored.
    let s = Setup::new(Duration::from_secs(5)).await;
    let mut p = Peer::connect(s.addr).await;
    for name in ["CON", "c:d", "dot."] {
        assert_eq!(send_good(&mut p, name, b"ok").await, name);
    }
    s.finish().await;
}

/// Mode bits of `path`, including setuid, setgid and sticky.
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn setuid_setgid_sticky_are_stripped_and_the_umask_applies() {
    // As whoever runs the tests; as root the same rules hold (no special case).
    let s = Setup::with(|c| c.umask = 0o027).await;
    let mut p = Peer::connect(s.addr).await;
    p.send(offer_mode("tool.sh", EntryKind::File, 2, 0o6777))
        .await;
    assert!(matches!(
        p.recv().await,
        ReceiverFrame::Accept { offset: 0, .. }
    ));
    p.send(SenderFrame::Start { offset: 0 }).await;
    p.send(SenderFrame::Data(Bytes::from_static(b"#!"))).await;
    p.send(SenderFrame::Done {
        hash: *blake3::hash(b"#!").as_bytes(),
    })
    .await;
    assert!(matches!(p.recv().await, ReceiverFrame::Stored { .. }));
    assert_eq!(mode_of(&s.inbox().join("tool.sh")), 0o750);

    // A new folder: the same rule.
    assert!(matches!(
        offer_dir(&mut p, "new", 0o7777).await,
        ReceiverFrame::Stored { .. }
    ));
    assert_eq!(mode_of(&s.inbox().join("new")), 0o750);

    // An existing 0700 folder offered as 0777 stays 0700.
    let private = s.inbox().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    assert!(matches!(
        offer_dir(&mut p, "private", 0o777).await,
        ReceiverFrame::Stored { .. }
    ));
    assert_eq!(mode_of(&private), 0o700);
    p.send(SenderFrame::Bye).await;
    s.finish().await;
}

#[tokio::test]
async fn half_a_preamble_is_closed_after_the_handshake_timeout_while_others_are_served() {
    let hs = Duration::from_millis(300);
    let s = Setup::with(|c| c.handshake_timeout = hs).await;
    let mut half = TcpStream::connect(s.addr).await.unwrap();
    let opened = std::time::Instant::now();
    half.write_all(&Preamble::OURS.encode()[..6]).await.unwrap();
    let mut good = Peer::connect(s.addr).await;
    assert_eq!(send_good(&mut good, "a.txt", b"a").await, "a.txt");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut got))
        .await
        .expect("closed")
        .unwrap();
    assert!(
        opened.elapsed() >= hs,
        "closed after {:?}",
        opened.elapsed()
    );
    let mut rest = BytesMut::from(&got[12..]);
    match ReceiverFrame::decode(&mut rest).unwrap() {
        Some(ReceiverFrame::Error { reason }) => assert!(reason.contains("handshake"), "{reason}"),
        other => panic!("expected Error, got {other:?}"),
    }
    good.send(SenderFrame::Bye).await;
    s.finish().await;
}

#[tokio::test]
async fn a_sender_over_max_conns_is_told_busy_and_a_silent_sender_frees_its_slot() {
    let s = Setup::with(|c| {
        c.max_conns = 1;
        c.timeout = Duration::from_millis(500);
    })
    .await;
    // Valid preamble, then nothing: it holds the only slot until --timeout.
    let mut silent = Peer::connect(s.addr).await;
    let mut late = Peer::connect(s.addr).await;
    let asked = std::time::Instant::now();
    late.send(offer("x", 1)).await;
    match late.recv().await {
        ReceiverFrame::Error { reason } => {
            assert!(
                reason.contains("busy") && reason.contains("1 ahead"),
                "{reason}"
            )
        }
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(
        asked.elapsed() < Duration::from_millis(400),
        "{:?}",
        asked.elapsed()
    );
    assert!(silent.closed().await);
    let mut next = Peer::connect(s.addr).await;
    assert_eq!(send_good(&mut next, "b.txt", b"b").await, "b.txt");
    next.send(SenderFrame::Bye).await;
    s.finish().await;
}

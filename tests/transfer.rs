//! File transfer through the library: real sockets on port 0, real files.
//! Round trips, metadata, skip/rename/overwrite, resume after a cut stream,
//! concurrent senders and shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use netkit::transfer::progress::Mode;
use netkit::transfer::recv::{self, Config};
use netkit::transfer::send::{self, Options};
use netkit::transfer::{FileReport, TransferError, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Receiver {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start_receiver(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::new(dir);
    config.timeout = Duration::from_secs(5);
    tweak(&mut config);
    let stop = CancellationToken::new();
    let task = tokio::spawn(recv::run(listener, config, stop.clone()));
    Receiver { addr, stop, task }
}

impl Receiver {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn opts() -> Options {
    Options {
        timeout: Duration::from_secs(5),
        progress: Mode::Off,
        room: None,
    }
}

async fn send_to(addr: SocketAddr, paths: &[&Path]) -> Result<Vec<FileReport>, TransferError> {
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let entries = send::collect(&paths, None).unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    send::send(stream, entries, &opts(), |_| {}).await
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn set_mtime(p: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[tokio::test]
async fn round_trip_files_and_tree_with_metadata() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("ünï/çødé/deep")).unwrap();
    std::fs::write(tree.join("empty"), b"").unwrap();
    std::fs::write(tree.join("one"), b"x").unwrap();
    let odd = pseudo_random(3 * 1024 * 1024 + 17, 1);
    std::fs::write(tree.join("ünï/çødé/odd.bin"), &odd).unwrap();
    std::fs::write(tree.join("ünï/çødé/deep/日本語 name.txt"), "hi").unwrap();
    std::fs::set_permissions(tree.join("one"), PermissionsExt::from_mode(0o751)).unwrap();
    std::fs::set_permissions(tree.join("empty"), PermissionsExt::from_mode(0o600)).unwrap();
    set_mtime(&tree.join("one"), 1_500_000_000);
    set_mtime(&tree.join("ünï/çødé/odd.bin"), 1_600_000_000);
    std::fs::set_permissions(tree.join("ünï"), PermissionsExt::from_mode(0o750)).unwrap();
    // Symlinks inside a sent folder are skipped, never followed.
    std::os::unix::fs::symlink("/etc", tree.join("link-out")).unwrap();
    let single = src.path().join("single.dat");
    std::fs::write(&single, pseudo_random(4097, 2)).unwrap();

    let r = start_receiver(out.path(), |_| {}).await;
    let reports = send_to(r.addr, &[&tree, &single]).await.unwrap();
    assert!(
        reports.iter().all(|r| r.verdict == Verdict::Stored),
        "{reports:#?}"
    );
    // Files before their folder; the folder's own entry last.
    assert_eq!(reports.last().unwrap().name, "single.dat");

    let got = out.path().join("tree");
    assert_eq!(std::fs::read(got.join("empty")).unwrap(), b"");
    assert_eq!(std::fs::read(got.join("one")).unwrap(), b"x");
    assert_eq!(std::fs::read(got.join("ünï/çødé/odd.bin")).unwrap(), odd);
    assert_eq!(
        std::fs::read_to_string(got.join("ünï/çødé/deep/日本語 name.txt")).unwrap(),
        "hi"
    );
    assert_eq!(
        std::fs::read(out.path().join("single.dat")).unwrap(),
        std::fs::read(&single).unwrap()
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&got.join("one")), 0o751);
    assert_eq!(mode(&got.join("empty")), 0o600);
    assert_eq!(mode(&got.join("ünï")), 0o750);
    assert_eq!(
        std::fs::metadata(got.join("ünï")).unwrap().mtime(),
        std::fs::metadata(tree.join("ünï")).unwrap().mtime()
    );
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().mtime();
    assert_eq!(mtime(&got.join("one")), 1_500_000_000);
    assert_eq!(mtime(&got.join("ünï/çødé/odd.bin")), 1_600_000_000);
    assert!(std::fs::symlink_metadata(got.join("link-out")).is_err());
    // No partial files left behind.
    assert!(!walk(out.path()).iter().any(|p| p.ends_with(".netkit-part")));
    r.stop().await;
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        v.push(p.display().to_string());
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&p));
        }
    }
    v
}

#[tokio::test]
async fn identical_is_skipped_different_is_numbered_or_overwritten() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let a = src.path().join("report.txt");
    std::fs::write(&a, "version one").unwrap();
    let r = start_receiver(out.path(), |_| {}).await;

    let first = send_to(r.addr, &[&a]).await.unwrap();
    assert_eq!(first[0].verdict, Verdict::Stored);
    let again = send_to(r.addr, &[&a]).await.unwrap();
    assert_eq!(again[0].verdict, Verdict::Skipped, "{again:?}");
    assert_eq!(again[0].transferred, 0);

    // Same size, different content: kept as "report (1).txt".
    std::fs::write(&a, "version two").unwrap();
    let third = send_to(r.addr, &[&a]).await.unwrap();
    assert_eq!(third[0].verdict, Verdict::Stored);
    assert_eq!(third[0].stored_as.as_deref(), Some("report (1).txt"));
    assert_eq!(
        std::fs::read_to_string(out.path().join("report.txt")).unwrap(),
        "version one"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("report (1).txt")).unwrap(),
        "version two"
    );
    r.stop().await;

    // With --overwrite the original name is replaced.
    let r = start_receiver(out.path(), |c| c.overwrite = true).await;
    std::fs::write(&a, "version three, longer").unwrap();
    let fourth = send_to(r.addr, &[&a]).await.unwrap();
    assert_eq!(fourth[0].stored_as.as_deref(), Some("report.txt"));
    assert_eq!(
        std::fs::read_to_string(out.path().join("report.txt")).unwrap(),
        "version three, longer"
    );
    r.stop().await;
}

/// A proxy that forwards sender→receiver bytes until `limit`, then cuts both sides.
async fn cutting_proxy(target: SocketAddr, limit: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(target).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let mut left = limit;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = match cr.read(&mut buf[..left.min(64 * 1024)]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
        // Cut: drop every half at once.
        back.abort();
        drop((cr, sw));
    });
    addr
}

#[tokio::test]
async fn resumes_after_the_stream_is_cut_at_several_points() {
    let src = tempfile::tempdir().unwrap();
    let data = pseudo_random(5 * 1024 * 1024 + 333, 3);
    let file = src.path().join("big.bin");
    std::fs::write(&file, &data).unwrap();
    for cut in [200usize, 70_000, 1024 * 1024 + 5000, 4 * 1024 * 1024 + 99] {
        let out = tempfile::tempdir().unwrap();
        let r = start_receiver(out.path(), |_| {}).await;
        let proxy = cutting_proxy(r.addr, cut).await;
        let err = send_to(proxy, &[&file]).await.unwrap_err();
        assert!(
            !err.to_string().is_empty(),
            "cut at {cut} must fail the sender"
        );
        // Never a partial file under the final name.
        assert!(!out.path().join("big.bin").exists(), "cut at {cut}");

        let reports = send_to(r.addr, &[&file]).await.unwrap();
        assert_eq!(reports[0].verdict, Verdict::Stored, "cut at {cut}");
        let part_len = reports[0].resumed_from;
        if cut > 1024 * 1024 {
            assert!(part_len > 0, "cut at {cut} should resume, got {reports:?}");
            assert_eq!(reports[0].transferred, data.len() as u64 - part_len);
        }
        assert_eq!(std::fs::read(out.path().join("big.bin")).unwrap(), data);
        assert!(!out.path().join("big.bin.netkit-part").exists());
        r.stop().await;
    }
}

#[tokio::test]
async fn changed_source_restarts_from_zero() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut data = pseudo_random(3 * 1024 * 1024, 4);
    let file = src.path().join("f.bin");
    std::fs::write(&file, &data).unwrap();
    let r = start_receiver(out.path(), |_| {}).await;
    let proxy = cutting_proxy(r.addr, 2 * 1024 * 1024).await;
    send_to(proxy, &[&file]).await.unwrap_err();

    // Change the beginning of the source (same size): the prefix no longer matches.
    data[10] ^= 0xff;
    std::fs::write(&file, &data).unwrap();
    let reports = send_to(r.addr, &[&file]).await.unwrap();
    assert_eq!(reports[0].verdict, Verdict::Stored);
    assert_eq!(reports[0].resumed_from, 0, "{reports:?}");
    assert_eq!(std::fs::read(out.path().join("f.bin")).unwrap(), data);
    r.stop().await;
}

#[tokio::test]
async fn many_senders_at_once() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // Also covers `--no-sync` (no fdatasync anywhere).
    let r = start_receiver(out.path(), |c| c.durable = false).await;
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let p = src.path().join(format!("f{i}.bin"));
        std::fs::write(&p, pseudo_random(300_000 + i as usize, i)).unwrap();
        let addr = r.addr;
        tasks.push(tokio::spawn(async move { send_to(addr, &[&p]).await }));
    }
    for t in tasks {
        let reports = t.await.unwrap().unwrap();
        assert_eq!(reports[0].verdict, Verdict::Stored);
    }
    for i in 0..6u64 {
        assert_eq!(
            std::fs::read(out.path().join(format!("f{i}.bin"))).unwrap(),
            pseudo_random(300_000 + i as usize, i)
        );
    }
    r.stop().await;
}

#[tokio::test]
async fn max_size_rejects_and_the_session_goes_on() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let big = src.path().join("big");
    let small = src.path().join("small");
    std::fs::write(&big, vec![1u8; 5000]).unwrap();
    std::fs::write(&small, b"ok").unwrap();
    let r = start_receiver(out.path(), |c| c.max_size = Some(1000)).await;
    let reports = send_to(r.addr, &[&big, &small]).await.unwrap();
    assert_eq!(reports[0].verdict, Verdict::Rejected);
    assert!(
        reports[0].reason.as_deref().unwrap().contains("--max-size"),
        "{reports:?}"
    );
    assert_eq!(reports[1].verdict, Verdict::Stored);
    assert!(!out.path().join("big").exists());
    r.stop().await;
}

#[tokio::test]
async fn sender_gives_a_clear_error_for_a_peer_that_is_not_netkit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    });
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let err = send_to(addr, &[&f]).await.unwrap_err();
    assert!(
        err.to_string().contains("not a netkit transfer endpoint"),
        "{err}"
    );
}

#[tokio::test]
async fn sender_times_out_on_a_silent_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        // Hold the connection open, silently, until the test aborts this task.
        let _held = s;
        std::future::pending::<()>().await;
    });
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let entries = send::collect(&[f.display().to_string()], None).unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let o = Options {
        timeout: Duration::from_millis(300),
        progress: Mode::Off,
        room: None,
    };
    let err = send::send(stream, entries, &o, |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("sent nothing"), "{err}");
    hold.abort();
}

#[tokio::test]
async fn shutdown_stops_the_receiver_with_a_sender_connected() {
    let out = tempfile::tempdir().unwrap();
    let r = start_receiver(out.path(), |_| {}).await;
    // An idle connection must not hold shutdown up.
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    let mut pre = [0u8; 12];
    idle.read_exact(&mut pre).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.stop())
        .await
        .expect("receiver drains on shutdown");
}

#[tokio::test]
async fn resumes_after_the_receiver_restarts_mid_file() {
    use bytes::{Bytes, BytesMut};
    use netkit::transfer::proto::{EntryKind, Offer, Preamble, ReceiverFrame, SenderFrame};
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * 1024 * 1024 + 7, 5);
    let file = src.path().join("r.bin");
    std::fs::write(&file, &data).unwrap();

    let r = start_receiver(out.path(), |_| {}).await;
    // A sender speaking frames by hand, stopping after 2 MiB of content.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(&Preamble::OURS.encode()).await.unwrap();
    let mut pre = [0u8; 12];
    s.read_exact(&mut pre).await.unwrap();
    let mut wire = BytesMut::new();
    SenderFrame::Offer(Offer {
        path: "r.bin".into(),
        kind: EntryKind::File,
        size: Some(data.len() as u64),
        mode: 0o644,
        mtime: None,
    })
    .encode(&mut wire);
    s.write_all(&wire).await.unwrap();
    let mut buf = BytesMut::new();
    let answer = loop {
        if let Some(f) = ReceiverFrame::decode(&mut buf).unwrap() {
            break f;
        }
        s.read_buf(&mut buf).await.unwrap();
    };
    assert!(matches!(answer, ReceiverFrame::Accept { offset: 0, .. }));
    wire.clear();
    SenderFrame::Start { offset: 0 }.encode(&mut wire);
    for part in data[..2 * 1024 * 1024].chunks(1024 * 1024) {
        SenderFrame::Data(Bytes::copy_from_slice(part)).encode(&mut wire);
    }
    s.write_all(&wire).await.unwrap();

    // The receiver stops mid-file; its writers finish before it returns.
    r.stop().await;
    assert!(!out.path().join("r.bin").exists());
    let part_len = std::fs::metadata(out.path().join("r.bin.netkit-part"))
        .map(|m| m.len())
        .unwrap_or(0);
    drop(s);

    let r = start_receiver(out.path(), |_| {}).await;
    let reports = send_to(r.addr, &[&file]).await.unwrap();
    assert_eq!(reports[0].verdict, Verdict::Stored);
    assert_eq!(reports[0].resumed_from, part_len);
    assert_eq!(reports[0].transferred, data.len() as u64 - part_len);
    assert_eq!(std::fs::read(out.path().join("r.bin")).unwrap(), data);
    r.stop().await;
}

//! `netkit send`, `netkit recv` and the file drop of `netkit serve`, driven
//! through the real binary on port 0.

mod proc_util;

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};

use std::process::{Command, Stdio};
use std::time::Duration;

use proc_util::Netkit;

const BIN: &str = env!("CARGO_BIN_EXE_netkit");

/// A running receiver-side process and the address senders connect to.
struct Running {
    p: Netkit,
    addr: String,
}

/// Starts `netkit ARGS` (`recv --listen` or `serve --drop`); the address is
/// the transfer listener from its ready line.
fn spawn_listening(args: &[&str]) -> Running {
    let p = Netkit::spawn(args);
    let addr = p.ready.recv.or(p.ready.drop).expect("a transfer listener");
    Running {
        addr: addr.to_string(),
        p,
    }
}

impl Running {
    /// Waits for the exit; the status, what followed the ready line on stdout, and the log.
    fn wait(mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.p.wait(Duration::from_secs(120));
        let out = self.p.stdout_string();
        (status, out, self.p.seen.join("\n"))
    }
}

/// `netkit recv --listen 127.0.0.1:0 --dir DIR` with more `flags`.
fn recv_into(dir: &std::path::Path, flags: &[&str]) -> Running {
    let mut args = vec![
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    spawn_listening(&args)
}

fn send(args: &[&str], stdin: Option<Stdio>) -> std::process::Output {
    Command::new(BIN)
        .arg("send")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(stdin.unwrap_or(Stdio::null()))
        .output()
        .unwrap()
}

#[test]
fn send_and_recv_once_with_json() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = src.path().join("photos");
    std::fs::create_dir_all(tree.join("2024/été")).unwrap();
    std::fs::write(tree.join("2024/été/a.jpg"), vec![9u8; 100_003]).unwrap();
    std::fs::write(tree.join("notes.txt"), "hello").unwrap();

    let r = recv_into(out.path(), &["--once", "--json"]);
    let o = send(&["--to", &r.addr, "--json", tree.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(lines.iter().all(|l| l["verdict"] == "stored"), "{lines:?}");
    assert_eq!(lines[0]["name"], "photos/2024/été/a.jpg");
    assert_eq!(lines[0]["size"], 100_003);

    let (status, stdout, _) = r.wait();
    assert!(status.success());
    assert_eq!(
        stdout.lines().count(),
        5,
        "recv --json prints a line per entry"
    );
    assert_eq!(
        std::fs::read(out.path().join("photos/2024/été/a.jpg")).unwrap(),
        vec![9u8; 100_003]
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("photos/notes.txt")).unwrap(),
        "hello"
    );
}

#[test]
fn stdin_from_a_pipe_of_unknown_size() {
    let out = tempfile::tempdir().unwrap();
    let r = recv_into(out.path(), &[]);
    let mut child = Command::new(BIN)
        .args(["send", "-", "--name", "piped.txt", "--to", &r.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&d2).unwrap());
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stored"));
    assert_eq!(std::fs::read(out.path().join("piped.txt")).unwrap(), data);
    stop(r);
}

#[test]
fn stdin_from_a_regular_file_of_known_size() {
    let out = tempfile::tempdir().unwrap();
    let r = recv_into(out.path(), &[]);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), b"from a file").unwrap();
    let o = send(
        &["-", "--name", "sub/redirected.txt", "--to", &r.addr],
        Some(Stdio::from(std::fs::File::open(src.path()).unwrap())),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.path().join("sub/redirected.txt")).unwrap(),
        "from a file"
    );
    stop(r);
}

#[test]
fn stdin_without_a_name_is_a_clear_usage_error() {
    let out = tempfile::tempdir().unwrap();
    let r = recv_into(out.path(), &[]);
    let o = send(&["-", "--to", &r.addr], None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--name"));
    stop(r);
}

/// The smallest write queue (one largest frame) still moves a file of many
/// 512 KiB frames whole; a smaller one is refused before anything listens.
#[test]
fn the_write_queue_flag_has_a_floor() {
    let out = tempfile::tempdir().unwrap();
    let r = recv_into(out.path(), &["--write-queue", "1MiB"]);
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("frames.bin");
    let body: Vec<u8> = (0..(5 << 20) + 12_345).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let o = send(&["--to", &r.addr, file.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.path().join("frames.bin")).unwrap(), body);
    stop(r);

    let o = Command::new(BIN)
        .args(["recv", "--listen", "127.0.0.1:0", "--write-queue", "512KiB"])
        .args(["--dir", out.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("at least 1MiB"), "{err}");
}

fn stop(mut r: Running) {
    let status = r.p.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[test]
fn multi_gib_sparse_file_round_trip() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = src.path().join("disk.img");
    let len: u64 = (2 << 30) + 12_345;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    let marks = [(0u64, b"head"), (1 << 30, b"midl"), (len - 4, b"tail")];
    for (at, m) in marks {
        f.write_all_at(m, at).unwrap();
    }
    drop(f);

    let r = recv_into(out.path(), &["--once"]);
    let o = send(&["--to", &r.addr, path.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (status, _, _) = r.wait();
    assert!(status.success());

    let got = out.path().join("disk.img");
    let m = std::fs::metadata(&got).unwrap();
    assert_eq!(m.len(), len);
    // Holes stay holes: far less than the file's length is allocated.
    assert!(m.blocks() * 512 < 64 << 20, "{} blocks", m.blocks());
    let g = std::fs::File::open(&got).unwrap();
    for (at, mark) in marks {
        let mut b = [0u8; 4];
        g.read_exact_at(&mut b, at).unwrap();
        assert_eq!(&b, mark);
    }
    let mut b = [1u8; 4];
    g.read_exact_at(&mut b, 1 << 20).unwrap();
    assert_eq!(b, [0; 4]);
}

/// `netkit serve` with only the file drop on, limited to 100-byte files.
fn serve_drop(data: &tempfile::TempDir) -> Running {
    spawn_listening(&[
        "serve",
        "--relay",
        "off",
        "--drop",
        "127.0.0.1:0",
        "--tcp",
        "off",
        "--udp",
        "off",
        "--http",
        "off",
        "--chat",
        "off",
        "--drop-max-size",
        "100",
        "--data-dir",
        data.path().to_str().unwrap(),
    ])
}

#[test]
fn serve_runs_the_file_drop() {
    let data = tempfile::tempdir().unwrap();
    let r = serve_drop(&data);
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("dropped.txt");
    std::fs::write(&f, "into the drop").unwrap();
    let o = send(&["--to", &r.addr, f.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(data.path().join("files/dropped.txt")).unwrap(),
        "into the drop"
    );
    stop(r);
}

#[test]
fn the_file_drop_applies_its_limit_flags() {
    let data = tempfile::tempdir().unwrap();
    let r = serve_drop(&data);
    let src = tempfile::tempdir().unwrap();
    let big = src.path().join("big.bin");
    std::fs::write(&big, [7u8; 101]).unwrap();
    let o = send(&["--to", &r.addr, big.to_str().unwrap()], None);
    assert!(!o.status.success());
    assert!(!data.path().join("files/big.bin").exists());
    stop(r);
}

#[test]
fn a_refused_connection_is_a_clear_error() {
    // A port with nothing listening: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = tempfile::NamedTempFile::new().unwrap();
    let o = send(
        &[
            "--to",
            &format!("127.0.0.1:{port}"),
            f.path().to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("connection refused") && err.contains("netkit recv"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let o = send(&["--to", "127.0.0.1:1", "/nonexistent/file"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/file"));
}

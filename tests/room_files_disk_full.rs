//! A full disk under the real `netkit serve`: its data folder is a 16 MiB
//! tmpfs mounted in a mount namespace of its own (`unshare -m`, so root is
//! needed; `.ci/run` runs it). An upload that cannot fit is refused before
//! it starts, space promised to one upload is not promised twice, a disk
//! that fills up from outside mid-upload ends that upload with a clear
//! error and removes its partial, nothing is posted for it, the file stored
//! before is untouched, and the server goes on once space is back.

mod files_util;
mod proc_util;
mod ws_util;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use files_util::{Member, download, read_response};
use proc_util::Netkit;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;

/// `netkit serve` whose data folder `dir` is a fresh tmpfs of `size`
/// bytes, seen only by it (the mount goes away with the process).
fn serve_on_tmpfs(dir: &Path, size: u64) -> Netkit {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "size=$1" netkit-test "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(size.to_string())
        .arg(dir)
        .arg(env!("CARGO_BIN_EXE_netkit"))
        .arg("--ready-json")
        .args(Netkit::serve_chat_args(
            dir,
            "off",
            &["--file-min-free", "1MiB", "--file-max-size", "64MiB"],
        ))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    Netkit::start(cmd)
}

/// `path` (absolute, inside the data folder) as the server's mount
/// namespace sees it.
fn inside(p: &Netkit, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{}/root", p.child.id())).join(path.strip_prefix("/").unwrap())
}

/// The names in the rooms' partial folders of `p`'s data folder `dir`.
fn partials(p: &Netkit, dir: &Path, room: &str) -> Vec<String> {
    let partial = inside(p, &dir.join("rooms").join(room).join("files/.partial"));
    match std::fs::read_dir(partial) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The file messages of `room`, as (name, blake3).
fn file_messages(http: std::net::SocketAddr, room: &str) -> Vec<(String, String)> {
    let v = proc_util::http_get_json(http, &format!("/api/rooms/{room}/messages"));
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["file"].is_object())
        .map(|m| {
            (
                m["file"]["name"].as_str().unwrap().to_string(),
                m["file"]["blake3"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Creates an upload of `size` bytes; the response.
async fn create(m: &Member, http: std::net::SocketAddr, name: &str, size: u64) -> files_util::Resp {
    let path = format!("/api/rooms/{}/files?name={name}&size={size}", m.room);
    m.call(http, "POST", &path, &[], b"").await
}

/// Writes zeros to `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (mounts a private tmpfs); .ci/run runs it with --ignored"]
async fn a_full_disk_refuses_up_front_or_ends_the_upload_and_keeps_what_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let p = serve_on_tmpfs(&dir, 16 * MIB);
    let http = p.ready.http.unwrap();
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "the server's data lives on its own tmpfs, not in the folder outside"
    );
    let ann = Member::join(http, "ann", "lobby").await;
    let kept = b"stored before the disk filled\n".repeat(50);
    let r = ann.upload(http, "kept.txt", &kept).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let kept_file = r.json()["file"].clone();

    // 1. Larger than the free space: refused before a byte is stored.
    let r = create(&ann, http, "huge.bin", 32 * MIB).await;
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "disk_full", "{}", r.json());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk space")
    );
    assert!(partials(&p, &dir, "lobby").is_empty());

    // 2. Space promised to one upload is not promised again.
    let a = create(&ann, http, "a.bin", 9 * MIB).await;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let b = create(&ann, http, "b.bin", 9 * MIB).await;
    assert_eq!(b.status, 507, "9 + 9 MiB do not fit in 16: {}", b.json());
    let a_at = a.header("location").to_string();
    assert_eq!(ann.call(http, "DELETE", &a_at, &[], b"").await.status, 204);
    let b = create(&ann, http, "b.bin", 9 * MIB).await;
    assert_eq!(b.status, 201, "the cancelled upload gave its space back");
    let b_at = b.header("location").to_string();
    assert_eq!(ann.call(http, "DELETE", &b_at, &[], b"").await.status, 204);

    // 3. The disk fills from outside while an upload is under way.
    let size = 4 * MIB;
    let c = create(&ann, http, "c.bin", size).await;
    assert_eq!(c.status, 201);
    let c_at = c.header("location").to_string();
    let id = c_at.rsplit('/').next().unwrap().to_string();
    let mut s = TcpStream::connect(http).await.unwrap();
    let h = ann.patch_head(http, &c_at, size);
    s.write_all(h.as_bytes()).await.unwrap();
    s.write_all(&vec![5u8; MIB as usize]).await.unwrap();
    let part = inside(&p, &dir.join("rooms/lobby/files/.partial").join(&id));
    // The server writes in batches of 256 KiB: most of that MiB is on disk.
    proc_util::wait_until(
        "the upload's bytes on disk",
        Duration::from_secs(20),
        || std::fs::metadata(&part).is_ok_and(|m| m.len() >= MIB / 2),
    );
    let filler = inside(&p, &dir.join("filler"));
    let filled = fill(&filler);
    assert!(filled > 0, "the tmpfs had room left to fill");
    s.write_all(&vec![5u8; 256 << 10]).await.unwrap();
    let r = read_response(&mut s, false).await;
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "disk_full", "{}", r.json());
    assert!(
        !part.exists() && partials(&p, &dir, "lobby").is_empty(),
        "the failed upload's partial is removed"
    );
    assert_eq!(ann.call(http, "HEAD", &c_at, &[], b"").await.status, 404);
    assert_eq!(
        file_messages(http, "lobby"),
        vec![(
            "kept.txt".to_string(),
            kept_file["blake3"].as_str().unwrap().to_string()
        )],
        "nothing is posted for the failed uploads"
    );

    // 4. Space back: the server goes on, and what it stored is untouched.
    std::fs::remove_file(&filler).unwrap();
    let got = download(http, kept_file["url"].as_str().unwrap()).await;
    assert_eq!((got.status, got.body), (200, kept));
    let again = b"after the disk had room again\n".repeat(10);
    let r = ann.upload(http, "again.txt", &again).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(file_messages(http, "lobby").len(), 2);
}

//! A 1 GiB sparse file through the real `netkit serve` and back: streamed
//! from the file in one PATCH of the page's upload API, stored under its
//! BLAKE3, fetched with `Range` at the end boundary, and downloaded whole
//! with `netkit get` (which checks the BLAKE3). Slow in a debug build and
//! 2 GiB of disk, so `.ci/run` runs it (`--ignored`) rather than every
//! `cargo test`.

mod files_util;
mod proc_util;
mod ws_util;

use std::io::Read;

use files_util::{Member, path_of, read_response, request};
use proc_util::{Netkit, bin};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SIZE: u64 = 1 << 30;

/// The BLAKE3 of the file at `path`, read in 1 MiB blocks.
fn blake3_of(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize().to_hex().to_string();
        }
        h.update(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "1 GiB each way and 2 GiB of disk; .ci/run runs it with --ignored"]
async fn a_1_gib_sparse_file_round_trips_through_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let p = Netkit::serve_chat(
        dir.path(),
        &["--file-min-free", "0", "--file-max-size", "2GiB"],
    );
    let http = p.ready.http.unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("sparse.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(SIZE).unwrap();
    // A few bytes of data at both ends and the middle, so that the hash
    // sees the file's layout and not only its length.
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", SIZE / 2 + 3).unwrap();
        f.write_all_at(b"end!", SIZE - 4).unwrap();
    }
    drop(f);
    let want = blake3_of(&src);

    let ann = Member::join(http, "ann", "big").await;
    let create = ann
        .call(
            http,
            "POST",
            &format!("/api/rooms/big/files?name=sparse.img&size={SIZE}"),
            &[],
            b"",
        )
        .await;
    assert_eq!(
        create.status,
        201,
        "{}",
        String::from_utf8_lossy(&create.body)
    );
    let at = create.header("location").to_string();
    let mut sock = TcpStream::connect(http).await.unwrap();
    let h = ann.patch_head(http, &at, SIZE);
    sock.write_all(h.as_bytes()).await.unwrap();
    let mut from = std::fs::File::open(&src).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sock.write_all(&buf[..n]).await.unwrap();
    }
    let r = read_response(&mut sock, false).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let file = r.json()["file"].clone();
    assert_eq!(file["size"], SIZE);
    assert_eq!(file["blake3"], want.as_str());
    let url = file["url"].as_str().unwrap().to_string();

    // Range at the end: the last four bytes, and a range past the end.
    let tail = request(http, "GET", &path_of(&url), &[("Range", "bytes=-4")], b"").await;
    assert_eq!((tail.status, tail.body.as_slice()), (206, &b"end!"[..]));
    assert_eq!(
        tail.header("content-range"),
        format!("bytes {}-{}/{SIZE}", SIZE - 4, SIZE - 1)
    );
    let past = request(
        http,
        "GET",
        &path_of(&url),
        &[("Range", &format!("bytes={SIZE}-"))],
        b"",
    )
    .await;
    assert_eq!(past.status, 416);

    // The whole file with the real client, which checks the BLAKE3 itself.
    let out = work.path().join("got.img");
    let o = {
        let (url, out) = (url.clone(), out.clone());
        tokio::task::spawn_blocking(move || {
            bin().args(["get", &url, "-o"]).arg(&out).output().unwrap()
        })
        .await
        .unwrap()
    };
    assert!(
        o.status.success(),
        "netkit get: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), SIZE);
    assert_eq!(blake3_of(&out), want);
}

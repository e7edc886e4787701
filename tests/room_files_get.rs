//! `netkit get URL` against the real `netkit serve`: a download cut by a
//! proxy resumes from the partial file (Range + If-Range), a damaged partial
//! fails the BLAKE3 check and is removed, and a bad link is refused.

mod files_util;
mod proc_util;
mod ws_util;

use std::net::SocketAddr;
use std::path::Path;

use files_util::Member;
use proc_util::{Netkit, bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs `netkit get URL -o OUT`; returns whether it succeeded, stdout and stderr.
async fn get(url: String, out: &Path) -> (bool, String, String) {
    let out = out.to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        bin().args(["get", &url, "-o"]).arg(&out).output().unwrap()
    })
    .await
    .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

/// A proxy to `to` that passes one connection's request whole and only the
/// first `cut` bytes of its answer, then closes both sides.
async fn cutting_proxy(to: SocketAddr, cut: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        // The request's head names the proxy as Host; the server checks it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(cr.read(&mut b).await.unwrap(), 1, "request head cut");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let head = head.replace(&addr.to_string(), &to.to_string());
        sw.write_all(head.as_bytes()).await.unwrap();
        tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
        let mut left = cut;
        let mut buf = vec![0u8; 16 * 1024];
        while left > 0 {
            let n = sr.read(&mut buf[..left.min(16 * 1024)]).await.unwrap();
            if n == 0 {
                break;
            }
            cw.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        // Dropping both halves closes the client's connection mid-body.
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_and_a_damaged_partial_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = Netkit::serve_chat(dir.path(), &["--file-min-free", "0"]);
    let http = p.ready.http.unwrap();
    let ann = Member::join(http, "ann", "lobby").await;
    let data: Vec<u8> = (0..700_001u32).map(|i| (i * 7 % 253) as u8).collect();
    let r = ann.upload(http, "odd size.bin", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let url = r.json()["file"]["url"].as_str().unwrap().to_string();

    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("got.bin");
    let part = out_dir.path().join("got.bin.netkit-part");

    // Cut after ~300 kB of the answer: fails, the partial stays.
    let proxy = cutting_proxy(http, 300_000).await;
    let via_proxy = url.replace(&http.to_string(), &proxy.to_string());
    let (ok, _, err) = get(via_proxy, &out).await;
    assert!(!ok, "a cut download must fail");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "no final name before the whole file is checked"
    );
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 200_000 && kept < 300_000, "kept {kept}");
    assert_eq!(std::fs::read(&part).unwrap(), data[..kept as usize]);

    // The same command resumes from the partial and verifies the whole.
    let (ok, stdout, err) = get(url.clone(), &out).await;
    assert!(ok, "{err}");
    assert!(
        stdout.contains(&format!("resumed from byte {kept}")),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(!part.exists());

    // A damaged partial: the server's bytes after it do not make the
    // file of the link, so it is refused and removed; a rerun starts over.
    let out2 = out_dir.path().join("again.bin");
    let part2 = out_dir.path().join("again.bin.netkit-part");
    let mut bad = data[..1000].to_vec();
    bad[10] ^= 0xff;
    std::fs::write(&part2, &bad).unwrap();
    let (ok, _, err) = get(url.clone(), &out2).await;
    assert!(!ok);
    assert!(err.contains("BLAKE3 mismatch"), "{err}");
    assert!(!part2.exists() && !out2.exists());
    let (ok, stdout, err) = get(url.clone(), &out2).await;
    assert!(ok, "{err}");
    assert!(!stdout.contains("resumed"), "{stdout}");
    assert_eq!(std::fs::read(&out2).unwrap(), data);

    // A link whose hash names no file: 404, nothing written.
    let missing = url.replace(
        &r.json()["file"]["blake3"].as_str().unwrap()[..8],
        "00000000",
    );
    let out3 = out_dir.path().join("none.bin");
    let (ok, _, err) = get(missing, &out3).await;
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    assert!(!out3.exists());
}

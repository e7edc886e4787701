//! `kill -9` of the real `netkit serve` in the middle of an upload: after a
//! restart no message points to a missing file, the upload's partial is
//! gone, and a file whose message was posted before is still there.

mod files_util;
mod proc_util;
mod ws_util;

use std::time::Duration;

use files_util::{Member, download};
use proc_util::Netkit;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn serve(dir: &std::path::Path) -> Netkit {
    Netkit::serve_chat(dir, &["--file-min-free", "0"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_leaves_no_message_without_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve(dir.path());
    let http = p.ready.http.unwrap();
    let ann = Member::join(http, "ann", "lobby").await;
    let posted = b"posted before the crash\n".repeat(100);
    let r = ann.upload(http, "posted.txt", &posted).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let posted_url = r.json()["file"]["url"].as_str().unwrap().to_string();

    // A second upload: created, then half of its bytes sent in a PATCH
    // that is still open when the server dies.
    let size = 4u64 << 20;
    let r = ann
        .call(
            http,
            "POST",
            &format!("/api/rooms/lobby/files?name=cut.bin&size={size}"),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let location = r.header("location").to_string();
    let mut s = TcpStream::connect(http).await.unwrap();
    let h = ann.patch_head(http, &location, size);
    s.write_all(h.as_bytes()).await.unwrap();
    s.write_all(&vec![9u8; (size / 2) as usize]).await.unwrap();
    s.flush().await.unwrap();
    let partial = dir.path().join("rooms/lobby/files/.partial");
    let id = location.rsplit('/').next().unwrap().to_string();
    let part = partial.join(&id);
    // The bytes are on the server's disk: it is mid-upload.
    proc_util::wait_until(
        "the upload's bytes on disk",
        Duration::from_secs(20),
        || std::fs::metadata(&part).is_ok_and(|m| m.len() > 0),
    );
    p.kill9();
    drop(s);

    let p = serve(dir.path());
    let http = p.ready.http.unwrap();
    assert!(
        !part.exists(),
        "the dead upload's partial is removed at start"
    );
    let v = proc_util::http_get_json(http, "/api/rooms/lobby/messages");
    let msgs = v["messages"].as_array().unwrap();
    let with_files: Vec<&serde_json::Value> =
        msgs.iter().filter(|m| m["file"].is_object()).collect();
    assert_eq!(
        with_files.len(),
        1,
        "only the posted file has a message: {v}"
    );
    for m in with_files {
        let url = m["file"]["url"].as_str().unwrap();
        let got = download(http, url).await;
        assert_eq!(got.status, 200, "{url} points to a missing file");
    }
    let got = download(http, &posted_url).await;
    assert_eq!((got.status, got.body), (200, posted));
    // The dead upload cannot be resumed into a message either.
    let ann = Member::join(http, "ann", "lobby").await;
    let r = ann.call(http, "HEAD", &location, &[], b"").await;
    assert_eq!(r.status, 404);
}

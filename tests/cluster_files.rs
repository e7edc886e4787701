//! Room files across a gossip cluster, with real `netkit serve` processes
//! on 127.0.0.1: a file message posted on node a reaches node b with its
//! file, and node b serves the file (fetched once, verified, then served
//! with the same headers, ranges included); a blob damaged on a is refused
//! by b and nothing is kept; a node's own fetch never fetches further; a
//! node that is down gives a clear error. Every wait reads a socket or
//! polls HTTP.

mod files_util;
mod proc_util;
mod ws_util;

use std::path::Path;
use std::time::Duration;

use files_util::{Member, Resp, download, request};
use proc_util::{ClusterNode, files_under, wait_until};

/// Bytes that are not all alike, `n` of them.
fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// The files stored under `data`'s rooms (part files included).
fn kept(data: &Path) -> Vec<String> {
    files_under(&data.join("rooms"))
}

/// Uploads `data` as `name` into `lobby` on `node`; the message's link.
async fn upload(node: &ClusterNode, name: &str, data: &[u8]) -> String {
    let ann = Member::join(node.http, "ann", "lobby").await;
    let r = ann.upload(node.http, name, data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["file"]["url"].as_str().unwrap().to_string()
}

/// The JSON error code of a response.
fn code(r: &Resp) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_on_one_node_downloads_from_the_other_with_the_same_headers() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, mut b) = ClusterNode::pair(&dirs, false);
    let data = content(777_777);
    let ann = Member::join(a.http, "ann", "lobby").await;
    let r = ann.upload(a.http, "report.pdf", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let file = r.json()["file"].clone();
    let url = file["url"].as_str().unwrap().to_string();
    assert!(url.contains(&a.http.to_string()), "{url}");
    // The message reaches b as a file message (its file with it).
    wait_until("b stores the file message", Duration::from_secs(30), || {
        b.get("/api/rooms/lobby/messages")["messages"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["file"] == file))
    });
    assert!(kept(dirs[1].path()).is_empty(), "b holds nothing yet");

    // Four requests at once on b share one fetch from a.
    let gets = (0..4).map(|_| download(b.http, &url));
    let answers = futures_util::future::join_all(gets).await;
    let etag = format!("\"{}\"", blake3_hex(&data));
    for got in &answers {
        assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
        assert_eq!(got.body, data);
        assert_eq!(got.header("etag"), etag);
        assert_eq!(got.header("x-content-type-options"), "nosniff");
        assert!(got.header("content-disposition").starts_with("attachment;"));
        assert_eq!(got.header("accept-ranges"), "bytes");
    }
    b.p.wait_for("fetched from another hub", Duration::from_secs(10));
    let fetches =
        b.p.drain_log()
            .iter()
            .filter(|l| l.contains("fetched from another hub"))
            .count();
    assert_eq!(fetches, 1, "one fetch for four requests");
    let stored = kept(dirs[1].path());
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].ends_with(&blake3_hex(&data)), "{stored:?}");

    // A range, and a conditional request, now served from b's own copy.
    let path = files_util::path_of(&url);
    let r = request(b.http, "GET", &path, &[("Range", "bytes=1000-1999")], b"").await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[1000..2000]);
    assert_eq!(r.header("content-range"), "bytes 1000-1999/777777");
    let r = request(b.http, "GET", &path, &[("If-None-Match", &etag)], b"").await;
    assert_eq!(r.status, 304);

    // A range asked first on another node also fetches the whole file, then
    // answers only the range.
    let small = content(5000);
    let r = ann.upload(a.http, "small.bin", &small).await;
    let url2 = r.json()["file"]["url"].as_str().unwrap().to_string();
    let r = request(
        b.http,
        "GET",
        &files_util::path_of(&url2),
        &[("Range", "bytes=-10")],
        b"",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &small[4990..]);

    // An image's thumbnail asked on the other node first: the file is
    // fetched, and the thumbnail made there.
    let img = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let r = ann.upload(a.http, "photo.png", png.get_ref()).await;
    let thumb = r.json()["file"]["thumb"].as_str().unwrap().to_string();
    let t = request(b.http, "GET", &files_util::path_of(&thumb), &[], b"").await;
    assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
    assert_eq!(t.header("content-type"), "image/png");
    let t = image::load_from_memory(&t.body).unwrap();
    assert_eq!((t.width(), t.height()), (320, 240));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_is_refused_and_nothing_is_kept_and_a_down_node_is_a_clear_error() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (mut a, b) = ClusterNode::pair(&dirs, false);
    let data = content(100_000);
    let url = upload(&a, "data.bin", &data).await;
    let hex = blake3_hex(&data);
    let blob = dirs[0].path().join("rooms/lobby/files").join(&hex);
    // Same size, one byte changed: a serves it as it is.
    let mut bad = data.clone();
    bad[50_000] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();

    let r = download(b.http, &url).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(code(&r), "fetch_failed");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("BLAKE3") && msg.contains("nothing was kept"),
        "{msg}"
    );
    assert!(
        kept(dirs[1].path()).is_empty(),
        "{:?}",
        kept(dirs[1].path())
    );

    // Repaired on a, b fetches it; a unknown file (not on any node) is a 404.
    std::fs::write(&blob, &data).unwrap();
    assert_eq!(download(b.http, &url).await.body, data);
    let other = url.replace(&hex, &blake3_hex(b"nobody has this"));
    let r = download(b.http, &other).await;
    assert_eq!((r.status, code(&r).as_str()), (404, "not_found"));

    // Node a down: b still serves its own copy, and answers a clear error
    // for a file only a held.
    let url3 = upload(&a, "late.bin", &content(4321)).await;
    // A node's own fetch is answered from what the node holds, never
    // fetched further (no loop between two nodes that both miss a file).
    let path3 = files_util::path_of(&url3);
    let r = request(b.http, "GET", &path3, &[("x-netkit-fetch", "1")], b"").await;
    assert_eq!((r.status, code(&r).as_str()), (404, "not_found"));
    assert_eq!(kept(dirs[1].path()).len(), 1, "nothing fetched for it");
    a.kill9();
    assert_eq!(download(b.http, &url).await.body, data);
    let r = download(b.http, &url3).await;
    let c = code(&r);
    assert!(
        (r.status == 502 && c == "fetch_failed") || (r.status == 404 && c == "not_found"),
        "{} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(kept(dirs[1].path()).len(), 1, "only the verified copy");
}

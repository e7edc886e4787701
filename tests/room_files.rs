//! Files in chat rooms through a real HTTP server on a real socket: upload
//! (whole, resumed after a cut, stalled, lying, refused) and download (Range,
//! ETag, safe headers), the file message over WebSocket and TCP lines.

mod chat_util;
mod files_util;
mod ws_util;

use chat_util::files_server as server;

use std::time::Duration;

use chat_util::{LineClient, Server, T};
use files_util::{Member, download, enc, head, path_of, read_response, request};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use ws_util::{recv_type, send};

/// The files stored in `room` (part files not counted).
fn stored(dir: &tempfile::TempDir, room: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir.path().join("rooms").join(room).join("files")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Odd-sized content that is not all one byte.
fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test]
async fn round_trips_of_empty_one_byte_and_odd_sized_files_reach_ws_and_line_members() {
    let (s, dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "lobby").await;
    let mut bob = s.ws("bob").await;
    send(&mut bob, json!({"type": "join", "room": "lobby"})).await;
    recv_type(&mut bob, "joined").await;
    let mut line = LineClient::connect(s.chat).await;
    line.send("/join lobby").await;
    line.until("-- joined #lobby").await;
    for (name, data) in [
        ("empty.bin", Vec::new()),
        ("one.txt", b"x".to_vec()),
        ("odd size.dat", content(1_234_567)),
    ] {
        let r = ann.upload(s.http, name, &data).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let file = &r.json()["file"];
        assert_eq!(file["name"], name);
        assert_eq!(file["size"], data.len());
        assert_eq!(file["blake3"], blake3_hex(&data));
        let m = recv_type(&mut bob, "message").await;
        assert_eq!(m["from"], "ann");
        assert_eq!(&m["file"], file);
        let shared = line.until("shared").await;
        let url = file["url"].as_str().unwrap();
        assert!(
            shared.contains(&format!("<ann> shared {name} (")),
            "{shared}"
        );
        assert!(shared.ends_with(url), "{shared}");
        let got = download(s.http, url).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, data);
        assert_eq!(got.header("etag"), format!("\"{}\"", blake3_hex(&data)));
        assert!(got.header("content-disposition").starts_with("attachment;"));
        assert_eq!(got.header("x-content-type-options"), "nosniff");
    }
    assert_eq!(stored(&dir, "lobby").len(), 3);
    // The file message is in the history too.
    let (code, body) = s.get("/api/rooms/lobby/messages").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"][2]["file"]["name"], "odd size.dat");
    s.stop().await;
}

/// Creates an upload of `size` bytes named `name`; its path.
async fn create(s: &Server, m: &Member, name: &str, size: u64) -> String {
    let path = format!("/api/rooms/{}/files?name={}&size={size}", m.room, enc(name));
    let r = m.call(s.http, "POST", &path, &[], b"").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("upload-offset"), "0");
    r.header("location").to_string()
}

/// Where the upload at `path` stands.
async fn offset(s: &Server, m: &Member, path: &str) -> (u16, u64) {
    let r = m.call(s.http, "HEAD", path, &[], b"").await;
    (r.status, r.header("upload-offset").parse().unwrap_or(0))
}

#[tokio::test]
async fn a_64_mib_sparse_file_streams_through_in_one_patch() {
    // 64 MiB of zeros (a sparse file's content) keeps a debug build fast;
    // the 1 GiB figure of the issue is the benchmark's, not this test's.
    const SIZE: usize = 64 << 20;
    let (s, _dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "big").await;
    let up = create(&s, &ann, "sparse.img", SIZE as u64).await;
    let mut sock = TcpStream::connect(s.http).await.unwrap();
    let h = head(
        s.http,
        "PATCH",
        &up,
        &[("Authorization", &ann.auth()), ("Upload-Offset", "0")],
        Some(SIZE as u64),
    );
    sock.write_all(h.as_bytes()).await.unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        sock.write_all(&zeros).await.unwrap();
    }
    let r = read_response(&mut sock, false).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let file = r.json()["file"].clone();
    let want = {
        let mut h = blake3::Hasher::new();
        for _ in 0..64 {
            h.update(&zeros);
        }
        h.finalize().to_hex().to_string()
    };
    assert_eq!(file["blake3"], want);
    let got = download(s.http, file["url"].as_str().unwrap()).await;
    assert_eq!(got.body.len(), SIZE);
    assert_eq!(blake3_hex(&got.body), want);
    s.stop().await;
}

#[tokio::test]
async fn an_upload_cut_midway_resumes_from_its_offset() {
    let (s, _dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let data = content(300_001);
    let up = create(&s, &ann, "cut.bin", data.len() as u64).await;
    // Half the body, then the connection drops.
    let half = 150_000;
    let mut sock = TcpStream::connect(s.http).await.unwrap();
    let h = head(
        s.http,
        "PATCH",
        &up,
        &[("Authorization", &ann.auth()), ("Upload-Offset", "0")],
        Some(data.len() as u64),
    );
    sock.write_all(h.as_bytes()).await.unwrap();
    sock.write_all(&data[..half]).await.unwrap();
    drop(sock);
    // The server learns of the cut when it reads the end of the stream.
    let deadline = tokio::time::Instant::now() + T;
    while offset(&s, &ann, &up).await != (200, half as u64) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the offset never reached {half}"
        );
        tokio::task::yield_now().await;
    }
    // A wrong offset is refused with the right one.
    let wrong = ann
        .call(s.http, "PATCH", &up, &[("Upload-Offset", "0")], &data)
        .await;
    assert_eq!(wrong.status, 409);
    assert_eq!(wrong.header("upload-offset"), half.to_string());
    let rest = ann
        .call(
            s.http,
            "PATCH",
            &up,
            &[("Upload-Offset", &half.to_string())],
            &data[half..],
        )
        .await;
    assert_eq!(rest.status, 201, "{}", String::from_utf8_lossy(&rest.body));
    assert_eq!(rest.json()["file"]["blake3"], blake3_hex(&data));
    // Finished uploads are gone.
    assert_eq!(offset(&s, &ann, &up).await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn ranges_at_the_boundaries_etags_and_conditional_requests() {
    let (s, _dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let data = content(1000);
    let r = ann.upload(s.http, "r.bin", &data).await;
    let url = path_of(r.json()["file"]["url"].as_str().unwrap());
    let etag = format!("\"{}\"", blake3_hex(&data));
    let get = |h: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(s.http, "GET", &url, &hs, b"").await
        }
    };
    for (range, first, last) in [
        ("bytes=0-0", 0, 0),
        ("bytes=999-999", 999, 999),
        ("bytes=999-", 999, 999),
        ("bytes=0-", 0, 999),
        ("bytes=-1", 999, 999),
        ("bytes=-1000", 0, 999),
        ("bytes=990-5000", 990, 999),
    ] {
        let r = get(vec![("Range", range.into())]).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            format!("bytes {first}-{last}/1000")
        );
        assert_eq!(r.body, &data[first..=last], "{range}");
    }
    for range in ["bytes=1000-", "bytes=1000-1001", "bytes=-0"] {
        let r = get(vec![("Range", range.into())]).await;
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.header("content-range"), "bytes */1000");
    }
    let r = get(vec![("If-None-Match", etag.clone())]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = get(vec![("If-None-Match", "\"other\"".into())]).await;
    assert_eq!(r.status, 200);
    // A Range under a stale If-Range gets the whole file.
    let r = get(vec![
        ("Range", "bytes=0-0".into()),
        ("If-Range", "\"old\"".into()),
    ])
    .await;
    assert_eq!((r.status, r.body.len()), (200, 1000));
    let r = get(vec![("Range", "bytes=0-0".into()), ("If-Range", etag)]).await;
    assert_eq!(r.status, 206);
    // A hash that is not stored, or not a hash.
    let other = url.replace(&blake3_hex(&data), &blake3_hex(b"nope"));
    assert_eq!(request(s.http, "GET", &other, &[], b"").await.status, 404);
    assert_eq!(
        request(s.http, "GET", "/files/r/..%2F..%2Fchat.sqlite3/x", &[], b"")
            .await
            .status,
        404
    );
    s.stop().await;
}

#[tokio::test]
async fn identical_uploads_are_stored_once_and_counted_once() {
    // The quota is checked against the declared size before any byte is
    // written (whether the content is new is known only at the end), and
    // what the room holds counts identical content once.
    let (s, dir) = server(|l| l.room_quota = 2500).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let data = content(1000);
    let a = ann.upload(s.http, "a.bin", &data).await;
    assert_eq!(a.json()["deduplicated"], false);
    let b = ann.upload(s.http, "b.bin", &data).await;
    assert_eq!(b.status, 201);
    assert_eq!(b.json()["deduplicated"], true);
    assert_eq!(b.json()["file"]["name"], "b.bin");
    assert_eq!(stored(&dir, "r"), vec![blake3_hex(&data)]);
    // 1000 stored + 1400 fits in 2500 only if the copy counted once.
    let c = ann.upload(s.http, "c.bin", &content(1400)).await;
    assert_eq!(c.status, 201, "{}", String::from_utf8_lossy(&c.body));
    s.stop().await;
}

#[tokio::test]
async fn bad_names_are_refused_and_nothing_is_stored() {
    let (s, dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let long = "n".repeat(300);
    for name in [
        "a/b",
        "../x",
        "a\\b",
        "a\0b",
        "a\nb",
        "a\u{1b}[2J",
        "\u{202e}gpj.exe",
        "..",
        "",
        &long,
    ] {
        let r = ann.upload(s.http, name, b"data").await;
        assert_eq!(r.status, 400, "{name:?}");
        assert_eq!(r.json()["error"]["code"], "bad_name", "{name:?}");
    }
    assert!(stored(&dir, "r").is_empty());
    s.stop().await;
}

#[tokio::test]
async fn html_and_svg_with_script_are_attachments_never_active_content() {
    let (s, _dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    for (name, data, mime) in [
        (
            "x.html",
            &b"<!DOCTYPE html><script>alert(document.cookie)</script>"[..],
            "text/html",
        ),
        (
            "x.svg",
            &b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>"[..],
            "image/svg+xml",
        ),
    ] {
        let r = ann.upload(s.http, name, data).await;
        let file = r.json()["file"].clone();
        assert_eq!(file["mime"], mime);
        let got = download(s.http, file["url"].as_str().unwrap()).await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("content-type"),
            "application/octet-stream",
            "{name}"
        );
        assert_eq!(got.header("x-content-type-options"), "nosniff");
        assert_eq!(
            got.header("content-disposition"),
            format!("attachment; filename=\"{name}\"; filename*=UTF-8''{name}")
        );
        assert!(got.header("content-security-policy").contains("sandbox"));
    }
    s.stop().await;
}

#[tokio::test]
async fn a_declared_size_that_lies_cancels_the_upload() {
    let (s, dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    // More body than declared, said up front.
    let path = "/api/rooms/r/files?name=a&size=5";
    let r = ann.call(s.http, "POST", path, &[], b"0123456789").await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("size_mismatch"))
    );
    // More body than declared, found while streaming (chunked, no length).
    let up = create(&s, &ann, "b", 5).await;
    let mut sock = TcpStream::connect(s.http).await.unwrap();
    let auth = ann.auth();
    let mut h = head(
        s.http,
        "PATCH",
        &up,
        &[("Authorization", &auth), ("Upload-Offset", "0")],
        None,
    );
    h.insert_str(h.len() - 2, "Transfer-Encoding: chunked\r\n");
    sock.write_all(h.as_bytes()).await.unwrap();
    sock.write_all(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut sock, false).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "size_mismatch");
    assert_eq!(offset(&s, &ann, &up).await.0, 404, "the upload is gone");
    let partial = dir.path().join("rooms/r/files/.partial");
    assert_eq!(std::fs::read_dir(partial).unwrap().count(), 0);
    s.stop().await;
}

#[tokio::test]
async fn only_members_with_a_ticket_for_the_room_may_upload() {
    let (s, dir) = server(|_| {}).await;
    let mut ann = Member::join(s.http, "ann", "r").await;
    // No ticket, a forged one, one for another room.
    let path = "/api/rooms/r/files?name=a&size=1";
    assert_eq!(request(s.http, "POST", path, &[], b"x").await.status, 401);
    // The last character changed, whatever it was.
    let last = if ann.ticket.ends_with('0') { "1" } else { "0" };
    let forged = format!("Bearer {}{last}", &ann.ticket[..ann.ticket.len() - 1]);
    assert_eq!(
        request(s.http, "POST", path, &[("Authorization", &forged)], b"x")
            .await
            .status,
        401
    );
    let other = "/api/rooms/other/files?name=a&size=1";
    let r = ann.call(s.http, "POST", other, &[], b"x").await;
    assert_eq!(r.status, 403);
    // A ticket for a room one is not in is not issued.
    send(&mut ann.ws, json!({"type": "file_ticket", "room": "other"})).await;
    let e = recv_type(&mut ann.ws, "error").await;
    assert_eq!(e["code"], "not_member");
    // After leaving the room, the ticket is worthless.
    send(&mut ann.ws, json!({"type": "part", "room": "r"})).await;
    recv_type(&mut ann.ws, "parted").await;
    let r = ann.call(s.http, "POST", path, &[], b"x").await;
    assert_eq!(r.status, 403);
    assert!(stored(&dir, "r").is_empty() && stored(&dir, "other").is_empty());
    s.stop().await;
}

#[tokio::test]
async fn limits_refuse_before_writing() {
    let (s, dir) = server(|l| {
        l.room_quota = 100;
        l.max_size = 80;
        l.rooms = Some(vec!["r".into(), "full".into()]);
    })
    .await;
    let ann = Member::join(s.http, "ann", "r").await;
    assert_eq!(ann.upload(s.http, "a", &content(60)).await.status, 201);
    let r = ann.upload(s.http, "b", &content(61)).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("over_quota"))
    );
    let r = ann.upload(s.http, "c", &content(81)).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    // A room that does not take files.
    let closed = Member::join(s.http, "bob", "closed").await;
    let r = closed.upload(s.http, "a", b"x").await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("files_off"))
    );
    assert_eq!(stored(&dir, "r").len(), 1);
    assert!(stored(&dir, "closed").is_empty());
    s.stop().await;
}

#[tokio::test]
async fn too_little_free_space_refuses_the_upload_before_it_starts() {
    let (s, dir) = server(|l| l.min_free = u64::MAX / 2).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let r = ann.upload(s.http, "a", b"x").await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (507, Some("disk_full"))
    );
    assert!(stored(&dir, "r").is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_upload_is_timed_out_and_can_resume() {
    let (s, _dir) = server(|l| l.stall_timeout = Duration::from_millis(300)).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let data = content(100);
    let up = create(&s, &ann, "slow", 100).await;
    let mut sock = TcpStream::connect(s.http).await.unwrap();
    let auth = ann.auth();
    let h = head(
        s.http,
        "PATCH",
        &up,
        &[("Authorization", &auth), ("Upload-Offset", "0")],
        Some(100),
    );
    sock.write_all(h.as_bytes()).await.unwrap();
    sock.write_all(&data[..10]).await.unwrap();
    // Nothing more: the server answers 408 after the stall timeout.
    let r = read_response(&mut sock, false).await;
    assert_eq!(r.status, 408);
    assert_eq!(r.header("upload-offset"), "10");
    let rest = ann
        .call(
            s.http,
            "PATCH",
            &up,
            &[("Upload-Offset", "10")],
            &data[10..],
        )
        .await;
    assert_eq!(rest.status, 201);
    assert_eq!(rest.json()["file"]["blake3"], blake3_hex(&data));
    s.stop().await;
}

#[tokio::test]
async fn a_cancelled_upload_is_removed() {
    let (s, dir) = server(|_| {}).await;
    let ann = Member::join(s.http, "ann", "r").await;
    let up = create(&s, &ann, "x", 10).await;
    let r = ann
        .call(s.http, "PATCH", &up, &[("Upload-Offset", "0")], b"12345")
        .await;
    assert_eq!((r.status, r.header("upload-offset")), (204, "5"));
    let r = ann.call(s.http, "DELETE", &up, &[], b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(offset(&s, &ann, &up).await.0, 404);
    assert_eq!(
        std::fs::read_dir(dir.path().join("rooms/r/files/.partial"))
            .unwrap()
            .count(),
        0
    );
    s.stop().await;
}

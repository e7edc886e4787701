//! Thumbnails of images shared into rooms, through a real HTTP server: PNG
//! and JPEG get a small PNG made on the server, linked from the message and
//! served inline; other files, images over the limit and a server with
//! thumbnails off get none; a truncated image, garbage behind a PNG
//! signature and a decompression bomb are shared as plain files.

mod chat_util;
mod files_util;
mod ws_util;

use chat_util::files_server as server;

use std::io::Cursor;

use chat_util::Server;
use files_util::{Member, download, path_of, request};
use image::{ImageFormat, RgbImage};
use ws_util::recv_type;

/// A `w`×`h` picture encoded as `format`.
fn picture(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Uploads `data` as `name`; returns the message's file object.
async fn share(s: &Server, m: &mut Member, name: &str, data: &[u8]) -> serde_json::Value {
    let r = m.upload(s.http, name, data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let msg = recv_type(&mut m.ws, "message").await;
    assert_eq!(
        msg["file"],
        r.json()["file"],
        "the message carries the same file"
    );
    msg["file"].clone()
}

fn thumbs_in(dir: &tempfile::TempDir, room: &str) -> usize {
    std::fs::read_dir(dir.path().join("rooms").join(room).join("files/thumbs"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn png_and_jpeg_get_a_small_png_served_inline_and_identical_uploads_share_it() {
    let (s, dir) = server(|_| {}).await;
    let mut ann = Member::join(s.http, "ann", "pics").await;
    for (name, w, h, format, tw, th) in [
        ("wide.png", 1000, 500, ImageFormat::Png, 320, 160),
        ("tall.jpg", 400, 800, ImageFormat::Jpeg, 160, 320),
        ("small.png", 100, 50, ImageFormat::Png, 100, 50),
    ] {
        let file = share(&s, &mut ann, name, &picture(w, h, format)).await;
        let url = file["thumb"].as_str().expect("a thumbnail link");
        assert!(url.ends_with(&format!(
            "/thumbs/pics/{}.png",
            file["blake3"].as_str().unwrap()
        )));
        let got = download(s.http, url).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-type"), "image/png");
        assert_eq!(got.header("x-content-type-options"), "nosniff");
        let t = image::load_from_memory_with_format(&got.body, ImageFormat::Png).unwrap();
        assert_eq!((t.width(), t.height()), (tw, th), "{name}");
        if (tw, th) != (w, h) {
            assert_ne!(got.body, picture(w, h, format), "never the original");
        }
        // Cached by its ETag.
        let etag = got.header("etag").to_string();
        let again = request(
            s.http,
            "GET",
            &path_of(url),
            &[("If-None-Match", &etag)],
            b"",
        )
        .await;
        assert_eq!(again.status, 304);
    }
    assert_eq!(thumbs_in(&dir, "pics"), 3);
    // The same picture again: the same file and the same thumbnail.
    let again = share(
        &s,
        &mut ann,
        "copy.png",
        &picture(1000, 500, ImageFormat::Png),
    )
    .await;
    assert!(again["thumb"].is_string());
    assert_eq!(thumbs_in(&dir, "pics"), 3);
    // A thumbnail of a file that is not there, or a bad name: 404.
    for path in [
        format!("/thumbs/pics/{}.png", "0".repeat(64)),
        "/thumbs/pics/..%2F..%2Fchat.sqlite3".to_string(),
        format!("/thumbs/pics/{}", again["blake3"].as_str().unwrap()),
    ] {
        assert_eq!(
            request(s.http, "GET", &path, &[], b"").await.status,
            404,
            "{path}"
        );
    }
}

#[tokio::test]
async fn other_files_big_images_and_a_server_with_thumbnails_off_get_none() {
    let (s, dir) = server(|l| l.thumbnail_max_bytes = 20_000).await;
    let mut ann = Member::join(s.http, "ann", "r").await;
    let text = share(&s, &mut ann, "notes.txt", b"just words").await;
    assert!(text.get("thumb").is_none(), "{text}");
    let big = picture(2000, 2000, ImageFormat::Png);
    assert!(big.len() > 20_000);
    let file = share(&s, &mut ann, "big.png", &big).await;
    assert!(file.get("thumb").is_none(), "over the limit: {file}");
    assert_eq!(thumbs_in(&dir, "r"), 0);

    let (s, dir) = server(|l| l.thumbnail_max_bytes = 0).await;
    let mut bob = Member::join(s.http, "bob", "r").await;
    let file = share(&s, &mut bob, "p.png", &picture(50, 50, ImageFormat::Png)).await;
    assert!(file.get("thumb").is_none(), "off: {file}");
    assert_eq!(thumbs_in(&dir, "r"), 0);
}

/// A PNG of 1×1 whose header claims `w`×`h` (the header's CRC made right,
/// so the decoder gets as far as the size).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = picture(1, 1, ImageFormat::Png);
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[tokio::test]
async fn truncated_garbage_and_bomb_images_are_shared_without_a_thumbnail() {
    let (s, dir) = server(|_| {}).await;
    let mut ann = Member::join(s.http, "ann", "r").await;
    let whole = picture(600, 400, ImageFormat::Png);
    let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    garbage.extend((0..5000u32).map(|i| (i * 31 % 251) as u8));
    for (name, data) in [
        ("half.png", whole[..whole.len() / 2].to_vec()),
        ("garbage.png", garbage),
        ("bomb.png", png_claiming(100_000, 100_000)),
        ("wide bomb.png", png_claiming(1_000_000, 1)),
    ] {
        let file = share(&s, &mut ann, name, &data).await;
        assert!(file.get("thumb").is_none(), "{name}: {file}");
        let got = download(s.http, file["url"].as_str().unwrap()).await;
        assert_eq!(got.body, data, "{name} is still shared as it was");
    }
    assert_eq!(thumbs_in(&dir, "r"), 0);
    // The server goes on, and a good picture still gets its thumbnail.
    let ok = share(&s, &mut ann, "fine.png", &whole).await;
    assert!(ok["thumb"].is_string());
}

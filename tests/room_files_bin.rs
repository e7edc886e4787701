//! Files in rooms through the real `netkit serve`: the file flags, the
//! `shared` line of the line protocol, and a posted file surviving kill -9.

mod files_util;
mod proc_util;
mod ws_util;

use files_util::{Member, path_of, request};
use proc_util::{LineUser, Netkit};

fn serve(data_dir: &std::path::Path) -> Netkit {
    // The shared chat-only start (it also turns the relay door off, which
    // would otherwise take the fixed port 8334 and clash with another run).
    Netkit::serve_chat(
        data_dir,
        &[
            "--file-max-size",
            "1KiB",
            "--file-rooms",
            "lobby,team",
            "--file-min-free",
            "0",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_flags_hold_line_users_see_shared_and_a_posted_file_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve(dir.path());
    let (http, chat) = (p.ready.http.unwrap(), p.ready.chat.unwrap());
    let mut line = tokio::task::spawn_blocking(move || {
        let mut u = LineUser::connect(chat, "carol");
        u.send("/join lobby");
        u.wait_for("-- joined #lobby");
        u
    })
    .await
    .unwrap();
    let ann = Member::join(http, "ann", "lobby").await;
    let data = b"quarterly numbers\n".repeat(10);
    let r = ann.upload(http, "report.txt", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let file = r.json()["file"].clone();
    assert_eq!(file["mime"], "text/plain");
    let url = file["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("http://{http}/files/lobby/")),
        "{url}"
    );
    let shared = tokio::task::spawn_blocking(move || line.wait_for("shared report.txt"))
        .await
        .unwrap();
    assert!(
        shared.contains(&format!("<ann> shared report.txt (180 B) {url}")),
        "{shared}"
    );
    // --file-max-size and --file-rooms.
    let r = ann.upload(http, "big.bin", &[7u8; 1025]).await;
    assert_eq!(r.status, 413);
    let other = Member::join(http, "bob", "random").await;
    assert_eq!(other.upload(http, "a.txt", b"a").await.status, 403);
    // kill -9 right after the answer: the message and the file are both there.
    p.kill9();
    let p = serve(dir.path());
    let http = p.ready.http.unwrap();
    let v = proc_util::http_get_json(http, "/api/rooms/lobby/messages");
    let m = &v["messages"][0];
    assert_eq!(m["file"]["blake3"], file["blake3"]);
    let got = request(http, "GET", &path_of(&url), &[], b"").await;
    assert_eq!((got.status, got.body), (200, data));
}

//! `netkit send --room` through the real `netkit serve`: files (and a tree)
//! go through the drop door and are posted into the room as the ticket's
//! holder; a bad ticket posts nothing.

mod files_util;
mod proc_util;
mod ws_util;

use std::net::SocketAddr;
use std::path::Path;

use files_util::download;
use proc_util::{LineUser, Netkit, bin};

fn serve(data_dir: &Path) -> Netkit {
    Netkit::serve_chat_drop(data_dir, "127.0.0.1:0", &["--file-min-free", "0"])
}

/// Runs `netkit send ARGS`; returns whether it succeeded, its stdout and stderr.
fn send(args: &[&str]) -> (bool, String, String) {
    let out = bin().arg("send").args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A line user in `room` holding an upload ticket for it.
fn member_with_ticket(chat: SocketAddr, nick: &str, room: &str) -> (LineUser, String) {
    let mut u = LineUser::connect(chat, nick);
    u.send(&format!("/join {room}"));
    u.wait_for(&format!("-- joined #{room}"));
    u.send("/ticket");
    let line = u.wait_for("-- file upload ticket for");
    let ticket = line.rsplit(' ').next().unwrap().to_string();
    (u, ticket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netkit_send_room_posts_each_file_and_a_bad_ticket_posts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = serve(dir.path());
    let (http, chat, drop) = (
        p.ready.http.unwrap(),
        p.ready.chat.unwrap(),
        p.ready.drop.unwrap(),
    );
    let src = tempfile::tempdir().unwrap();
    let report = src.path().join("report.pdf");
    let data: Vec<u8> = (0..2_100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&report, &data).unwrap();
    let tree = src.path().join("notes");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"first note\n").unwrap();
    std::fs::write(tree.join("sub/b.txt"), b"second note\n").unwrap();

    let (report_s, tree_s) = (report.display().to_string(), tree.display().to_string());
    let (mut carol, urls) = tokio::task::spawn_blocking(move || {
        let (mut carol, ticket) = member_with_ticket(chat, "carol", "lobby");
        let to = drop.to_string();
        let (ok, out, err) = send(&[
            &report_s, &tree_s, "--room", "lobby", "--ticket", &ticket, "--to", &to,
        ]);
        assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
        let shared = carol.wait_for("<carol> shared report.pdf");
        assert!(
            shared.contains("shared report.pdf (2.1 MB) http://"),
            "{shared}"
        );
        let url = shared.rsplit(' ').next().unwrap().to_string();
        assert!(out.contains(&url), "the sender prints the link: {out}");
        assert!(
            url.starts_with(&format!("http://{http}/files/lobby/")),
            "{url}"
        );
        let a = carol.wait_for("<carol> shared a.txt (11 B) http://");
        let b = carol.wait_for("<carol> shared b.txt (12 B) http://");
        let last = |l: &str| l.rsplit(' ').next().unwrap().to_string();
        (carol, vec![url, last(&a), last(&b)])
    })
    .await
    .unwrap();
    for (url, want) in urls.iter().zip([
        data.clone(),
        b"first note\n".to_vec(),
        b"second note\n".to_vec(),
    ]) {
        let got = download(http, url).await;
        assert_eq!((got.status, got.body), (200, want), "{url}");
    }
    // The messages are in the room's history with their files.
    let v = proc_util::http_get_json(http, "/api/rooms/lobby/messages");
    let files: Vec<_> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["file"]["name"].as_str())
        .collect();
    assert_eq!(files, ["report.pdf", "a.txt", "b.txt"]);

    // A forged ticket: the send fails and nothing more is posted.
    let to = drop.to_string();
    let forged = tokio::task::spawn_blocking(move || {
        let (ok, _, err) = send(&[
            &report.display().to_string(),
            "--room",
            "lobby",
            "--ticket",
            "1.99999999999999.lobby.00",
            "--to",
            &to,
        ]);
        carol.send("still here");
        carol.wait_for("<carol> still here");
        (ok, err, carol.count("shared "))
    })
    .await
    .unwrap();
    assert!(!forged.0, "a forged ticket must fail");
    assert!(
        forged.1.contains("not a valid upload ticket"),
        "{}",
        forged.1
    );
    assert_eq!(forged.2, 3, "nothing posted for the forged ticket");
}

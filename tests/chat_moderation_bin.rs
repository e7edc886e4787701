//! The real binary with `--chat-admins`: a server admin (logged in by an
//! application token) kicks and bans in a room it does not operate, sets
//! `+m`; the ban and the mode survive a restart; kicks and bans are counted.

mod proc_util;

use std::io::{Read, Write};

use proc_util::{LineUser, Netkit, http_get_json};

const SECRET: &str = "a deployment secret of 32 bytes or more";

fn serve(dir: &std::path::Path) -> Netkit {
    Netkit::serve_chat(
        dir,
        &[
            "--chat-auth",
            "accounts",
            "--chat-token-secret",
            SECRET,
            "--chat-admins",
            "root,other",
        ],
    )
}

fn token(sub: &str) -> String {
    proc_util::hs256_token(SECRET.as_bytes(), sub)
}

/// The body of `GET path` (any content type).
fn get_text(http: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn an_admin_kicks_and_bans_and_the_ban_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve(dir.path());
    let chat = p.ready.chat.expect("chat door");
    let http = p.ready.http.expect("http door");

    let mut gus = LineUser::connect(chat, "gus");
    gus.send("/join dev");
    gus.wait_for("-- joined #dev");
    let mut troll = LineUser::connect(chat, "troll");
    troll.send("/join dev");
    troll.wait_for("-- joined #dev");

    let mut root = LineUser::connect(chat, "boss");
    root.send(&format!("/token {}", token("root")));
    root.wait_for("-- logged in as root (by token, server admin)");
    root.send("/join dev");
    root.wait_for("-- joined #dev");
    root.send("/kick troll off topic");
    gus.wait_for("-- root kicked troll from #dev (off topic)");
    troll.wait_for("ERR kicked");
    troll.send("/join dev");
    troll.wait_for("-- joined #dev");
    root.send("/ban troll 7d flooding");
    gus.wait_for("-- root banned troll from #dev for 7d (flooding)");
    troll.wait_for("ERR kicked");
    root.send("/mode +m");
    gus.wait_for("-- root set mode +m");
    let mut mia = LineUser::connect(chat, "mia");
    mia.send("/join dev");
    mia.wait_for("-- joined #dev");
    mia.send("can I speak?");
    mia.wait_for("ERR moderated");
    // The operator still speaks.
    gus.send("ops may");
    mia.wait_for("<gus> ops may");

    let metrics = get_text(http, "/metrics");
    assert!(metrics.contains("netkit_chat_kicks_total"), "{metrics}");
    assert!(metrics.contains("netkit_chat_bans_total"), "{metrics}");
    drop((gus, troll, root, mia));
    assert!(p.terminate().success());

    let mut p = serve(dir.path());
    let chat = p.ready.chat.expect("chat door");
    let http = p.ready.http.expect("http door");
    let rooms = http_get_json(http, "/api/rooms");
    assert_eq!(
        rooms["rooms"][0]["moderated"],
        serde_json::json!(true),
        "{rooms}"
    );
    let mut troll = LineUser::connect(chat, "troll");
    troll.send("/join dev");
    let refused = troll.wait_for("ERR banned");
    assert!(refused.contains("flooding"), "{refused}");
    assert!(p.terminate().success());
}

//! Abuse of the TCP line-chat door, against the real binary: a megabyte line
//! without a newline, invalid UTF-8, NUL bytes, ANSI escapes, a thousand
//! commands in one write. Each case checks what the abuser is told, that a
//! well-behaved user is served during and after, and that the stored history
//! holds only what was really said.

mod abuse_util;

use std::io::Write;
use std::net::TcpStream;

use abuse_util::{LineUser, Serve};
use serde_json::Value;

/// A server with line chat (and HTTP, to read the stored history).
fn server() -> Serve {
    Serve::start(&["--http", "127.0.0.1:0", "--chat", "127.0.0.1:0"])
}

/// A user with nick `nick` in `#lobby`.
fn user_in_lobby(s: &Serve, nick: &str) -> LineUser {
    let mut u = LineUser::connect(s.chat(), nick);
    u.send("/join lobby");
    u.wait_for("joined #lobby");
    u
}

/// The texts stored in `#lobby`, oldest first.
fn lobby_texts(s: &Serve) -> Vec<String> {
    s.stored("lobby")
        .0
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

/// `from` says `text` in `#lobby`; `to` must see it.
fn say_and_see(from: &mut LineUser, to: &mut LineUser, from_nick: &str, text: &str) {
    from.send(text);
    to.wait_for(&format!("<{from_nick}> {text}"));
}

#[test]
fn a_megabyte_line_without_newline_is_skipped_with_an_error() {
    let s = server();
    let mut good = user_in_lobby(&s, "good");
    let mut bad = user_in_lobby(&s, "bad");
    say_and_see(&mut good, &mut bad, "good", "before");

    bad.send_raw(&vec![b'a'; 1 << 20]);
    // While the long line is open, others are served.
    let mut echo = user_in_lobby(&s, "echo");
    say_and_see(&mut echo, &mut good, "echo", "during the long line");
    bad.send_raw(b"\n");
    let e = bad.wait_for("ERR too_large");
    assert!(e.contains("ignored"), "{e}");
    // The session goes on.
    say_and_see(&mut bad, &mut good, "bad", "after the long line");

    // One that hangs up in the middle of its megabyte.
    let mut quitter = TcpStream::connect(s.chat()).unwrap();
    quitter.write_all(&vec![b'b'; 1 << 20]).unwrap();
    drop(quitter);
    say_and_see(&mut good, &mut echo, "good", "after the hang-up");
    assert_eq!(
        lobby_texts(&s),
        [
            "before",
            "during the long line",
            "after the long line",
            "after the hang-up"
        ]
    );
}

#[test]
fn invalid_utf8_nul_and_ansi_escapes_reach_others_neutralised() {
    let s = server();
    let mut good = user_in_lobby(&s, "good");
    let mut bad = user_in_lobby(&s, "bad");

    bad.send_raw(b"bytes \xff\xfe\xc3( end\n");
    let l = good.wait_for("<bad> bytes");
    assert!(l.ends_with("bytes \u{fffd}\u{fffd}\u{fffd}( end"), "{l:?}");

    bad.send_raw(b"nul \x00 byte\n");
    let l = good.wait_for("<bad> nul");
    assert!(l.ends_with("nul   byte"), "{l:?}");

    let evil = "\x1b[2J\x1b[31mred\x1b[0m \x1b]0;title\x07 \u{9b}31m c1 \r bell\x07";
    bad.send_raw(format!("{evil}\n").as_bytes());
    let l = good.wait_for("[31mred");
    assert!(
        !l.chars().any(char::is_control),
        "no control character reaches a line client: {l:?}"
    );
    assert!(
        l.contains("<bad>  [2J [31mred [0m  ]0;title   31m c1   bell"),
        "{l:?}"
    );

    // A nick or room with control characters is refused, not echoed.
    bad.send("/nick \x1b[31mx");
    bad.wait_for("ERR bad_nick");
    bad.send("/join \x1b[2J");
    let e = bad.wait_for("ERR bad_room");
    assert!(!e.chars().any(char::is_control), "{e:?}");

    // Stored as sent (it is the display that neutralises); nothing else stored.
    let texts = lobby_texts(&s);
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert_eq!(texts[1], "nul \u{0} byte");
    assert_eq!(texts[2], evil.trim_end_matches('\r'));
    say_and_see(&mut bad, &mut good, "bad", "still here");
}

#[test]
fn a_thousand_commands_in_one_write_are_all_answered() {
    let s = server();
    let mut good = user_in_lobby(&s, "good");
    let mut bad = user_in_lobby(&s, "bad");
    let mut burst = String::new();
    for i in 0..1_000 {
        burst.push_str(&match i % 5 {
            0 => format!("/join room{}\n", i % 7),
            1 => "/rooms\n".to_string(),
            2 => "/who lobby\n".to_string(),
            3 => format!("/msg good dm {i}\n"),
            _ => "/help\n".to_string(),
        });
    }
    bad.send_raw(burst.as_bytes());
    // Every direct message arrives (ordering is not what this test is about).
    for i in (3..1_000).step_by(5) {
        good.wait_for(&format!("dm {i}"));
    }
    assert_eq!(good.count("dm "), 200);
    // The abuser is answered and still served.
    bad.send("/rooms");
    bad.wait_for("-- rooms:");
    for r in 0..7 {
        bad.send(&format!("/part room{r}"));
        bad.wait_for(&format!("-- you left #room{r}"));
    }
    say_and_see(&mut bad, &mut good, "bad", "after the burst");
    assert_eq!(lobby_texts(&s), ["after the burst"]);
    let stats: Value = abuse_util::http_get_json(s.http(), "/api/stats");
    assert_eq!(stats["clients"], 2, "{stats}");
}

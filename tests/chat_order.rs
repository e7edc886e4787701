//! Requests sent together behave as if sent one by one: each takes effect
//! before the next is handled, and every reply due arrives before the close.
//! Real sockets on 127.0.0.1 port 0, TCP lines and WebSocket JSON.

mod chat_util;
mod ws_util;

use futures_util::{SinkExt, StreamExt};
use netkit::chat::ConnConfig;
use netkit::chat::hub::HubConfig;
use netkit::chat::line::HELP;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use chat_util::{Server, T};
use ws_util::recv;

fn open_hub() -> HubConfig {
    HubConfig {
        rate: 0.0,
        ..HubConfig::default()
    }
}

/// Sends `script` on a new line connection (in one write, or one byte per
/// write) and returns everything it is sent until the server closes, with
/// the welcome line dropped and clock prefixes cut.
async fn transcript(srv: &Server, script: &str, byte_by_byte: bool) -> Vec<String> {
    let mut s = TcpStream::connect(srv.chat).await.unwrap();
    s.set_nodelay(true).unwrap();
    if byte_by_byte {
        for b in script.as_bytes() {
            s.write_all(std::slice::from_ref(b)).await.unwrap();
        }
    } else {
        s.write_all(script.as_bytes()).await.unwrap();
    }
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .expect("the server did not close after /quit")
        .unwrap();
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("-- welcome"), "{out}");
    lines.map(normalize).collect()
}

/// A line without its `[HH:MM:SS] ` clock and with the guest number hidden.
fn normalize(l: &str) -> String {
    let l = match l.strip_prefix('[') {
        Some(rest) if rest.as_bytes().get(8) == Some(&b']') => &rest[10..],
        _ => l,
    };
    match l.strip_prefix("-- guest-") {
        Some(rest) => format!(
            "-- guest-N{}",
            rest.trim_start_matches(|c: char| c.is_ascii_digit())
        ),
        None => l.to_string(),
    }
}

fn help_lines() -> Vec<String> {
    HELP.lines().map(|l| format!("-- {l}")).collect()
}

/// Every command of the help text in one script, each depending on the ones before.
const SCRIPT: &str = "/nick carl\n/join lobby\nhello again\n/me waves\n/topic tea time\n\
/who\n/rooms\n/msg carl note to self\n/join second\n/part\nback in lobby\n/part lobby\n/help\n/quit\n";

fn expected_script() -> Vec<String> {
    let mut v: Vec<String> = [
        "-- guest-N is now known as carl",
        "-- joined #lobby — members: carl — 0 earlier message(s) follow",
        "#lobby <carl> hello again",
        "#lobby * carl waves",
        "-- carl set the topic of #lobby: tea time",
        "-- members of #lobby: carl",
        "-- rooms: #lobby (1)",
        "*carl -> carl* note to self",
        "-- joined #second — members: carl — 0 earlier message(s) follow",
        "-- you left #second",
        "#lobby <carl> back in lobby",
        "-- you left #lobby",
    ]
    .map(String::from)
    .to_vec();
    v.extend(help_lines());
    v
}

#[tokio::test]
async fn every_help_command_pasted_in_one_write_runs_in_order() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    assert_eq!(transcript(&srv, SCRIPT, false).await, expected_script());
    srv.stop().await;
}

#[tokio::test]
async fn every_help_command_sent_one_byte_per_write_runs_in_order() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    assert_eq!(transcript(&srv, SCRIPT, true).await, expected_script());
    srv.stop().await;
}

/// The issue's own cases: text right after a join, and /quit right after it.
#[tokio::test]
async fn a_pasted_join_is_in_effect_for_the_next_line_and_its_reply_comes_before_quit() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    for (bytewise, nick, room) in [(false, "bob", "lobby"), (true, "bo", "hall")] {
        let script = format!("/nick {nick}\n/join {room}\nhello from nc\n/who\n/quit\n");
        let got = transcript(&srv, &script, bytewise).await;
        assert_eq!(
            got,
            [
                format!("-- guest-N is now known as {nick}"),
                format!("-- joined #{room} — members: {nick} — 0 earlier message(s) follow"),
                format!("#{room} <{nick}> hello from nc"),
                format!("-- members of #{room}: {nick}"),
            ]
        );
        let script = format!("/join quiet{}\n/quit\n", u8::from(bytewise));
        let got = transcript(&srv, &script, bytewise).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("-- joined #quiet"), "{got:?}");
    }
    srv.stop().await;
}

/// Each command of the help text right after a join, pasted, sees the join.
#[tokio::test]
async fn each_help_command_right_after_a_join_sees_it() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let cases: [(&str, &str); 10] = [
        ("/nick dora", "-- guest-N is now known as dora"),
        ("/join other", "-- joined #other"),
        ("/part", "-- you left #r"),
        ("/rooms", "-- rooms: "),
        ("/who", "-- members of #r: "),
        ("/msg nobody hi", "ERR no_such_user"),
        ("/me waves", "#r * "),
        ("/topic set", " set the topic of #r: set"),
        ("/help", "-- commands:"),
        ("plain text", "#r <"),
    ];
    for bytewise in [false, true] {
        for (i, (cmd, want)) in cases.iter().enumerate() {
            // A new room each time, so that history and member lists stay short.
            let room = format!("r{i}{}", u8::from(bytewise));
            let script = format!("/join {room}\n{cmd}\n/quit\n");
            let got = transcript(&srv, &script, bytewise).await;
            assert!(got[0].starts_with(&format!("-- joined #{room}")), "{got:?}");
            let want = want.replace("#r", &format!("#{room}"));
            assert!(
                got.get(1).is_some_and(|l| l.contains(&want)),
                "{cmd}: {got:?}"
            );
            assert!(
                !got.iter().any(|l| l.starts_with("ERR bad_command")),
                "{got:?}"
            );
        }
    }
    srv.stop().await;
}

/// Every frame the server sends until it closes, as JSON (the close ends it).
async fn until_closed(ws: &mut ws_util::Ws) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let m = tokio::time::timeout(T, ws.next()).await.unwrap();
        match m {
            Some(Ok(Message::Text(t))) => got.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return got,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn websocket_requests_sent_back_to_back_run_in_order() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let mut ws = srv.ws("web").await;
    let requests = [
        json!({"type":"join","room":"lobby"}),
        json!({"type":"say","room":"lobby","text":"hi"}),
        json!({"type":"who","room":"lobby"}),
        json!({"type":"topic","room":"lobby","topic":"tea"}),
        json!({"type":"me","room":"lobby","text":"waves"}),
        json!({"type":"msg","to":"web","text":"psst"}),
        json!({"type":"rooms"}),
        json!({"type":"part","room":"lobby"}),
        json!({"type":"say","room":"lobby","text":"late"}),
        json!({"type":"join","room":"lobby"}),
    ];
    // All in one write, then the close: nothing waits for a reply.
    for r in &requests {
        ws.feed(Message::Text(r.to_string().into())).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut got: Vec<Value> = Vec::new();
    while got.len() < 12 {
        got.push(recv(&mut ws).await);
    }
    ws.close(None).await.unwrap();
    got.extend(until_closed(&mut ws).await);
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "joined", "message", "members", "topic", "message", "direct", "rooms", "parted",
            "error", "joined", "message", "message"
        ]
    );
    assert_eq!(got[2]["members"], json!(["web"]));
    assert_eq!(got[6]["rooms"][0]["members"], 1);
    assert_eq!(got[8]["code"], "not_member");
    assert_eq!(got[9]["history"], 2);
    srv.stop().await;
}

#[tokio::test]
async fn a_websocket_join_sent_just_before_the_close_is_answered() {
    let srv = Server::start(open_hub(), ConnConfig::default()).await;
    let mut ws = srv.ws("web").await;
    ws.feed(Message::Text(
        json!({"type":"join","room":"lobby"}).to_string().into(),
    ))
    .await
    .unwrap();
    ws.feed(Message::Text(
        json!({"type":"say","room":"lobby","text":"bye"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.close(None).await.unwrap();
    let got = until_closed(&mut ws).await;
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["joined", "message"]);
    srv.stop().await;
}

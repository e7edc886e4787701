//! Abuse of the chat WebSocket door, against the real binary: bad JSON,
//! binary frames, oversized and lying frame headers, endless fragments, bad
//! room names, thousands of held connections and a client that never reads.
//! Each case checks what the abuser is told, that a well-behaved user is
//! served during and after, and that the stored history is untouched.

mod abuse_util;

use abuse_util::{RawWs, Serve, T, frame, frame_header, op};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// A server with the WebSocket and line doors, a 16 KiB message limit (so a
/// 10 KB room name reaches the name check) and hence a 64 KiB hard frame cap.
fn server() -> Serve {
    Serve::start(&[
        "--http",
        "127.0.0.1:0",
        "--chat",
        "127.0.0.1:0",
        "--chat-max-msg",
        "16KiB",
    ])
}

/// A user in `room` who has said `first` (and seen it come back).
async fn user_in(s: &Serve, nick: &str, room: &str) -> RawWs {
    let mut u = RawWs::connect(s.http(), nick).await;
    u.send_json(json!({"type": "join", "room": room})).await;
    u.recv_type("joined").await;
    u
}

/// `from` says `text` in `room`; `to` must receive it.
async fn say_and_see(from: &mut RawWs, to: &mut RawWs, room: &str, text: &str) {
    from.send_json(json!({"type": "say", "room": room, "text": text}))
        .await;
    loop {
        let m = to.recv_type("message").await;
        if m["text"] == text {
            return;
        }
    }
}

/// The error frame that answers a request, its `code` checked.
async fn expect_error(ws: &mut RawWs, code: &str) -> Value {
    let e = ws.recv_type("error").await;
    assert_eq!(e["code"], code, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_binary_and_unknown_types_get_an_error_and_the_connection_goes_on() {
    let s = server();
    let mut good = user_in(&s, "good", "lobby").await;
    let mut bad = user_in(&s, "bad", "lobby").await;
    say_and_see(&mut good, &mut bad, "lobby", "before").await;
    let before = s.stored("lobby");

    let cases: [(&[u8], u8, &str); 7] = [
        (b"{not json", op::TEXT, "bad_json"),
        (b"", op::TEXT, "bad_json"),
        (b"\"just a string\"", op::TEXT, "bad_message"),
        (b"[1,2,3]", op::TEXT, "bad_message"),
        (
            br#"{"type":"shout","room":"lobby"}"#,
            op::TEXT,
            "unknown_type",
        ),
        (br#"{"type":"say","room":"lobby"}"#, op::TEXT, "bad_message"),
        (b"\x00\x01binary", op::BINARY, "binary_unsupported"),
    ];
    for (payload, opcode, code) in cases {
        assert!(bad.send_bytes(&frame(true, opcode, payload)).await);
        expect_error(&mut bad, code).await;
    }
    assert_eq!(s.stored("lobby"), before, "nothing was stored");
    // Both are still served, in both directions.
    say_and_see(&mut bad, &mut good, "lobby", "bad is still here").await;
    say_and_see(&mut good, &mut bad, "lobby", "and good too").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_room_names_are_refused_and_create_nothing() {
    let s = server();
    let mut good = user_in(&s, "good", "lobby").await;
    let mut bad = RawWs::connect(s.http(), "bad").await;
    let files_before = s.files();
    let before = s.stored("lobby");
    let long = "x".repeat(10 * 1024);
    let names = [
        "",
        &long,
        "a\u{0}b",
        "a\nb",
        "\u{1b}[2J",
        "../x",
        "..",
        "a/b",
        "lobby ",
    ];
    for room in names {
        for req in [
            json!({"type": "join", "room": room}),
            json!({"type": "say", "room": room, "text": "hi"}),
            json!({"type": "who", "room": room}),
            json!({"type": "topic", "room": room, "topic": "t"}),
            json!({"type": "part", "room": room}),
        ] {
            bad.send_json(req.clone()).await;
            let e = bad.recv_type("error").await;
            assert!(
                e["code"] == "bad_room" || e["code"] == "not_member",
                "{req}: {e}"
            );
        }
    }
    assert_eq!(s.stored("lobby"), before);
    assert_eq!(s.files(), files_before, "no file was created");
    say_and_see(&mut good, &mut good_echo(&s).await, "lobby", "still fine").await;
}

/// A second well-behaved user in `lobby`.
async fn good_echo(s: &Serve) -> RawWs {
    user_in(s, "echo", "lobby").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_lying_frames_close_with_1009_and_a_reason() {
    let s = server();
    let mut good = user_in(&s, "good", "lobby").await;
    let mut echo = good_echo(&s).await;
    let before = s.stored("lobby");

    // Between the soft limit and the hard cap: an error, the connection stays.
    let mut mid = user_in(&s, "mid", "lobby").await;
    let text = "y".repeat(20 * 1024);
    mid.send_json(json!({"type": "say", "room": "lobby", "text": text}))
        .await;
    expect_error(&mut mid, "too_large").await;
    say_and_see(&mut mid, &mut good, "lobby", "mid goes on").await;
    let stored = s.stored("lobby").0;
    assert_eq!(
        stored.as_array().unwrap().len(),
        before.0.as_array().unwrap().len() + 1
    );

    // A 10 MiB frame: closed with 1009 before it is all read.
    let mut big = RawWs::connect(s.http(), "big").await;
    let mut w = big.take_writer();
    let sender = tokio::spawn(async move {
        // The server may close long before the end: a failed write ends it.
        let _ = w.write_all(&frame_header(true, op::TEXT, 10 << 20)).await;
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..(10 * 16) {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    say_and_see(&mut good, &mut echo, "lobby", "during the big frame").await;
    let (code, reason, _) = big.close_frame().await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("too big"), "{reason}");
    sender.abort();

    // A header claiming 2^62 bytes: closed with 1009 at once.
    let mut liar = RawWs::connect(s.http(), "liar").await;
    liar.send_bytes(&frame_header(true, op::TEXT, 1 << 62))
        .await;
    let (code, reason, _) = liar.close_frame().await;
    assert_eq!(code, 1009, "{reason}");

    let texts: Vec<Value> = s
        .stored("lobby")
        .0
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(
        texts,
        [json!("mid goes on"), json!("during the big frame")],
        "nothing else was stored"
    );
    say_and_see(&mut echo, &mut good, "lobby", "after the big frames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_fragments_are_one_message_or_one_clear_error() {
    let s = server();
    let mut good = user_in(&s, "good", "lobby").await;
    let mut frag = user_in(&s, "frag", "lobby").await;

    // 10,000 fragments, all but two empty, carrying one small message: delivered.
    let msg = json!({"type": "say", "room": "lobby", "text": "in pieces"}).to_string();
    let (a, b) = msg.as_bytes().split_at(10);
    let mut wire = frame(false, op::TEXT, a);
    for _ in 0..9_998 {
        wire.extend(frame(false, op::CONT, b""));
    }
    wire.extend(frame(true, op::CONT, b));
    assert!(frag.send_bytes(&wire).await);
    let m = good.recv_type("message").await;
    assert_eq!(m["text"], "in pieces");

    // 10,000 two-byte fragments: 20,000 bytes, over the 16 KiB limit but
    // under the hard cap: a too_large error, and the connection stays.
    let mut wire = frame(false, op::TEXT, b"{\"");
    for _ in 0..9_998 {
        wire.extend(frame(false, op::CONT, b"aa"));
    }
    wire.extend(frame(true, op::CONT, b"\"}"));
    assert!(frag.send_bytes(&wire).await);
    expect_error(&mut frag, "too_large").await;
    say_and_see(&mut frag, &mut good, "lobby", "after the fragments").await;

    // 10,000 one-kilobyte fragments: 10 MB, over the hard cap: closed with 1009.
    let mut w = frag.take_writer();
    let sender = tokio::spawn(async move {
        let piece = vec![b'a'; 1024];
        if w.write_all(&frame(false, op::TEXT, &piece)).await.is_err() {
            return;
        }
        for _ in 0..9_999 {
            if w.write_all(&frame(false, op::CONT, &piece)).await.is_err() {
                return;
            }
        }
    });
    let (code, reason, _) = frag.close_frame().await;
    assert_eq!(code, 1009, "{reason}");
    sender.abort();
    let mut echo = good_echo(&s).await;
    say_and_see(&mut echo, &mut good, "lobby", "after the close").await;
}

/// Raises this process's soft open-file limit to its hard limit (the server,
/// started afterwards, inherits it); returns the new soft limit.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a zeroed struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

/// 2,000 connections, or as many as the open-file limit allows with room to
/// spare (each held connection costs one descriptor here and one in the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_held_connections_do_not_stop_a_real_user() {
    let limit = raise_fd_limit();
    let held_n = 2_000.min(limit.saturating_sub(256) as usize);
    assert!(
        held_n >= 500,
        "open-file limit {limit} is too low for this test"
    );
    if held_n < 2_000 {
        eprintln!("open-file limit {limit}: holding {held_n} connections, not 2,000");
    }
    let s = server();
    let mut held = Vec::with_capacity(held_n);
    for i in 0..held_n {
        held.push(RawWs::connect(s.http(), &format!("h{i}")).await);
    }
    let stats = abuse_util::http_get_json(s.http(), "/api/stats");
    assert_eq!(
        stats["clients"], held_n,
        "the held clients are counted: {stats}"
    );
    let mut good = user_in(&s, "good", "lobby").await;
    let mut echo = good_echo(&s).await;
    say_and_see(&mut good, &mut echo, "lobby", "among the crowd").await;
    drop(held);
    say_and_see(&mut echo, &mut good, "lobby", "after the crowd").await;
    assert_eq!(s.stored("lobby").0.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_while_the_room_flows() {
    let s = Serve::start(&[
        "--http",
        "127.0.0.1:0",
        "--chat-write-timeout",
        "2s",
        // Room for the two reading clients to fall a little behind on a busy
        // machine (256 KiB cut one of them now and then); the sleeper's 8 MB
        // still overflow it many times over.
        "--chat-queue-bytes",
        "1MiB",
    ]);
    let mut good = user_in(&s, "good", "lobby").await;
    let mut flooder = user_in(&s, "flood", "lobby").await;
    let mut sleeper = RawWs::connect_small_window(s.http(), "sleeper").await;
    sleeper
        .send_json(json!({"type": "join", "room": "lobby"}))
        .await;
    sleeper.recv_type("joined").await;
    // From here on the sleeper reads nothing until the flood is over.
    // 8 MB: more than the kernel buffers of both sockets can hold.
    let n = 2_000;
    // The flooder writes from a task of its own and reads its echo here,
    // so that only the sleeper falls behind.
    let mut w = flooder.take_writer();
    let writer = tokio::spawn(async move {
        let text = "f".repeat(4000);
        for i in 0..n {
            let m = json!({"type": "say", "room": "lobby", "text": format!("{i} {text}")});
            w.write_all(&frame(true, op::TEXT, m.to_string().as_bytes()))
                .await
                .unwrap();
        }
        w
    });
    tokio::join!(in_order(&mut good, n), in_order(&mut flooder, n));
    let w = writer.await.unwrap();
    // The sleeper was disconnected: lagging (4000) if its queue overflowed,
    // write timeout (4002) if its socket stayed full. The close frame says
    // so when it still fits in the socket; either way the server let go.
    abuse_util::wait_until("the sleeper is let go", T, || {
        abuse_util::http_get_json(s.http(), "/api/stats")["clients"] == 2
    });
    if let Some((code, reason)) = sleeper.close_or_end().await {
        assert!(code == 4000 || code == 4002, "{code} {reason}");
    }
    drop(w);
    let mut echo = good_echo(&s).await;
    say_and_see(&mut echo, &mut good, "lobby", "after the sleeper").await;
}

/// Reads `n` flood messages in order.
async fn in_order(ws: &mut RawWs, n: usize) {
    for i in 0..n {
        let m = ws.recv_type("message").await;
        let t = m["text"].as_str().unwrap();
        assert!(
            t.starts_with(&format!("{i} ")),
            "message {i} in order: {t:.20}"
        );
    }
}

//! Moderation over real sockets: a WebSocket operator kicks, then bans
//! (with the address) a line user, who is told and kept out; `/ignore` on a
//! line connection; kicks and bans counted in `/metrics`, modes in `/api/rooms`.

mod chat_util;
mod ws_util;

use chat_util::{LineClient, Server};
use netkit::chat::ConnConfig;
use netkit::chat::hub::HubConfig;
use serde_json::json;
use ws_util::{recv_type, send};

#[tokio::test]
async fn a_page_operator_kicks_and_bans_a_line_user() {
    let server = Server::start(HubConfig::default(), ConnConfig::default()).await;
    let _ = server.get("/metrics").await; // installs the recorder
    let mut op = server.ws("ann").await;
    send(&mut op, json!({"type": "join", "room": "dev"})).await;
    let joined = recv_type(&mut op, "joined").await;
    assert_eq!(joined["ops"], json!(["ann"]), "{joined}");

    let mut bob = LineClient::connect(server.chat).await;
    bob.send("/nick bob").await;
    bob.send("/join dev").await;
    bob.until("-- joined #dev").await;
    recv_type(&mut op, "presence").await;

    send(
        &mut op,
        json!({"type": "kick", "room": "dev", "nick": "bob", "reason": "spam"}),
    )
    .await;
    let n = recv_type(&mut op, "message").await;
    assert_eq!(
        (n["kind"].as_str(), n["text"].as_str()),
        (Some("notice"), Some("ann kicked bob from #dev (spam)"))
    );
    bob.until("#dev -- ann kicked bob from #dev (spam)").await;
    bob.until("-- you left #dev").await;
    assert!(
        bob.until("ERR kicked")
            .await
            .contains("you were kicked from #dev")
    );
    // Bob is only a member no more: his next line goes nowhere.
    bob.send("still here?").await;
    bob.until("ERR bad_command: you are in no room").await;

    // A non-operator's attempt is refused with a clear error.
    bob.send("/join dev").await;
    bob.until("-- joined #dev").await;
    bob.send("/kick ann").await;
    assert!(
        bob.until("ERR not_operator")
            .await
            .contains("not an operator of #dev"),
    );

    send(
        &mut op,
        json!({"type": "ban", "room": "dev", "nick": "bob", "duration": "1h", "address": true}),
    )
    .await;
    bob.until("-- ann banned bob from #dev for 1h").await;
    bob.until("ERR kicked").await;
    bob.send("/join dev").await;
    assert!(
        bob.until("ERR banned")
            .await
            .contains("you are banned from #dev")
    );
    // A new connection under another nick, from the same (loopback) address.
    let mut again = LineClient::connect(server.chat).await;
    again.send("/nick robert").await;
    again.send("/join dev").await;
    again.until("ERR banned").await;

    send(
        &mut op,
        json!({"type": "mode", "room": "dev", "mode": "+mi"}),
    )
    .await;
    loop {
        let m = recv_type(&mut op, "modes").await;
        if m["moderated"] == json!(true) {
            break;
        }
    }
    let (_, rooms) = server.get("/api/rooms").await;
    let rooms: serde_json::Value = serde_json::from_str(&rooms).unwrap();
    assert_eq!(rooms["rooms"][0]["invite_only"], json!(true), "{rooms}");
    assert_eq!(rooms["rooms"][0]["moderated"], json!(true), "{rooms}");

    let (_, metrics) = server.get("/metrics").await;
    let value = |name: &str| chat_util::metric(&metrics, name);
    assert!(value("netkit_chat_kicks_total") >= 1.0, "{metrics}");
    assert!(value("netkit_chat_bans_total") >= 1.0, "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn a_line_user_ignores_a_nick() {
    let server = Server::start(HubConfig::default(), ConnConfig::default()).await;
    let mut ann = LineClient::connect(server.chat).await;
    ann.send("/nick ann").await;
    ann.send("/join dev").await;
    ann.until("-- joined #dev").await;
    let mut pest = server.ws("pest").await;
    send(&mut pest, json!({"type": "join", "room": "dev"})).await;
    recv_type(&mut pest, "joined").await;
    ann.send("/ignore PEST").await;
    ann.until("-- ignoring PEST").await;
    send(
        &mut pest,
        json!({"type": "say", "room": "dev", "text": "buy now"}),
    )
    .await;
    send(
        &mut pest,
        json!({"type": "msg", "to": "ann", "text": "psst"}),
    )
    .await;
    recv_type(&mut pest, "direct").await;
    ann.send("/unignore pest").await;
    ann.until("-- no longer ignoring pest").await;
    send(
        &mut pest,
        json!({"type": "say", "room": "dev", "text": "hello again"}),
    )
    .await;
    // The next line from pest is the one after /unignore: the others were hidden.
    let l = ann.until("<pest>").await;
    assert!(l.ends_with("<pest> hello again"), "{l}");
    server.stop().await;
}

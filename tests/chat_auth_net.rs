//! Chat identity over real sockets: under `--chat-auth required` a line
//! user and a WebSocket user register and talk; a page's session token logs
//! it in again; guessed passwords are slowed and counted in `/metrics`.

mod chat_util;
mod ws_util;

use chat_util::{LineClient, Server};
use netkit::chat::ConnConfig;
use netkit::chat::auth::{AuthConfig, AuthMode};
use netkit::chat::hub::HubConfig;
use serde_json::json;
use ws_util::{recv_type, send};

async fn required_server() -> Server {
    let cfg = HubConfig {
        auth: AuthConfig {
            mode: AuthMode::Required,
            ..AuthConfig::default()
        },
        ..HubConfig::default()
    };
    Server::start(cfg, ConnConfig::default()).await
}

#[tokio::test]
async fn a_line_user_and_a_page_user_log_in_and_talk_under_required() {
    let server = required_server().await;
    let mut line = LineClient::connect(server.chat).await;
    line.send("/join lobby").await;
    assert!(line.until("ERR").await.contains("login_required"));
    line.send("/nick lina").await;
    line.send("/register lina's password").await;
    let l = line.until("logged in").await;
    assert_eq!(l, "-- logged in as lina (by password)");
    line.send("/join lobby").await;
    line.until("-- joined #lobby").await;

    let mut ws = server.ws("wes").await;
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(recv_type(&mut ws, "error").await["code"], "login_required");
    send(
        &mut ws,
        json!({"type": "register", "password": "wes's password"}),
    )
    .await;
    let li = recv_type(&mut ws, "logged_in").await;
    assert_eq!(li["nick"], "wes");
    let token = li["session"].as_str().unwrap().to_string();
    assert!(li["expires"].as_i64().unwrap() > 0);
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    recv_type(&mut ws, "joined").await;
    send(
        &mut ws,
        json!({"type": "say", "room": "lobby", "text": "hello lina"}),
    )
    .await;
    assert!(line.until("hello lina").await.contains("<wes> hello lina"));
    drop(ws);

    // The page comes back with its session token, not the password.
    let mut again = server.ws("guest1").await;
    send(&mut again, json!({"type": "login", "session": token})).await;
    let li = recv_type(&mut again, "logged_in").await;
    assert_eq!(
        (li["nick"].as_str(), li["via"].as_str()),
        (Some("wes"), Some("session"))
    );
    send(&mut again, json!({"type": "join", "room": "lobby"})).await;
    recv_type(&mut again, "joined").await;
    server.stop().await;
}

#[tokio::test]
async fn guessed_passwords_are_slowed_and_counted() {
    let server = required_server().await;
    let _ = server.get("/metrics").await; // installs the recorder
    let mut owner = LineClient::connect(server.chat).await;
    owner.send("/nick vic").await;
    owner.send("/register vic's password").await;
    owner.until("logged in").await;

    let mut guesser = LineClient::connect(server.chat).await;
    let (mut failed, mut throttled) = (0, 0);
    for i in 0..12 {
        guesser.send(&format!("/login vic guess{i}")).await;
        let l = guesser.until("ERR").await;
        if l.contains("login_failed") {
            failed += 1;
        } else if l.contains("login_throttled") {
            throttled += 1;
        } else {
            panic!("{l}");
        }
    }
    // Five guesses a minute per account; the others are refused unchecked.
    assert_eq!((failed, throttled), (5, 7));
    // Even the right password waits now: the account is being guessed at.
    guesser.send("/login vic vic's password").await;
    assert!(guesser.until("ERR").await.contains("login_throttled"));
    let (_, metrics) = server.get("/metrics").await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("netkit_chat_login_failures_total") >= 5.0,
        "{metrics}"
    );
    assert!(
        value("netkit_chat_logins_throttled_total") >= 8.0,
        "{metrics}"
    );
    assert!(value("netkit_chat_logins_total") >= 1.0, "{metrics}");
    server.stop().await;
}

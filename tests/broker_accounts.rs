//! Broker mode: accounts registered on one hub log in on every hub, through
//! a real nats-server (JetStream on a loopback port, its own store dir).
//! Skipped, with a message, only where nats-server is not installed.

mod broker_util;
mod chat_util;
mod proc_util;
mod ws_util;

use broker_util::{Node, nats_on_fresh_store, stop_all};
use chat_util::T;
use netkit::chat::auth::{AuthConfig, AuthMode};
use netkit::chat::hub::{Hub, HubConfig, HubError};
use netkit::cluster::broker::BrokerArgs;

/// Settings with accounts (`--chat-auth accounts`).
fn with_accounts() -> HubConfig {
    HubConfig {
        auth: AuthConfig {
            mode: AuthMode::Accounts,
            ..AuthConfig::default()
        },
        ..HubConfig::default()
    }
}

fn broker_on(url: &str) -> BrokerArgs {
    BrokerArgs {
        broker: Some(url.to_string()),
        broker_max_per_room: 0,
        broker_replicas: 1,
    }
}

/// A hub with accounts in broker mode on `url`.
async fn hub(url: &str) -> Node {
    Node::start_configured(broker_on(url), with_accounts()).await
}

/// Publishes `payload` on `subject` straight to the engine (as something
/// that is not a hub would) and waits until the stream stored it.
async fn stored(js: &async_nats::jetstream::Context, subject: String, payload: String) {
    js.publish(subject, payload.into_bytes().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_registered_before_broker_mode_are_shared_when_it_starts() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    // A hub on its own registers two accounts, and stops.
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = Hub::open(dir.path(), with_accounts()).unwrap();
        for nick in ["elder", "shared"] {
            let (mut s, _i) = hub.connect(Some(nick)).unwrap();
            s.register(format!("{nick}'s old password")).await.unwrap();
        }
        hub.shutdown();
        drop(hub);
        drop(writer);
    }
    // Meanwhile another hub registered "shared" in the cluster.
    let other = hub(&nats.url()).await;
    let (mut s, _i) = other.hub.connect(Some("shared")).unwrap();
    s.register("the cluster's password".into()).await.unwrap();
    // The old hub joins in broker mode on its data dir: its "elder" is
    // shared, its "shared" stays its own (the cluster's stands elsewhere).
    let old = Node::start_in(dir, broker_on(&nats.url()), with_accounts()).await;
    registered(&other.hub, "elder").await;
    let (mut e, _i) = other.hub.connect(None).unwrap();
    e.login("elder", "elder's old password".into())
        .await
        .unwrap();
    let (mut on_other, _i) = other.hub.connect(None).unwrap();
    assert_eq!(
        on_other
            .login("shared", "shared's old password".into())
            .await,
        Err(HubError::LoginFailed)
    );
    let (mut on_old, _i) = old.hub.connect(None).unwrap();
    on_old
        .login("shared", "shared's old password".into())
        .await
        .unwrap();
    stop_all([other, old], nats).await;
}

/// Waits until `hub` holds `nick` as registered.
async fn registered(hub: &Hub, nick: &str) {
    let mut changed = hub.accounts_changed();
    tokio::time::timeout(T, changed.wait_for(|_| hub.is_registered(nick)))
        .await
        .unwrap_or_else(|_| panic!("'{nick}' never registered on this hub"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_registered_on_one_hub_logs_in_on_every_hub() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (hub(&nats.url()).await, hub(&nats.url()).await);
    let (mut alice, _inbox) = a.hub.connect(Some("alice")).unwrap();
    alice.register("alice's password".into()).await.unwrap();
    assert!(alice.logged_in());

    registered(&b.hub, "alice").await;
    // Her nick is hers on b too: a guest cannot take it, nor a look-alike.
    let (guest, _g) = b.hub.connect(None).unwrap();
    assert_eq!(
        guest.set_nick("alice"),
        Err(HubError::NickRegistered("alice".into()))
    );
    assert!(matches!(
        guest.set_nick("ALICE"),
        Err(HubError::NickRegistered(_))
    ));
    // Her password works on b, a wrong one does not.
    let (mut other, _o) = b.hub.connect(None).unwrap();
    assert_eq!(
        other.login("alice", "not her password".into()).await,
        Err(HubError::LoginFailed)
    );
    let (mut her, _h) = b.hub.connect(None).unwrap();
    her.login("alice", "alice's password".into()).await.unwrap();
    assert_eq!(her.nick(), "alice");
    // Registering it again on b is refused.
    assert!(matches!(
        her.register("another password".into()).await,
        Err(HubError::CannotRegister(_))
    ));

    // A hub that starts later has it too.
    let c = hub(&nats.url()).await;
    registered(&c.hub, "alice").await;
    let (mut on_c, _c) = c.hub.connect(None).unwrap();
    on_c.login("alice", "alice's password".into())
        .await
        .unwrap();
    stop_all([a, b, c], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_nick_registered_on_two_hubs_at_once_is_one_account() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (hub(&nats.url()).await, hub(&nats.url()).await);
    for round in 0..5 {
        let nick = format!("racer{round}");
        let (mut on_a, _ia) = a.hub.connect(Some(&nick)).unwrap();
        let (mut on_b, _ib) = b.hub.connect(Some(&nick)).unwrap();
        let (ra, rb) = tokio::join!(
            on_a.register("password of a".into()),
            on_b.register("password of b".into())
        );
        let winner = match (&ra, &rb) {
            (Ok(()), Err(HubError::CannotRegister(_))) => "password of a",
            (Err(HubError::CannotRegister(_)), Ok(())) => "password of b",
            other => panic!("round {round}: exactly one registration stands, got {other:?}"),
        };
        let loser = if winner == "password of a" {
            "password of b"
        } else {
            "password of a"
        };
        for node in [&a, &b] {
            registered(&node.hub, &nick).await;
            let (mut s, _i) = node.hub.connect(None).unwrap();
            assert_eq!(
                s.login(&nick, loser.into()).await,
                Err(HubError::LoginFailed),
                "round {round}: the refused password logs in nowhere"
            );
            let (mut s, _i) = node.hub.connect(None).unwrap();
            s.login(&nick, winner.into()).await.unwrap();
        }
    }
    stop_all([a, b], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_entries_that_are_not_a_hubs_are_skipped() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let a = hub(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let good_hash = {
        // A real argon2id hash, made by a hub, to put under wrong subjects.
        let (mut s, _i) = a.hub.connect(Some("source")).unwrap();
        s.register("a fine password".into()).await.unwrap();
        let rec = a.hub.local_accounts().await.unwrap();
        rec.into_iter()
            .find(|r| r.nick == "source")
            .unwrap()
            .password
    };
    let huge = "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
    let bcrypt = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";
    // Each under a subject of its own (the stream keeps one entry per key).
    let entries: Vec<(&str, String)> = vec![
        ("mallory1", "not json".into()),
        ("mallory2", r#"{"nick":"mallory2"}"#.into()),
        // A good record under another nick's subject.
        (
            "mallory3",
            format!(r#"{{"nick":"victim","password":"{good_hash}","created_ms":1}}"#),
        ),
        // Hashes a hub never makes.
        (
            "mallory4",
            format!(r#"{{"nick":"mallory4","password":"{huge}","created_ms":1}}"#),
        ),
        (
            "mallory5",
            format!(r#"{{"nick":"mallory5","password":"{bcrypt}","created_ms":1}}"#),
        ),
        (
            "bad nick!",
            format!(r#"{{"nick":"bad nick!","password":"{good_hash}","created_ms":1}}"#),
        ),
    ];
    for (nick, payload) in entries {
        stored(
            &js,
            netkit::cluster::broker::wire::account_subject(nick),
            payload,
        )
        .await;
    }
    // An account cannot be replaced: the stream refuses a second entry for
    // a key even without the claim's expected sequence.
    let replaced = js
        .publish(
            netkit::cluster::broker::wire::account_subject("source"),
            format!(r#"{{"nick":"source","password":"{good_hash}","created_ms":2}}"#)
                .into_bytes()
                .into(),
        )
        .await
        .unwrap()
        .await;
    assert!(
        replaced.is_err(),
        "a second entry for an account was stored"
    );
    // After all of them, one a hub makes: once it is applied, so were they.
    let b = hub(&nats.url()).await;
    let (mut late, _i) = b.hub.connect(Some("late")).unwrap();
    late.register("late's password".into()).await.unwrap();
    registered(&a.hub, "late").await;
    for nick in [
        "mallory1",
        "mallory2",
        "mallory3",
        "victim",
        "mallory4",
        "mallory5",
        "bad nick!",
    ] {
        assert!(!a.hub.is_registered(nick), "{nick} was stored");
        assert!(!b.hub.is_registered(nick), "{nick} was stored");
    }
    assert!(b.hub.is_registered("source"));
    stop_all([a, b], nats).await;
}

/// The session token in the `logged_in` reply waiting in `inbox`.
async fn session_token(inbox: &mut netkit::chat::hub::Inbox) -> String {
    use netkit::chat::hub::Received;
    use netkit::chat::protocol::ServerMsg;
    loop {
        match tokio::time::timeout(T, inbox.recv())
            .await
            .expect("logged_in")
        {
            Received::Event(ev) => {
                if let ServerMsg::LoggedIn {
                    session: Some(s), ..
                } = &ev.msg
                {
                    return s.clone();
                }
            }
            other => panic!("client gone: {other:?}"),
        }
    }
}

fn by_session(token: &str) -> netkit::chat::protocol::ClientMsg {
    netkit::chat::protocol::ClientMsg::Login {
        nick: None,
        password: None,
        session: Some(token.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_session_from_one_hub_logs_in_on_every_hub_until_logout() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (hub(&nats.url()).await, hub(&nats.url()).await);
    let mut sessions_b = b.hub.sessions_changed();
    let (mut alice, mut inbox) = a.hub.connect(Some("alice")).unwrap();
    alice.register("alice's password".into()).await.unwrap();
    let token = session_token(&mut inbox).await;
    registered(&b.hub, "alice").await;
    // Her page reconnects to b with the token a gave it.
    tokio::time::timeout(T, sessions_b.changed())
        .await
        .unwrap()
        .unwrap();
    let (mut page, _page_inbox) = b.hub.connect(None).unwrap();
    page.handle(by_session(&token)).await.unwrap();
    assert_eq!(page.nick(), "alice");
    // A forged secret under her selector is refused on b.
    let (sel, _) = token.split_once('.').unwrap();
    let (mut forger, _f) = b.hub.connect(None).unwrap();
    assert!(matches!(
        forger
            .handle(by_session(&format!(
                "{sel}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            )))
            .await,
        Err(HubError::BadToken(_))
    ));
    // A password login on b gives a token a takes too.
    let mut sessions_a = a.hub.sessions_changed();
    let (mut on_b, mut on_b_inbox) = b.hub.connect(None).unwrap();
    on_b.login("alice", "alice's password".into())
        .await
        .unwrap();
    let second = session_token(&mut on_b_inbox).await;
    let mut seen = *sessions_a.borrow_and_update();
    let (mut back_on_a, _x) = a.hub.connect(None).unwrap();
    loop {
        // The session may be the second change a sees (its own comes back first).
        if back_on_a.handle(by_session(&second)).await.is_ok() {
            break;
        }
        tokio::time::timeout(T, sessions_a.wait_for(|v| *v > seen))
            .await
            .expect("b's session reaches a")
            .unwrap();
        seen = *sessions_a.borrow_and_update();
    }
    assert_eq!(back_on_a.nick(), "alice");
    // Logging out on b ends the first token on a as well.
    page.handle(netkit::chat::protocol::ClientMsg::Logout {
        session: token.clone(),
    })
    .await
    .unwrap();
    let (mut later, _l) = a.hub.connect(None).unwrap();
    loop {
        match later.handle(by_session(&token)).await {
            Err(HubError::BadToken(_)) => break,
            Ok(()) => {
                let (fresh, _f) = a.hub.connect(None).unwrap();
                later = fresh;
                tokio::time::timeout(T, sessions_a.wait_for(|v| *v > seen))
                    .await
                    .expect("the logout reaches a")
                    .unwrap();
                seen = *sessions_a.borrow_and_update();
            }
            Err(e) => panic!("{e}"),
        }
    }
    stop_all([a, b], nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_entries_that_are_not_a_hubs_are_skipped() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let a = hub(&nats.url()).await;
    let mut changed = a.hub.sessions_changed();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let sel = "AAAAAAAAAAAAAAAA";
    let v32 = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"; // 32 bytes, base64url
    // A day ahead: within bounds, so each entry below fails for its own flaw.
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 86_400_000;
    let bad: Vec<(String, String)> = vec![
        (sel.into(), "not json".into()),
        // Under another selector's subject.
        (
            "BBBBBBBBBBBBBBBB".into(),
            format!(
                r#"{{"selector":"{sel}","account":"alice","verifier":"{v32}","expires_ms":{far}}}"#
            ),
        ),
        // A short verifier, an empty account, 400 days ahead.
        (
            "CCCCCCCCCCCCCCCC".into(),
            format!(
                r#"{{"selector":"CCCCCCCCCCCCCCCC","account":"alice","verifier":"AAAA","expires_ms":{far}}}"#
            ),
        ),
        (
            "DDDDDDDDDDDDDDDD".into(),
            format!(
                r#"{{"selector":"DDDDDDDDDDDDDDDD","account":"","verifier":"{v32}","expires_ms":{far}}}"#
            ),
        ),
        (
            "EEEEEEEEEEEEEEEE".into(),
            format!(
                r#"{{"selector":"EEEEEEEEEEEEEEEE","account":"alice","verifier":"{v32}","expires_ms":{}}}"#,
                far + 400 * 86_400_000
            ),
        ),
    ];
    for (selector, payload) in bad {
        stored(
            &js,
            netkit::cluster::broker::wire::session_subject(&selector),
            payload,
        )
        .await;
    }
    // Then a real one: once it is applied, the others were read (and none applied).
    let (mut alice, mut inbox) = a.hub.connect(Some("alice")).unwrap();
    alice.register("alice's password".into()).await.unwrap();
    let _ = session_token(&mut inbox).await;
    tokio::time::timeout(T, changed.wait_for(|v| *v >= 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*changed.borrow(), 1, "only the real session was applied");
    stop_all([a], nats).await;
}

/// How long the sessions stream keeps its entries.
async fn sessions_kept(js: &async_nats::jetstream::Context) -> std::time::Duration {
    let mut s = js.get_stream("NETKIT_SESSIONS").await.unwrap();
    s.info().await.unwrap().config.max_age
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_stream_keeps_entries_as_long_as_the_longest_session_of_the_hubs() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let day = std::time::Duration::from_secs(24 * 3600);
    let with_ttl = |ttl| {
        let mut cfg = with_accounts();
        cfg.auth.session_ttl = ttl;
        cfg
    };
    // The first hub makes the stream for its one-hour sessions.
    let a = Node::start_configured(broker_on(&nats.url()), with_ttl(day / 24)).await;
    assert_eq!(sessions_kept(&js).await, day / 24 + day);
    // A hub with 30-day sessions raises it, or its sessions would leave
    // the stream after a day and an hour.
    let b = Node::start_configured(broker_on(&nats.url()), with_ttl(30 * day)).await;
    assert_eq!(sessions_kept(&js).await, 31 * day);
    // A later hub with short sessions does not cut it down.
    let c = Node::start_configured(broker_on(&nats.url()), with_ttl(day / 24)).await;
    assert_eq!(sessions_kept(&js).await, 31 * day);
    stop_all([a, b, c], nats).await;
}

//! Chat identity without sockets: registration, login, a registered nick
//! kept from others, a guest renamed when the owner logs in, `required`
//! mode, session tokens, the login limit, and application tokens (JWT).

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use netkit::chat::auth::{AuthConfig, AuthMode, TokenVerifier};
use netkit::chat::hub::{Hub, HubConfig, HubError, Inbox, Session};
use netkit::chat::protocol::{ClientMsg, ServerMsg};

struct TestHub {
    hub: Hub,
    _dir: tempfile::TempDir,
}

fn hub_with(mode: AuthMode, tokens: Option<TokenVerifier>) -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        rate: 0.0,
        auth: AuthConfig {
            mode,
            tokens: tokens.map(Arc::new),
            ..AuthConfig::default()
        },
        ..HubConfig::default()
    };
    let (hub, _writer) = Hub::open(dir.path(), cfg).unwrap();
    TestHub { hub, _dir: dir }
}

async fn until<T>(inbox: &mut Inbox, mut f: impl FnMut(&ServerMsg) -> Option<T>) -> T {
    let wait = async {
        loop {
            if let netkit::chat::hub::Received::Event(ev) = inbox.recv().await {
                if let Some(v) = f(&ev.msg) {
                    return v;
                }
            } else {
                panic!("inbox closed");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("message in time")
}

fn connect(hub: &Hub, nick: &str) -> (Session, Inbox) {
    let (s, i) = hub.connect(Some(nick)).unwrap();
    assert_eq!(s.nick(), nick);
    (s, i)
}

fn login(nick: &str, password: &str) -> ClientMsg {
    ClientMsg::Login {
        nick: Some(nick.into()),
        password: Some(password.into()),
        session: None,
    }
}

async fn logged_in(inbox: &mut Inbox) -> (String, Option<String>) {
    until(inbox, |m| match m {
        ServerMsg::LoggedIn { nick, session, .. } => Some((nick.clone(), session.clone())),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn register_then_the_nick_is_kept_for_its_owner() {
    let t = hub_with(AuthMode::Accounts, None);
    let (mut alice, mut ai) = connect(&t.hub, "alice");
    alice
        .handle(ClientMsg::Register {
            password: "correct horse".into(),
        })
        .await
        .unwrap();
    let (nick, session) = logged_in(&mut ai).await;
    assert_eq!(nick, "alice");
    assert!(session.is_some_and(|s| !s.contains("correct horse")));
    // Registering it again, a guest name, or a short password are refused.
    assert!(matches!(
        alice.register("another one".into()).await,
        Err(HubError::CannotRegister(_))
    ));
    let (mut guest, _gi) = t.hub.connect(None).unwrap();
    assert!(matches!(
        guest.register("long enough".into()).await,
        Err(HubError::CannotRegister(_))
    ));
    let (mut bob, _bi) = connect(&t.hub, "bob");
    assert!(matches!(
        bob.register("short".into()).await,
        Err(HubError::CannotRegister(_))
    ));
    drop(alice);
    // Alice has gone: nobody else may take her nick, nor one like it.
    for name in ["alice", "ALICE", "Alice"] {
        assert_eq!(
            bob.set_nick(name),
            Err(HubError::NickRegistered(name.into())),
            "{name}"
        );
    }
    let (_x, mut xi) = t.hub.connect(Some("Alice")).unwrap();
    let code = until(&mut xi, |m| match m {
        ServerMsg::Error { code, .. } => Some(code.clone()),
        _ => None,
    })
    .await;
    assert_eq!(code, "nick_registered");
    // Logging in as her gives it back, whatever the case typed.
    bob.handle(login("ALICE", "correct horse")).await.unwrap();
    assert_eq!(bob.nick(), "alice");
}

#[tokio::test]
async fn a_guest_holding_the_nick_is_renamed_when_the_owner_logs_in() {
    let t = hub_with(AuthMode::Accounts, None);
    let (mut ann, mut ai) = connect(&t.hub, "ann");
    ann.register("ann's password".into()).await.unwrap();
    logged_in(&mut ai).await;
    drop(ann);
    // Ann logs in on one connection, then on another: the first holder
    // (whoever it is) gives the nick up and becomes a guest.
    let (mut first, mut fi) = t.hub.connect(None).unwrap();
    first.handle(login("ann", "ann's password")).await.unwrap();
    assert_eq!(logged_in(&mut fi).await.0, "ann");
    let (mut second, mut si) = t.hub.connect(None).unwrap();
    second.handle(login("ann", "ann's password")).await.unwrap();
    assert_eq!(logged_in(&mut si).await.0, "ann");
    let renamed = until(&mut fi, |m| match m {
        ServerMsg::Nick { old, new, .. } if old == "ann" => Some(new.clone()),
        _ => None,
    })
    .await;
    assert!(renamed.starts_with("guest-"), "{renamed}");
    assert_eq!(first.nick(), renamed);
    assert_eq!(second.nick(), "ann");
}

#[tokio::test]
async fn an_unregistered_holder_is_renamed_when_a_token_user_logs_in() {
    let secret = [7u8; 32];
    let t = hub_with(
        AuthMode::Accounts,
        Some(TokenVerifier::from_secret(&secret).unwrap()),
    );
    let (guest, mut gi) = connect(&t.hub, "dave");
    let (mut owner, mut oi) = t.hub.connect(None).unwrap();
    owner
        .handle(ClientMsg::Auth {
            token: hs256(&secret, "dave", None, 0),
        })
        .await
        .unwrap();
    assert_eq!(logged_in(&mut oi).await.0, "dave");
    let why = until(&mut gi, |m| match m {
        ServerMsg::Error { code, message } if code == "nick_registered" => Some(message.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("'dave' logged in"), "{why}");
    assert!(guest.nick().starts_with("guest-"));
    assert_eq!(owner.nick(), "dave");
}

#[tokio::test]
async fn a_wrong_password_or_unknown_account_fails_the_same_way() {
    let t = hub_with(AuthMode::Accounts, None);
    let (mut ann, _ai) = connect(&t.hub, "ann");
    ann.register("ann's password".into()).await.unwrap();
    let (mut eve, _ei) = connect(&t.hub, "eve");
    assert_eq!(
        eve.handle(login("ann", "guess one")).await,
        Err(HubError::LoginFailed)
    );
    assert_eq!(
        eve.handle(login("nobody", "guess one")).await,
        Err(HubError::LoginFailed)
    );
    assert_eq!(eve.nick(), "eve");
    assert!(!eve.logged_in());
}

#[tokio::test]
async fn a_session_token_logs_in_again_without_the_password() {
    let t = hub_with(AuthMode::Accounts, None);
    let (mut ann, mut ai) = connect(&t.hub, "ann");
    ann.register("ann's password".into()).await.unwrap();
    let (_, session) = logged_in(&mut ai).await;
    let session = session.unwrap();
    drop(ann);
    let (mut again, mut gi) = t.hub.connect(None).unwrap();
    again
        .handle(ClientMsg::Login {
            nick: None,
            password: None,
            session: Some(session.clone()),
        })
        .await
        .unwrap();
    assert_eq!(logged_in(&mut gi).await.0, "ann");
    // A forged one, and one logged out, are refused.
    let (sel, _) = session.split_once('.').unwrap();
    let (mut other, _oi) = t.hub.connect(None).unwrap();
    let forged = ClientMsg::Login {
        nick: None,
        password: None,
        session: Some(format!("{sel}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
    };
    assert!(matches!(
        other.handle(forged).await,
        Err(HubError::BadToken(_))
    ));
    again
        .handle(ClientMsg::Logout {
            session: session.clone(),
        })
        .await
        .unwrap();
    let reuse = ClientMsg::Login {
        nick: None,
        password: None,
        session: Some(session),
    };
    assert!(matches!(
        other.handle(reuse).await,
        Err(HubError::BadToken(_))
    ));
}

#[tokio::test]
async fn required_mode_accepts_nothing_but_identification_before_login() {
    let t = hub_with(AuthMode::Required, None);
    let (mut s, mut i) = t.hub.connect(None).unwrap();
    let join = ClientMsg::Join {
        room: "lobby".into(),
        after: None,
        since: None,
    };
    assert_eq!(s.handle(join.clone()).await, Err(HubError::LoginRequired));
    assert_eq!(
        s.handle(ClientMsg::Msg {
            to: "x".into(),
            text: "hi".into()
        })
        .await,
        Err(HubError::LoginRequired)
    );
    assert_eq!(
        s.handle(ClientMsg::Rooms).await,
        Err(HubError::LoginRequired)
    );
    // A nick to register is the one thing besides identifying.
    s.handle(ClientMsg::Nick { nick: "zed".into() })
        .await
        .unwrap();
    s.handle(ClientMsg::Register {
        password: "zed's password".into(),
    })
    .await
    .unwrap();
    logged_in(&mut i).await;
    s.handle(join).await.unwrap();
    until(&mut i, |m| {
        matches!(m, ServerMsg::Joined { .. }).then_some(())
    })
    .await;
}

#[tokio::test]
async fn accounts_are_off_in_open_mode() {
    let t = hub_with(AuthMode::Open, None);
    let (mut s, _i) = connect(&t.hub, "ann");
    assert!(matches!(
        s.handle(ClientMsg::Register {
            password: "long enough".into()
        })
        .await,
        Err(HubError::AuthDisabled(_))
    ));
    assert!(matches!(
        s.handle(ClientMsg::Auth { token: "x".into() }).await,
        Err(HubError::AuthDisabled(_))
    ));
}

#[tokio::test]
async fn login_attempts_are_slowed_per_account() {
    let t = hub_with(AuthMode::Accounts, None);
    let (mut ann, _ai) = connect(&t.hub, "ann");
    ann.register("ann's password".into()).await.unwrap();
    let (mut eve, _ei) = connect(&t.hub, "eve");
    // Five guesses a minute (the default); the sixth waits about 12 s.
    for _ in 0..5 {
        assert_eq!(
            eve.handle(login("ann", "guess")).await,
            Err(HubError::LoginFailed)
        );
    }
    match eve.handle(login("ann", "ann's password")).await {
        Err(HubError::LoginThrottled(s)) => assert!((1..=12).contains(&s), "{s}"),
        other => panic!("{other:?}"),
    }
}

// Application tokens

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, rooms: Option<&[&str]>, nbf_ahead: u64) -> serde_json::Value {
    let mut c = serde_json::json!({ "sub": sub, "exp": now() + 600 });
    if let Some(r) = rooms {
        c["rooms"] = serde_json::json!(r);
    }
    if nbf_ahead > 0 {
        c["nbf"] = serde_json::json!(now() + nbf_ahead);
    }
    c
}

fn hs256(secret: &[u8], sub: &str, rooms: Option<&[&str]>, nbf_ahead: u64) -> String {
    hs256_claims(secret, claims(sub, rooms, nbf_ahead))
}

/// A JWT of `claims` signed with `secret` by HS256.
fn hs256_claims(secret: &[u8], claims: serde_json::Value) -> String {
    sign(
        Algorithm::HS256,
        &claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
}

/// A JWT of `claims` signed with `key` by `alg`.
fn sign(alg: Algorithm, claims: &serde_json::Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Why `token` is refused by `v` (panics if it is accepted).
fn refusal(v: &TokenVerifier, token: &str) -> String {
    v.verify(token).expect_err("token refused")
}

#[test]
fn hs256_tokens_valid_expired_early_forged_and_unsigned() {
    let secret = b"an application secret of 32 bytes+";
    let v = TokenVerifier::from_secret(secret).unwrap();
    let ok = v.verify(&hs256(secret, "ann", None, 0)).unwrap();
    assert_eq!(ok.sub, "ann");
    let expired = hs256_claims(
        secret,
        serde_json::json!({"sub": "ann", "exp": now() - 300}),
    );
    assert!(refusal(&v, &expired).contains("expired"));
    assert!(refusal(&v, &hs256(secret, "ann", None, 300)).contains("not valid yet"));
    let forged = hs256(b"another secret, also 32 bytes long", "ann", None, 0);
    assert!(refusal(&v, &forged).contains("signature does not match"));
    let none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("ann", None, 0))
    );
    assert!(refusal(&v, &none).contains("alg \"none\""));
    let no_exp = hs256_claims(secret, serde_json::json!({"sub": "ann"}));
    assert!(refusal(&v, &no_exp).contains("'exp'"));
    assert!(refusal(&v, "not a token").contains("malformed"));
    assert!(TokenVerifier::from_secret(b"short").is_err());
}

#[test]
fn rs256_and_eddsa_keys_refuse_hs256_made_with_the_public_key() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::{Generate, PrivateKey};
    let private = PrivateKey::generate();
    let private_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let v = TokenVerifier::from_public_pem(public_pem.as_bytes()).unwrap();
    assert_eq!(v.algorithm(), Algorithm::RS256);
    let signer = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let good = sign(Algorithm::RS256, &claims("ann", None, 0), &signer);
    assert_eq!(v.verify(&good).unwrap().sub, "ann");
    // The classic confusion: HS256 with the public key as the shared secret.
    let confused = hs256(public_pem.as_bytes(), "ann", None, 0);
    assert!(refusal(&v, &confused).contains("signed with HS256"));
    // And the other way: an RS256 token at a server that takes HS256.
    let hs = TokenVerifier::from_secret(&[1u8; 32]).unwrap();
    assert!(refusal(&hs, &good).contains("accepts HS256 only"));

    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let v = TokenVerifier::from_public_pem(ed.public_key_pem().as_bytes()).unwrap();
    assert_eq!(v.algorithm(), Algorithm::EdDSA);
    let signer = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let good = sign(Algorithm::EdDSA, &claims("bo", None, 0), &signer);
    assert_eq!(v.verify(&good).unwrap().sub, "bo");
    let confused = hs256(ed.public_key_pem().as_bytes(), "bo", None, 0);
    assert!(refusal(&v, &confused).contains("signed with HS256"));
    assert!(TokenVerifier::from_public_pem(b"-----BEGIN NOTHING-----").is_err());
}

#[tokio::test]
async fn a_rooms_claim_limits_joins() {
    let secret = [9u8; 32];
    let t = hub_with(
        AuthMode::Required,
        Some(TokenVerifier::from_secret(&secret).unwrap()),
    );
    let (mut s, mut i) = t.hub.connect(None).unwrap();
    s.handle(ClientMsg::Auth {
        token: hs256(&secret, "kim", Some(&["support"]), 0),
    })
    .await
    .unwrap();
    assert_eq!(logged_in(&mut i).await.0, "kim");
    assert_eq!(
        s.join("random", None).await,
        Err(HubError::RoomNotAllowed("random".into()))
    );
    s.join("support", None).await.unwrap();
    until(&mut i, |m| {
        matches!(m, ServerMsg::Joined { .. }).then_some(())
    })
    .await;
    // A refused token leaves a required-mode client unable to do anything.
    let (mut bad, _bi) = t.hub.connect(None).unwrap();
    let expired = hs256_claims(
        &secret,
        serde_json::json!({"sub": "kim2", "exp": now() - 300}),
    );
    assert!(matches!(
        bad.handle(ClientMsg::Auth { token: expired }).await,
        Err(HubError::BadToken(m)) if m.contains("expired")
    ));
    assert_eq!(
        bad.handle(ClientMsg::Rooms).await,
        Err(HubError::LoginRequired)
    );
}

//! The real binary with `--chat-auth required` and `--chat-token-secret`:
//! an application token logs a line user in, a registered account survives
//! a restart, and a guest can do nothing before logging in.

mod proc_util;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proc_util::{LineUser, Netkit};

const SECRET: &str = "a deployment secret of 32 bytes or more";

fn serve(dir: &std::path::Path) -> Netkit {
    Netkit::serve_chat(
        dir,
        &["--chat-auth", "required", "--chat-token-secret", SECRET],
    )
}

#[test]
fn tokens_and_accounts_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve(dir.path());
    let chat = p.ready.chat.expect("chat door");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "tia", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();

    let mut guest = LineUser::connect(chat, "someone");
    guest.send("/join lobby");
    guest.wait_for("ERR login_required");
    guest.send(&format!("/token {token}"));
    guest.wait_for("-- logged in as tia (by token)");
    guest.send("/join lobby");
    guest.wait_for("-- joined #lobby");

    let mut reg = LineUser::connect(chat, "ros");
    reg.send("/register ros's password");
    reg.wait_for("-- logged in as ros (by password)");
    assert!(!p.drain_log().iter().any(|l| l.contains("ros's password")));
    drop((guest, reg));
    assert!(p.terminate().success());

    let mut p = serve(dir.path());
    let chat = p.ready.chat.expect("chat door");
    let mut back = LineUser::connect(chat, "later");
    back.send("/nick ros");
    back.wait_for("ERR nick_registered");
    back.send("/login ros ros's password");
    back.wait_for("-- logged in as ros (by password)");
    assert!(p.terminate().success());
}

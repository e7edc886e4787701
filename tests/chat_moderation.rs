//! Room moderation without sockets: the first member is operator, kicks,
//! bans by account across a nick change and a restart, mutes, `+m` with
//! voice, `+i` with invitations (an account's kept across a restart),
//! operator succession, admin powers, a non-operator refused, and the abuse
//! limits (repeated text, guests per address). One rule per test.

mod proc_util;

use std::sync::Arc;
use std::time::Duration;

use netkit::chat::auth::{AuthConfig, AuthMode, TokenVerifier};
use netkit::chat::hub::{Hub, HubConfig, HubError, HubWriter, Inbox, Received, Session};
use netkit::chat::moderation::ModerationConfig;
use netkit::chat::protocol::{ChatMessage, ClientMsg, MessageKind, ServerMsg};

const SECRET: &[u8] = b"a test secret of at least 32 bytes!!";

fn config(admins: &[&str]) -> HubConfig {
    HubConfig {
        rate: 0.0,
        auth: AuthConfig {
            mode: AuthMode::Accounts,
            tokens: Some(Arc::new(TokenVerifier::from_secret(SECRET).unwrap())),
            ..AuthConfig::default()
        },
        moderation: ModerationConfig {
            admins: admins.iter().map(|a| a.to_string()).collect(),
            ..ModerationConfig::default()
        },
        ..HubConfig::default()
    }
}

fn open(dir: &std::path::Path, cfg: HubConfig) -> (Hub, HubWriter) {
    Hub::open(dir, cfg).unwrap()
}

fn token(sub: &str) -> String {
    proc_util::hs256_token(SECRET, sub)
}

async fn until<T>(inbox: &mut Inbox, mut f: impl FnMut(&ServerMsg) -> Option<T>) -> T {
    let wait = async {
        loop {
            match inbox.recv().await {
                Received::Event(ev) => {
                    if let Some(v) = f(&ev.msg) {
                        return v;
                    }
                }
                other => panic!("inbox ended: {other:?}"),
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

/// A client logged in (by application token) as `nick`.
async fn account(hub: &Hub, nick: &str) -> (Session, Inbox) {
    let (mut s, mut i) = connect(hub, nick);
    s.handle(ClientMsg::Auth { token: token(nick) })
        .await
        .unwrap();
    until(&mut i, |m| {
        matches!(m, ServerMsg::LoggedIn { .. }).then_some(())
    })
    .await;
    (s, i)
}

/// Joins `room`; the operators present, as `joined` lists them.
async fn join(s: &mut Session, i: &mut Inbox, room: &str) -> Vec<String> {
    s.handle(ClientMsg::Join {
        room: room.into(),
        after: None,
        since: None,
    })
    .await
    .unwrap();
    until(i, |m| match m {
        ServerMsg::Joined { room: r, ops, .. } if r == room => Some(ops.clone()),
        _ => None,
    })
    .await
}

/// The operators in the next modes message of `room`.
async fn modes(i: &mut Inbox, room: &str) -> Vec<String> {
    until(i, |m| match m {
        ServerMsg::Modes { room: r, ops, .. } if r == room => Some(ops.clone()),
        _ => None,
    })
    .await
}

/// The next notice in `room`.
async fn notice(i: &mut Inbox) -> ChatMessage {
    until(i, |m| match m {
        ServerMsg::Message(msg) if msg.kind == MessageKind::Notice => Some(msg.clone()),
        _ => None,
    })
    .await
}

/// The code of the next error.
async fn error(i: &mut Inbox) -> String {
    until(i, |m| match m {
        ServerMsg::Error { code, .. } => Some(code.clone()),
        _ => None,
    })
    .await
}

fn say(room: &str, text: &str) -> ClientMsg {
    ClientMsg::Say {
        room: room.into(),
        text: text.into(),
    }
}

fn kick(room: &str, nick: &str, reason: Option<&str>) -> ClientMsg {
    ClientMsg::Kick {
        room: room.into(),
        nick: nick.into(),
        reason: reason.map(str::to_string),
    }
}

fn join_msg(room: &str) -> ClientMsg {
    ClientMsg::Join {
        room: room.into(),
        after: None,
        since: None,
    }
}

/// A hub where guest ann made `dev` (so is its operator) and guest bob joined it.
struct Room {
    _dir: tempfile::TempDir,
    hub: Hub,
    _writer: HubWriter,
    ann: Session,
    ai: Inbox,
    bob: Session,
    bi: Inbox,
}

async fn room_of_ann_and_bob() -> Room {
    let dir = tempfile::tempdir().unwrap();
    let (hub, writer) = open(dir.path(), config(&[]));
    let (mut ann, mut ai) = connect(&hub, "ann");
    assert_eq!(join(&mut ann, &mut ai, "dev").await, ["ann"]);
    let (mut bob, mut bi) = connect(&hub, "bob");
    assert_eq!(join(&mut bob, &mut bi, "dev").await, ["ann"]);
    Room {
        _dir: dir,
        hub,
        _writer: writer,
        ann,
        ai,
        bob,
        bi,
    }
}

/// A `mode` request.
fn mode(room: &str, mode: &str) -> ClientMsg {
    ClientMsg::Mode {
        room: room.into(),
        mode: mode.into(),
    }
}

#[tokio::test]
async fn the_first_member_of_a_new_room_is_its_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = open(dir.path(), config(&[]));
    let (mut ann, mut ai) = connect(&hub, "ann");
    assert_eq!(join(&mut ann, &mut ai, "dev").await, ["ann"]);
    let (mut bob, mut bi) = connect(&hub, "bob");
    assert_eq!(join(&mut bob, &mut bi, "dev").await, ["ann"]);
    // Nobody acted, so nothing is added to the history.
    assert!(hub.history("dev", None, None, 10).unwrap().is_empty());
    // Ann's powers are real.
    ann.handle(kick("dev", "bob", None)).await.unwrap();
    assert_eq!(notice(&mut bi).await.text, "ann kicked bob from #dev");
}

#[tokio::test]
async fn a_non_operator_is_refused_with_a_clear_error() {
    let Room {
        _dir,
        mut ann,
        mut bob,
        ..
    } = room_of_ann_and_bob().await;
    let e = bob.handle(kick("dev", "ann", None)).await.unwrap_err();
    assert_eq!(e, HubError::NotOperator("dev".into()));
    assert_eq!(e.code(), "not_operator");
    assert!(e.to_string().contains("not an operator of #dev"));
    for msg in [
        mode("dev", "+m"),
        ClientMsg::Op {
            room: "dev".into(),
            nick: "bob".into(),
        },
    ] {
        assert_eq!(
            bob.handle(msg).await,
            Err(HubError::NotOperator("dev".into()))
        );
    }
    let close = ClientMsg::Close {
        room: "dev".into(),
        reason: None,
    };
    // Closing a room is for admins only, even for its operator.
    assert_eq!(ann.handle(close).await, Err(HubError::NotAdmin));
}

#[tokio::test]
async fn a_kick_puts_the_member_out_with_a_notice_in_the_history() {
    let Room {
        _dir,
        hub,
        mut ann,
        mut bob,
        mut bi,
        ..
    } = room_of_ann_and_bob().await;
    ann.handle(kick("dev", "bob", Some("spam"))).await.unwrap();
    let n = notice(&mut bi).await;
    assert_eq!(n.text, "ann kicked bob from #dev (spam)");
    assert_eq!(n.from, "ann");
    until(&mut bi, |m| {
        matches!(m, ServerMsg::Parted { .. }).then_some(())
    })
    .await;
    assert_eq!(error(&mut bi).await, "kicked");
    assert!(bob.rooms().is_empty());
    // Not a member any more, so it cannot speak there, but it may come back.
    bob.handle(say("dev", "hi")).await.unwrap();
    assert_eq!(error(&mut bi).await, "not_member");
    join(&mut bob, &mut bi, "dev").await;
    let texts: Vec<String> = hub
        .history("dev", None, None, 10)
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == MessageKind::Notice)
        .map(|m| m.text)
        .collect();
    assert!(texts.contains(&"ann kicked bob from #dev (spam)".to_string()));
    // Kicking someone who is not there says so.
    ann.handle(kick("dev", "nobody", None))
        .await
        .expect_err("refused");
}

#[tokio::test]
async fn a_ban_by_account_survives_a_nick_change_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = open(dir.path(), config(&[]));
        let (mut ann, mut ai) = account(&hub, "ann").await;
        assert_eq!(join(&mut ann, &mut ai, "dev").await, ["ann"]);
        assert_eq!(
            notice(&mut ai).await.text,
            "ann is now the operator of #dev (the first to join)"
        );
        let (mut eve, mut ei) = account(&hub, "eve").await;
        join(&mut eve, &mut ei, "dev").await;
        // eve sees who holds the room in its history.
        assert_eq!(
            notice(&mut ei).await.text,
            "ann is now the operator of #dev (the first to join)"
        );
        ann.handle(ClientMsg::Ban {
            room: "dev".into(),
            nick: "eve".into(),
            duration: None,
            reason: Some("trolling".into()),
            address: false,
        })
        .await
        .unwrap();
        let n = notice(&mut ei).await;
        assert_eq!(n.text, "ann banned eve from #dev (trolling)");
        assert_eq!(error(&mut ei).await, "kicked");
        // A new nick does not help: the ban is on the account.
        eve.set_nick("evelyn").unwrap();
        let e = eve.handle(join_msg("dev")).await.unwrap_err();
        assert_eq!(e.code(), "banned");
        assert!(e.to_string().contains("trolling"), "{e}");
        drop((ann, eve, ai, ei));
        drop(hub);
        writer.join();
    }
    let (hub, _w) = open(dir.path(), config(&[]));
    let (mut eve, _ei) = account(&hub, "eve").await;
    let e = eve.handle(join_msg("dev")).await.unwrap_err();
    assert!(matches!(e, HubError::Banned(..)), "{e:?}");
    // Ann is still the room's operator (by account): she lifts the ban.
    let (mut ann, mut ai) = account(&hub, "ann").await;
    join(&mut ann, &mut ai, "dev").await;
    ann.handle(ClientMsg::Unban {
        room: "dev".into(),
        nick: "eve".into(),
    })
    .await
    .unwrap();
    let lifted = until(&mut ai, |m| match m {
        ServerMsg::Message(m) if m.text.contains("lifted") => Some(m.text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(lifted, "ann lifted the ban on eve");
    eve.handle(join_msg("dev")).await.unwrap();
}

#[tokio::test]
async fn a_ban_by_address_keeps_a_guest_out_under_another_nick() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = open(dir.path(), config(&[]));
    let addr = "192.0.2.9".parse().unwrap();
    let (mut ann, mut ai) = connect(&hub, "ann");
    join(&mut ann, &mut ai, "dev").await;
    let (mut eve, mut ei) = hub.connect_from(Some("eve"), Some(addr)).unwrap();
    join(&mut eve, &mut ei, "dev").await;
    ann.handle(ClientMsg::Ban {
        room: "dev".into(),
        nick: "eve".into(),
        duration: Some("1h".into()),
        reason: None,
        address: true,
    })
    .await
    .unwrap();
    assert_eq!(
        notice(&mut ai).await.text,
        "ann banned eve from #dev for 1h"
    );
    drop(eve);
    let (mut other, _oi) = hub.connect_from(Some("mallory"), Some(addr)).unwrap();
    let e = other.handle(join_msg("dev")).await.unwrap_err();
    assert_eq!(e.code(), "banned");
    // Another address under the banned nick's look-alike is refused too.
    let (mut same, _si) = hub.connect(Some("EVE")).unwrap();
    assert_eq!(
        same.handle(join_msg("dev")).await.unwrap_err().code(),
        "banned"
    );
}

#[tokio::test]
async fn a_muted_member_cannot_speak_until_unmuted() {
    let Room {
        _dir,
        mut ann,
        mut bob,
        mut bi,
        ..
    } = room_of_ann_and_bob().await;
    let mute = ClientMsg::Mute {
        room: "dev".into(),
        nick: "bob".into(),
        duration: Some("10m".into()),
    };
    ann.handle(mute).await.unwrap();
    assert_eq!(notice(&mut bi).await.text, "ann muted bob for 10m");
    assert_eq!(
        bob.handle(say("dev", "hello")).await,
        Err(HubError::Muted("dev".into()))
    );
    // Nor may it share a file there.
    let ticket = ClientMsg::FileTicket { room: "dev".into() };
    assert_eq!(bob.handle(ticket).await, Err(HubError::Muted("dev".into())));
    ann.handle(ClientMsg::Unmute {
        room: "dev".into(),
        nick: "bob".into(),
    })
    .await
    .unwrap();
    assert_eq!(notice(&mut bi).await.text, "ann unmuted bob");
    bob.handle(say("dev", "hello")).await.unwrap();
    let m = until(&mut bi, |m| match m {
        ServerMsg::Message(m) if m.kind == MessageKind::Say => Some(m.text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(m, "hello");
    // A bad duration is explained.
    let bad = ClientMsg::Mute {
        room: "dev".into(),
        nick: "bob".into(),
        duration: Some("forever".into()),
    };
    assert_eq!(ann.handle(bad).await.unwrap_err().code(), "bad_request");
}

#[tokio::test]
async fn a_moderated_room_lets_only_voiced_members_and_operators_speak() {
    let Room {
        _dir,
        hub,
        mut ann,
        mut bob,
        mut bi,
        ..
    } = room_of_ann_and_bob().await;
    ann.handle(mode("dev", "+m")).await.unwrap();
    assert_eq!(notice(&mut bi).await.text, "ann set mode +m");
    let moderated = until(&mut bi, |m| match m {
        ServerMsg::Modes { moderated, .. } => Some(*moderated),
        _ => None,
    })
    .await;
    assert!(moderated);
    assert!(hub.rooms().iter().any(|r| r.name == "dev" && r.moderated));
    assert_eq!(
        bob.handle(say("dev", "hi")).await,
        Err(HubError::Moderated("dev".into()))
    );
    ann.handle(say("dev", "ops speak")).await.unwrap();
    ann.handle(ClientMsg::Voice {
        room: "dev".into(),
        nick: "bob".into(),
    })
    .await
    .unwrap();
    assert_eq!(notice(&mut bi).await.text, "ann gave voice to bob");
    bob.handle(say("dev", "hi")).await.unwrap();
    // A mode that does not exist is explained.
    let bad = mode("dev", "+x");
    assert_eq!(ann.handle(bad).await.unwrap_err().code(), "bad_request");
}

#[tokio::test]
async fn an_invite_only_room_admits_the_invited() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = open(dir.path(), config(&[]));
    let (mut ann, mut ai) = connect(&hub, "ann");
    join(&mut ann, &mut ai, "dev").await;
    ann.handle(mode("dev", "+i")).await.unwrap();
    assert_eq!(notice(&mut ai).await.text, "ann set mode +i");
    assert!(hub.rooms().iter().any(|r| r.name == "dev" && r.invite_only));
    let (mut carl, mut ci) = connect(&hub, "carl");
    assert_eq!(
        carl.handle(join_msg("dev")).await,
        Err(HubError::InviteOnly("dev".into()))
    );
    ann.handle(ClientMsg::Invite {
        room: "dev".into(),
        nick: "carl".into(),
    })
    .await
    .unwrap();
    let told = until(&mut ci, |m| match m {
        ServerMsg::Info { text } => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(told, "ann invited you to #dev; /join dev");
    join(&mut carl, &mut ci, "dev").await;
}

#[tokio::test]
async fn an_invited_account_is_still_invited_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = open(dir.path(), config(&[]));
        let (mut ann, mut ai) = account(&hub, "ann").await;
        join(&mut ann, &mut ai, "dev").await;
        // The hub made ann, an account, the operator of the new room.
        assert_eq!(
            notice(&mut ai).await.text,
            "ann is now the operator of #dev (the first to join)"
        );
        ann.handle(mode("dev", "+i")).await.unwrap();
        assert_eq!(notice(&mut ai).await.text, "ann set mode +i");
        let (bob, bi) = account(&hub, "bob").await;
        ann.handle(ClientMsg::Invite {
            room: "dev".into(),
            nick: "bob".into(),
        })
        .await
        .unwrap();
        // The notice comes after the change is committed.
        assert_eq!(notice(&mut ai).await.text, "ann invited bob to #dev");
        drop((ann, ai, bob, bi));
        drop(hub);
        writer.join();
    }
    let (hub, _w) = open(dir.path(), config(&[]));
    assert!(hub.rooms().iter().any(|r| r.name == "dev" && r.invite_only));
    // A guest named bob is not bob's account, and is not invited.
    let (mut guest, _gi) = connect(&hub, "bob");
    assert_eq!(
        guest.handle(join_msg("dev")).await,
        Err(HubError::InviteOnly("dev".into()))
    );
    drop(guest);
    let (mut carl, _ci) = account(&hub, "carl").await;
    assert_eq!(
        carl.handle(join_msg("dev")).await,
        Err(HubError::InviteOnly("dev".into()))
    );
    let (mut bob, mut bi) = account(&hub, "bob").await;
    join(&mut bob, &mut bi, "dev").await;
}

#[tokio::test]
async fn when_the_last_operator_leaves_the_longest_connected_member_takes_over() {
    let Room {
        _dir,
        hub,
        mut ann,
        mut ai,
        mut bob,
        mut bi,
        ..
    } = room_of_ann_and_bob().await;
    let (mut carl, mut ci) = connect(&hub, "carl");
    join(&mut carl, &mut ci, "dev").await;
    ann.part("dev").unwrap();
    let told = until(&mut bi, |m| match m {
        ServerMsg::Info { text } => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        told,
        "you are now the operator of #dev (the last operator left)"
    );
    assert_eq!(modes(&mut bi, "dev").await, ["bob"]);
    assert_eq!(modes(&mut ci, "dev").await, ["bob"]);
    // Bob's powers are real; ann's (a guest's) went with her.
    bob.handle(kick("dev", "carl", None)).await.unwrap();
    assert_eq!(join(&mut ann, &mut ai, "dev").await, ["bob"]);
    assert_eq!(
        ann.handle(kick("dev", "bob", None)).await,
        Err(HubError::NotOperator("dev".into()))
    );
    // A disconnect counts as leaving.
    drop(bob);
    assert_eq!(modes(&mut ai, "dev").await, ["ann"]);
}

#[tokio::test]
async fn an_operator_account_stays_operator_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = open(dir.path(), config(&[]));
        let (mut ann, mut ai) = account(&hub, "ann").await;
        join(&mut ann, &mut ai, "dev").await;
        let (mut bob, mut bi) = account(&hub, "bob").await;
        join(&mut bob, &mut bi, "dev").await;
        ann.handle(mode("dev", "+m")).await.unwrap();
        ann.handle(ClientMsg::Mute {
            room: "dev".into(),
            nick: "bob".into(),
            duration: None,
        })
        .await
        .unwrap();
        notice(&mut bi).await;
        notice(&mut bi).await;
        drop((ann, bob, ai, bi));
        drop(hub);
        writer.join();
    }
    let (hub, _w) = open(dir.path(), config(&[]));
    assert!(hub.rooms().iter().any(|r| r.name == "dev" && r.moderated));
    let (mut bob, mut bi) = account(&hub, "bob").await;
    // Bob comes first, but the room has an operator (ann's account).
    assert_eq!(join(&mut bob, &mut bi, "dev").await, Vec::<String>::new());
    assert_eq!(
        bob.handle(say("dev", "hi")).await,
        Err(HubError::Muted("dev".into()))
    );
    let (mut ann, mut ai) = account(&hub, "ann").await;
    join(&mut ann, &mut ai, "dev").await;
    ann.handle(kick("dev", "bob", None)).await.unwrap();
}

#[tokio::test]
async fn an_admin_moderates_any_room_and_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = open(dir.path(), config(&["root"]));
    let (mut ann, mut ai) = connect(&hub, "ann");
    join(&mut ann, &mut ai, "dev").await;
    let (mut bob, mut bi) = connect(&hub, "bob");
    join(&mut bob, &mut bi, "dev").await;
    // A guest calling itself root is no admin.
    let (mut fake, _fi) = connect(&hub, "root");
    assert_eq!(
        fake.handle(kick("dev", "bob", None)).await,
        Err(HubError::NotOperator("dev".into()))
    );
    drop(fake);
    let (mut root, mut ri) = connect(&hub, "root");
    root.handle(ClientMsg::Auth {
        token: token("root"),
    })
    .await
    .unwrap();
    let admin = until(&mut ri, |m| match m {
        ServerMsg::LoggedIn { admin, .. } => Some(*admin),
        _ => None,
    })
    .await;
    assert!(admin);
    // Not in the room, not its operator: still allowed.
    root.handle(kick("dev", "bob", Some("admin")))
        .await
        .unwrap();
    assert_eq!(
        notice(&mut ai).await.text,
        "root kicked bob from #dev (admin)"
    );
    // An operator may not kick an admin.
    join(&mut root, &mut ri, "dev").await;
    assert_eq!(
        ann.handle(kick("dev", "root", None)).await,
        Err(HubError::NotAdmin)
    );
    root.handle(ClientMsg::Close {
        room: "dev".into(),
        reason: Some("spam wave".into()),
    })
    .await
    .unwrap();
    assert_eq!(notice(&mut ai).await.text, "root closed #dev (spam wave)");
    assert_eq!(error(&mut ai).await, "kicked");
    assert!(ann.rooms().is_empty());
    assert!(hub.rooms().iter().any(|r| r.name == "dev" && r.invite_only));
    assert_eq!(
        bob.handle(join_msg("dev")).await,
        Err(HubError::InviteOnly("dev".into()))
    );
    drop(bi);
}

#[tokio::test]
async fn the_same_text_too_many_times_in_a_row_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&[]);
    cfg.moderation.max_repeats = 3;
    let (hub, _w) = open(dir.path(), cfg);
    let (mut ann, mut ai) = connect(&hub, "ann");
    join(&mut ann, &mut ai, "dev").await;
    for _ in 0..3 {
        ann.handle(say("dev", "buy now")).await.unwrap();
    }
    let e = ann.handle(say("dev", "buy now")).await.unwrap_err();
    assert_eq!(e, HubError::Repeated(3));
    assert!(e.to_string().contains("more than 3 times in a row"));
    // Something else goes, and then the old text may come again.
    ann.handle(say("dev", "sorry")).await.unwrap();
    ann.handle(say("dev", "buy now")).await.unwrap();
}

#[tokio::test]
async fn guests_per_address_are_capped_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&[]);
    cfg.moderation.guests_per_minute = 2;
    let (hub, _w) = open(dir.path(), cfg);
    let ip = Some("198.51.100.4".parse().unwrap());
    let _a = hub.connect_from(None, ip).unwrap();
    let _b = hub.connect_from(None, ip).unwrap();
    let e = hub.connect_from(None, ip).err().expect("refused");
    assert_eq!(e.code(), "too_many_guests");
    // A wanted nick that is free is no guest; a refused one is.
    let _c = hub.connect_from(Some("carol"), ip).unwrap();
    assert!(hub.connect_from(Some("carol"), ip).is_err());
    // Other addresses and loopback are not held back.
    let _d = hub
        .connect_from(None, Some("198.51.100.5".parse().unwrap()))
        .unwrap();
    for _ in 0..5 {
        let _ = hub
            .connect_from(None, Some("127.0.0.1".parse().unwrap()))
            .unwrap();
    }
}

/// A message log in memory that hands each entry straight back to one hub
/// (broker mode without a broker).
struct MemLog {
    hub: std::sync::OnceLock<Hub>,
    seq: std::sync::atomic::AtomicU64,
}

impl netkit::chat::hub::RoomLog for MemLog {
    fn origin(&self) -> &str {
        "mem"
    }

    fn append(
        &self,
        post: netkit::chat::hub::LoggedPost,
    ) -> futures_util::future::BoxFuture<'static, Result<u64, String>> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let hub = self.hub.get().expect("hub set").clone();
        Box::pin(async move {
            hub.apply_logged(seq, post)
                .await
                .map_err(|e| e.to_string())?;
            Ok(seq)
        })
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test]
async fn in_broker_mode_a_notice_goes_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = open(dir.path(), config(&[]));
    let log = Arc::new(MemLog {
        hub: std::sync::OnceLock::new(),
        seq: Default::default(),
    });
    let _ = log.hub.set(hub.clone());
    assert!(hub.set_room_log(log));
    let (mut ann, mut ai) = connect(&hub, "ann");
    join(&mut ann, &mut ai, "dev").await;
    let (mut bob, mut bi) = connect(&hub, "bob");
    join(&mut bob, &mut bi, "dev").await;
    ann.handle(say("dev", "before")).await.unwrap();
    ann.handle(kick("dev", "bob", None)).await.unwrap();
    assert_eq!(error(&mut bi).await, "kicked");
    let n = notice(&mut ai).await;
    assert_eq!((n.id, n.text.as_str()), (2, "ann kicked bob from #dev"));
    ann.handle(say("dev", "after")).await.unwrap();
    let ids: Vec<(u64, MessageKind)> = hub
        .history("dev", None, None, 10)
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.kind))
        .collect();
    assert_eq!(
        ids,
        [
            (1, MessageKind::Say),
            (2, MessageKind::Notice),
            (3, MessageKind::Say)
        ]
    );
    drop(bob);
}

#[tokio::test]
async fn a_closed_room_forgets_its_invitations() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (hub, writer) = open(dir.path(), config(&["root"]));
        let (mut ann, mut ai) = account(&hub, "ann").await;
        join(&mut ann, &mut ai, "dev").await;
        // The hub made ann, an account, the operator of the new room.
        assert_eq!(
            notice(&mut ai).await.text,
            "ann is now the operator of #dev (the first to join)"
        );
        ann.handle(mode("dev", "+i")).await.unwrap();
        assert_eq!(notice(&mut ai).await.text, "ann set mode +i");
        let (bob, bi) = account(&hub, "bob").await;
        let invite = ClientMsg::Invite {
            room: "dev".into(),
            nick: "bob".into(),
        };
        ann.handle(invite).await.unwrap();
        assert_eq!(notice(&mut ai).await.text, "ann invited bob to #dev");
        let (mut root, _ri) = account(&hub, "root").await;
        let close = ClientMsg::Close {
            room: "dev".into(),
            reason: None,
        };
        root.handle(close).await.unwrap();
        assert_eq!(notice(&mut ai).await.text, "root closed #dev");
        drop((bob, bi));
        let (mut bob, _bi) = account(&hub, "bob").await;
        assert_eq!(
            bob.handle(join_msg("dev")).await,
            Err(HubError::InviteOnly("dev".into()))
        );
        drop((ann, ai, bob, root));
        drop(hub);
        writer.join();
    }
    // Nor is the invitation back after a restart.
    let (hub, _w) = open(dir.path(), config(&[]));
    let (mut bob, _bi) = account(&hub, "bob").await;
    assert_eq!(
        bob.handle(join_msg("dev")).await,
        Err(HubError::InviteOnly("dev".into()))
    );
}

/// A notice of node b carrying `change` (JSON), as the relay hands it over.
fn from_b(seq: u64, ts: i64, text: &str, change: &str) -> netkit::chat::store::LogMessage {
    netkit::chat::store::LogMessage {
        origin: "b/2".into(),
        seq,
        room: "dev".into(),
        from: "ann".into(),
        text: text.into(),
        kind: MessageKind::Notice,
        ts,
        origin_id: seq,
        moderation: Some(change.into()),
        file: None,
    }
}

#[tokio::test]
async fn a_ban_from_another_node_puts_the_member_out_and_the_latest_change_wins() {
    let Room {
        _dir,
        hub,
        mut ann,
        mut ai,
        mut bob,
        mut bi,
        ..
    } = room_of_ann_and_bob().await;
    assert!(hub.set_origin("a/1".into()));
    let now = netkit::chat::protocol::now_ms();
    let ban = r#"{"kind":"ban","key":"bob","addr":null,"until":null,"reason":"spam","by":"ann"}"#;
    hub.apply_remote(from_b(1, now, "ann banned bob", ban))
        .await
        .unwrap();
    assert_eq!(notice(&mut ai).await.text, "ann banned bob");
    assert_eq!(error(&mut bi).await, "kicked");
    assert!(bob.rooms().is_empty());
    assert!(matches!(
        bob.handle(join_msg("dev")).await,
        Err(HubError::Banned(..))
    ));
    // Junk and malformed changes are skipped; their notices are still shown.
    for (seq, junk) in [(2, "not json"), (3, r#"{"kind":"ban","key":""}"#)] {
        hub.apply_remote(from_b(seq, now, "junk", junk))
            .await
            .unwrap();
        assert_eq!(notice(&mut ai).await.text, "junk");
    }
    // An unban older than the ban (seen late, from another node) loses.
    let unban = r#"{"kind":"unban","key":"bob"}"#;
    hub.apply_remote(from_b(4, now - 1000, "old unban", unban))
        .await
        .unwrap();
    assert_eq!(notice(&mut ai).await.text, "old unban");
    assert!(matches!(
        bob.handle(join_msg("dev")).await,
        Err(HubError::Banned(..))
    ));
    hub.apply_remote(from_b(5, now + 1, "new unban", unban))
        .await
        .unwrap();
    assert_eq!(notice(&mut ai).await.text, "new unban");
    join(&mut bob, &mut bi, "dev").await;
    // A local change is stamped too: an older remote one does not undo it.
    ann.handle(mode("dev", "+m")).await.unwrap();
    assert_eq!(notice(&mut ai).await.text, "ann set mode +m");
    let unmoderate = r#"{"kind":"mode","moderated":false,"invite_only":false}"#;
    hub.apply_remote(from_b(6, now - 5000, "old -m", unmoderate))
        .await
        .unwrap();
    assert_eq!(notice(&mut ai).await.text, "old -m");
    assert_eq!(
        bob.handle(say("dev", "hi")).await,
        Err(HubError::Moderated("dev".into()))
    );
}

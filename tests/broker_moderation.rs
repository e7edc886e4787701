//! Moderation across hubs in broker mode (a real nats-server on loopback):
//! an operator on hub a makes an operator, bans, mutes and kicks users of
//! hub b, and b enforces it; a mode set on b holds on a; a hub started after
//! a ban learns it from the stream. Skipped where nats-server is missing.

mod broker_util;
mod chat_util;
mod proc_util;
mod ws_util;

use std::sync::Arc;

use broker_util::{Node, nats_on_fresh_store, stop_all};
use chat_util::T;
use netkit::chat::auth::{AuthConfig, AuthMode, TokenVerifier};
use netkit::chat::hub::{HubConfig, HubError, Inbox, Received, Session};
use netkit::chat::protocol::{ClientMsg, MessageKind, PresenceEvent, ServerMsg};
use netkit::cluster::broker::BrokerArgs;

const SECRET: &[u8] = b"a test secret of at least 32 bytes!!";

/// A hub with application tokens (the same secret on every hub).
async fn hub(url: &str) -> Node {
    let cfg = HubConfig {
        rate: 0.0,
        auth: AuthConfig {
            mode: AuthMode::Accounts,
            tokens: Some(Arc::new(TokenVerifier::from_secret(SECRET).unwrap())),
            ..AuthConfig::default()
        },
        ..HubConfig::default()
    };
    let args = BrokerArgs {
        broker: Some(url.to_string()),
        broker_max_per_room: 0,
        broker_replicas: 1,
    };
    Node::start_configured(args, cfg).await
}

fn token(sub: &str) -> String {
    proc_util::hs256_token(SECRET, sub)
}

/// The next event `want` picks (others are passed over).
async fn until<V>(inbox: &mut Inbox, what: &str, want: impl Fn(&ServerMsg) -> Option<V>) -> V {
    let wait = async {
        loop {
            match inbox.recv().await {
                Received::Event(ev) => {
                    if let Some(v) = want(&ev.msg) {
                        return v;
                    }
                }
                other => panic!("client gone while waiting for {what}: {other:?}"),
            }
        }
    };
    tokio::time::timeout(T, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what}"))
}

/// Waits for the notice whose text is `text`.
async fn notice(inbox: &mut Inbox, text: &str) {
    until(inbox, text, |m| match m {
        ServerMsg::Message(n) if n.kind == MessageKind::Notice && n.text == text => Some(()),
        _ => None,
    })
    .await
}

/// Waits for the notice whose text is `text`; its id, which in broker mode
/// is its position in the log (another hub has it once it has applied that
/// far; the sending hub's own `logged` may not count it yet when its
/// client is shown it).
async fn notice_id(inbox: &mut Inbox, text: &str) -> u64 {
    until(inbox, text, |m| match m {
        ServerMsg::Message(n) if n.kind == MessageKind::Notice && n.text == text => Some(n.id),
        _ => None,
    })
    .await
}

/// Waits for the remote join of `nick`.
async fn remote_join(inbox: &mut Inbox, nick: &str) {
    until(inbox, "a remote join", |m| match m {
        ServerMsg::Presence {
            nick: n,
            event: PresenceEvent::Join,
            node: Some(_),
            ..
        } if n == nick => Some(()),
        _ => None,
    })
    .await
}

async fn say(s: &Session, text: &str) -> Result<(), HubError> {
    s.say("lobby", text.into(), MessageKind::Say).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_on_one_hub_holds_on_the_others() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (hub(&nats.url()).await, hub(&nats.url()).await);
    // op made lobby on a (its operator there); eve made it on b.
    let (mut op, mut op_in) = a.client("op", None).await;
    let (hal, mut hal_in) = a.client("hal", None).await;
    let (mut eve, mut eve_in) = b.client("eve", None).await;
    let (mut dave, mut dave_in) = b.hub.connect(Some("dtmp")).unwrap();
    dave.handle(ClientMsg::Auth {
        token: token("dave"),
    })
    .await
    .unwrap();
    until(&mut dave_in, "dave's login", |m| {
        matches!(m, ServerMsg::LoggedIn { .. }).then_some(())
    })
    .await;
    dave.join("lobby", None).await.unwrap();
    dave.settle().await;
    let plus_m = || ClientMsg::Mode {
        room: "lobby".into(),
        mode: "+m".into(),
    };
    assert_eq!(
        dave.handle(plus_m()).await,
        Err(HubError::NotOperator("lobby".into()))
    );
    remote_join(&mut op_in, "dave").await;

    // An operator made on a moderates on b; the mode holds on a.
    op.handle(ClientMsg::Op {
        room: "lobby".into(),
        nick: "dave".into(),
    })
    .await
    .unwrap();
    notice(&mut dave_in, "op made dave an operator").await;
    dave.handle(plus_m()).await.unwrap();
    notice(&mut hal_in, "dave set mode +m").await;
    assert_eq!(
        say(&hal, "may I?").await,
        Err(HubError::Moderated("lobby".into()))
    );

    // A ban on a puts eve out on b and keeps her out.
    op.handle(ClientMsg::Ban {
        room: "lobby".into(),
        nick: "eve".into(),
        duration: None,
        reason: None,
        address: false,
    })
    .await
    .unwrap();
    until(&mut eve_in, "eve's kick", |m| match m {
        ServerMsg::Error { code, .. } if code == "kicked" => Some(()),
        _ => None,
    })
    .await;
    assert!(matches!(
        eve.handle(ClientMsg::Join {
            room: "lobby".into(),
            after: None,
            since: None
        })
        .await,
        Err(HubError::Banned(..))
    ));

    // A mute on a silences dave's account on b.
    op.handle(ClientMsg::Mute {
        room: "lobby".into(),
        nick: "dave".into(),
        duration: Some("10m".into()),
    })
    .await
    .unwrap();
    notice(&mut dave_in, "op muted dave for 10m").await;
    assert_eq!(
        say(&dave, "still talking").await,
        Err(HubError::Muted("lobby".into()))
    );

    // A kick on a of a member of b.
    let (gus, mut gus_in) = b.client("gus", None).await;
    remote_join(&mut op_in, "gus").await;
    op.handle(ClientMsg::Kick {
        room: "lobby".into(),
        nick: "gus".into(),
        reason: None,
    })
    .await
    .unwrap();
    until(&mut gus_in, "gus's parted", |m| {
        matches!(m, ServerMsg::Parted { .. }).then_some(())
    })
    .await;
    assert!(gus.rooms().is_empty());

    // A hub started after a ban learns it from the stream.
    op.handle(ClientMsg::Ban {
        room: "lobby".into(),
        nick: "frank".into(),
        duration: None,
        reason: None,
        address: false,
    })
    .await
    .unwrap();
    let seq = notice_id(&mut op_in, "op banned frank from #lobby").await;
    let c = hub(&nats.url()).await;
    c.applied(seq).await;
    let (frank, _fi) = c.hub.connect(Some("frank")).unwrap();
    assert!(matches!(
        frank.join("lobby", None).await,
        Err(HubError::Banned(..))
    ));
    drop((op, hal, eve, dave, gus, frank));
    stop_all([a, b, c], nats).await;
}

/// A client of `node` logged in to account `nick` by token, in `room`.
async fn account(node: &Node, nick: &str, room: &str) -> (Session, Inbox) {
    let (mut s, mut inbox) = node.hub.connect(Some(&format!("{nick}tmp"))).unwrap();
    s.handle(ClientMsg::Auth { token: token(nick) })
        .await
        .unwrap();
    until(&mut inbox, "the login", |m| {
        matches!(m, ServerMsg::LoggedIn { .. }).then_some(())
    })
    .await;
    s.join(room, None).await.unwrap();
    s.settle().await;
    (s, inbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_the_hub_chose_holds_on_the_others() {
    let Some((_store, nats)) = nats_on_fresh_store().await else {
        return;
    };
    let (a, b) = (hub(&nats.url()).await, hub(&nats.url()).await);
    let plus_m = || ClientMsg::Mode {
        room: "fresh".into(),
        mode: "+m".into(),
    };
    // ann (an account) makes #fresh on a: the hub makes her its operator,
    // and the notice saying so goes through the log to b.
    let (_ann, mut ann_in) = account(&a, "ann", "fresh").await;
    let seq = notice_id(
        &mut ann_in,
        "ann is now the operator of #fresh (the first to join)",
    )
    .await;
    b.applied(seq).await;

    // bob is the first on b to join, but the room has an operator: not him.
    let (mut bob, mut bob_in) = account(&b, "bob", "fresh").await;
    assert_eq!(
        bob.handle(plus_m()).await,
        Err(HubError::NotOperator("fresh".into()))
    );
    // ann, on b, is the operator there too; her mode holds on a.
    let (mut ann_b, _ann_b_in) = account(&b, "ann", "fresh").await;
    ann_b.handle(plus_m()).await.unwrap();
    notice(&mut bob_in, "ann set mode +m").await;
    notice(&mut ann_in, "ann set mode +m").await;
    drop((bob, ann_b));
    stop_all([a, b], nats).await;
}

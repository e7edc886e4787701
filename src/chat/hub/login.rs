//! Who a client is: registering its nick, logging in (password, session
//! token, application token), and what a login changes — the client takes
//! its nick, and a guest holding it is renamed. Password hashing runs on
//! blocking threads, a few at a time, never on the writer thread.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::account_log::ClaimError;
use super::session::Session;
use super::{ClientId, Event, HubError, Shared, State, guest_nick};
use crate::chat::accounts::{AccountError, Accounts, SessionRecord, check_password};
use crate::chat::names::{check_nick, name_key};
use crate::chat::protocol::{ClientMsg, ServerMsg};

/// How a client logged in (the `via` of `logged_in`, a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Password,
    Session,
    Token,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Password => "password",
            Via::Session => "session",
            Via::Token => "token",
        }
    }
}

impl Session {
    /// Tells the hub the client's address (for the per-address login limit).
    pub fn set_peer(&mut self, peer: std::net::IpAddr) {
        self.ident.peer = Some(peer);
    }

    /// True once the client logged in.
    pub fn logged_in(&self) -> bool {
        self.ident.logged_in
    }

    /// Carries out `register`, `login`, `logout` and `auth`.
    pub(super) async fn identify(&mut self, msg: ClientMsg) -> Result<(), HubError> {
        match msg {
            ClientMsg::Register { password } => self.register(password).await,
            ClientMsg::Login {
                session: Some(token),
                ..
            } => self.login_session(token).await,
            ClientMsg::Login {
                nick: Some(nick),
                password: Some(password),
                ..
            } => self.login(&nick, password).await,
            ClientMsg::Login { .. } => Err(HubError::BadToken(
                "login needs nick and password, or session".into(),
            )),
            ClientMsg::Logout { session } => {
                let accounts = self.accounts()?;
                if let Some(logout) = SessionRecord::revocation(&session) {
                    self.hub.share_session(logout);
                }
                blocking(move || accounts.revoke_session(&session)).await?;
                self.tell(ServerMsg::Info {
                    text: "session token forgotten".into(),
                });
                Ok(())
            }
            ClientMsg::Auth { token } => self.auth(&token),
            _ => Ok(()),
        }
    }

    fn accounts(&self) -> Result<Arc<Accounts>, HubError> {
        self.hub
            .shared
            .accounts
            .clone()
            .ok_or(HubError::AuthDisabled(
                "accounts are off on this server (it runs with --chat-auth open)",
            ))
    }

    /// Registers the nick the client holds with `password`, and logs it in.
    pub async fn register(&mut self, password: String) -> Result<(), HubError> {
        let accounts = self.accounts()?;
        let nick = self.nick();
        let key = name_key(&nick);
        if nick.starts_with("guest-") {
            return Err(HubError::CannotRegister(
                "guest names are not registered; pick a nick with /nick first".into(),
            ));
        }
        if self.hub.lock().registered.contains(&key) {
            return Err(HubError::CannotRegister(format!(
                "'{nick}' is registered already; /login {nick} PASSWORD"
            )));
        }
        check_password(&password).map_err(|e| HubError::CannotRegister(e.to_string()))?;
        let shared = self.hub.shared.clone();
        let slot = shared.login_slots.acquire().await;
        let n = nick.clone();
        let (token, session) = match self.hub.account_log() {
            None => {
                blocking(move || {
                    accounts.register(&n, &password)?;
                    accounts.issue_session(&n)
                })
                .await?
            }
            // Shared with other hubs: the log decides who registered the
            // nick first, and only then is it stored here.
            Some(log) => {
                let a = accounts.clone();
                let record = blocking(move || a.new_record(&n, &password)).await?;
                match log.claim(record.clone()).await {
                    Ok(()) => {}
                    Err(ClaimError::Taken) => {
                        return Err(HubError::CannotRegister(format!(
                            "'{nick}' is registered already (on another hub); /login {nick} PASSWORD"
                        )));
                    }
                    Err(ClaimError::Unavailable(why)) => {
                        return Err(HubError::CannotRegister(format!(
                            "the message broker is unavailable ({why}); try again"
                        )));
                    }
                }
                blocking(move || {
                    // The shared log may have brought it here first: the same hash.
                    if !accounts.insert(&record)?
                        && accounts.get(&record.nick)?.map(|r| r.password) != Some(record.password)
                    {
                        return Err(AccountError::Exists(record.nick));
                    }
                    accounts.issue_session(&record.nick)
                })
                .await?
            }
        };
        drop(slot);
        self.hub.registered_now(key);
        metrics::counter!("netkit_chat_registrations_total").increment(1);
        self.logged_in_with_session(&nick, token, session);
        Ok(())
    }

    /// Logs in as `nick` with `password` (limited per account and address).
    pub async fn login(&mut self, nick: &str, password: String) -> Result<(), HubError> {
        let accounts = self.accounts()?;
        let key = name_key(nick);
        let shared = self.hub.shared.clone();
        if let Err(wait) = shared.limiter.attempt(&key, self.ident.peer) {
            metrics::counter!("netkit_chat_logins_throttled_total").increment(1);
            return Err(HubError::LoginThrottled(wait.as_secs().max(1)));
        }
        let slot = shared.login_slots.acquire().await;
        let n = nick.to_string();
        let outcome = blocking(move || {
            let nick = accounts.verify(&n, &password)?;
            let session = accounts.issue_session(&nick)?;
            Ok((nick, session))
        })
        .await;
        drop(slot);
        match outcome {
            Ok((nick, (token, session))) => {
                shared.limiter.succeeded(&key, self.ident.peer);
                self.logged_in_with_session(&nick, token, session);
                Ok(())
            }
            Err(HubError::LoginFailed) => {
                metrics::counter!("netkit_chat_login_failures_total", "via" => "password")
                    .increment(1);
                tracing::info!(account = %key, "chat: failed login");
                Err(HubError::LoginFailed)
            }
            Err(e) => Err(e),
        }
    }

    /// A password login (or registration) as `nick` went through: the
    /// other hubs are given its session, and the client its token.
    fn logged_in_with_session(&mut self, nick: &str, token: String, session: SessionRecord) {
        let expires = session.expires_ms;
        self.hub.share_session(session);
        self.logged_in_as(nick, Via::Password, Some((token, expires)));
    }

    /// Logs in with a session token from an earlier login.
    async fn login_session(&mut self, token: String) -> Result<(), HubError> {
        let accounts = self.accounts()?;
        match blocking(move || accounts.check_session(&token)).await {
            Ok(nick) => {
                self.logged_in_as(&nick, Via::Session, None);
                Ok(())
            }
            Err(e) => {
                metrics::counter!("netkit_chat_login_failures_total", "via" => "session")
                    .increment(1);
                Err(e)
            }
        }
    }

    /// Logs in with an application token: its `sub` is the nick, its
    /// `rooms` (if any) the only rooms the client may join.
    pub fn auth(&mut self, token: &str) -> Result<(), HubError> {
        let Some(verifier) = self.hub.shared.config.auth.tokens.clone() else {
            return Err(HubError::AuthDisabled(
                "application tokens are off on this server (no --chat-token-secret or --chat-token-key)",
            ));
        };
        let fail = |why: String| {
            metrics::counter!("netkit_chat_login_failures_total", "via" => "token").increment(1);
            HubError::BadToken(why)
        };
        let claims = verifier.verify(token).map_err(fail)?;
        check_nick(&claims.sub).map_err(|e| fail(format!("its sub is not a valid nick: {e}")))?;
        self.ident.rooms = claims.rooms.map(|r| r.into_iter().collect::<BTreeSet<_>>());
        self.logged_in_as(&claims.sub, Via::Token, None);
        Ok(())
    }

    /// Refuses a room an application token does not allow, or a new room
    /// whose name looks like an existing one's.
    pub(super) fn may_join(&self, room: &str) -> Result<(), HubError> {
        if let Some(allowed) = &self.ident.rooms
            && !allowed.contains(room)
        {
            return Err(HubError::RoomNotAllowed(room.to_string()));
        }
        let st = self.hub.lock();
        if !st.rooms.contains_key(room)
            && let Some(existing) = st.room_keys.get(&name_key(room))
            && existing != room
        {
            return Err(HubError::RoomLookalike(room.to_string(), existing.clone()));
        }
        Ok(())
    }

    /// The client is now `nick`'s owner: it takes the nick (renaming any
    /// other local client holding it) and is told so.
    fn logged_in_as(&mut self, nick: &str, via: Via, session: Option<(String, i64)>) {
        self.ident.logged_in = true;
        metrics::counter!("netkit_chat_logins_total", "via" => via.as_str()).increment(1);
        tracing::info!(%nick, via = via.as_str(), "chat: logged in");
        let key = name_key(nick);
        let shared = &self.hub.shared;
        let mut st = shared.lock();
        if let Some(c) = st.clients.get_mut(&self.id) {
            c.login = Some(key.clone());
        }
        if let Some(&holder) = st.nicks.get(&key)
            && holder != self.id
        {
            shared.rename_guest_locked(&mut st, holder, nick);
        }
        shared.rename_locked(&mut st, self.id, nick);
        let (session, expires) = session.unzip();
        let admin = shared.is_admin(&st, self.id);
        let ev = Event::new(ServerMsg::LoggedIn {
            nick: nick.to_string(),
            via: via.as_str().to_string(),
            session,
            expires,
            admin,
        });
        shared.deliver_locked(&mut st, &[self.id], &ev);
    }
}

impl Shared {
    /// Renames client `id` to `nick` (already checked), telling it and
    /// everyone sharing a room with it. False if the client is gone.
    pub(super) fn rename_locked(&self, st: &mut State, id: ClientId, nick: &str) -> bool {
        let Some(c) = st.clients.get_mut(&id) else {
            return false;
        };
        if c.nick == nick {
            return true;
        }
        let old = std::mem::replace(&mut c.nick, nick.to_string());
        let rooms = c.rooms.clone();
        st.nicks.remove(&name_key(&old));
        st.nicks.insert(name_key(nick), id);
        let mut recipients: BTreeSet<ClientId> = BTreeSet::from([id]);
        for room in &rooms {
            if let Some(r) = st.rooms.get(room) {
                recipients.extend(r.members.iter().copied());
            }
        }
        let recipients: Vec<ClientId> = recipients.into_iter().collect();
        let ev = Event::new(ServerMsg::Nick {
            old,
            new: nick.to_string(),
            node: None,
        });
        self.presence_changed();
        self.deliver_locked(st, &recipients, &ev);
        true
    }

    /// Gives client `id`, which holds `nick` when its owner logs in, a guest name.
    fn rename_guest_locked(&self, st: &mut State, id: ClientId, nick: &str) {
        let guest = guest_nick(st, id);
        let ev = Event::new(ServerMsg::error(
            "nick_registered",
            format!("'{nick}' logged in; you are renamed to '{guest}'"),
        ));
        self.deliver_locked(st, &[id], &ev);
        self.rename_locked(st, id, &guest);
    }
}

/// Runs an account operation on a blocking thread; its errors as hub errors.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
) -> Result<T, HubError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(AccountError::Wrong)) => Err(HubError::LoginFailed),
        Ok(Err(AccountError::BadSession)) => {
            Err(HubError::BadToken(AccountError::BadSession.to_string()))
        }
        Ok(Err(AccountError::Store(e))) => Err(HubError::Store(e.to_string())),
        Ok(Err(e)) => Err(HubError::CannotRegister(e.to_string())),
        Err(_) => Err(HubError::ShuttingDown),
    }
}

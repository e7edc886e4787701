//! Accounts shared by the hubs of a deployment (broker mode): a nick
//! registered on one hub is claimed in a log every hub reads (the engine
//! decides, once, who registered it first), and every hub stores each
//! claimed account so that its owner can log in on any of them.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Hub, HubError};
use crate::chat::accounts::{AccountRecord, SessionRecord};
use crate::chat::names::name_key;

/// Why a claim was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// Another hub registered the nick (or one that looks like it) first.
    Taken,
    /// The log could not be reached; nothing was registered.
    Unavailable(String),
}

/// A log of registrations every hub of a deployment reads (a JetStream
/// stream keeping one entry per account key).
pub trait AccountLog: Send + Sync + 'static {
    /// Claims `record`'s key for it: `Ok` once the log has stored it as
    /// the first entry for that key.
    fn claim(&self, record: AccountRecord) -> BoxFuture<'static, Result<(), ClaimError>>;
    /// Shares a page session issued here, or (revoked) a logout, with the
    /// other hubs; best effort: the session holds here whatever happens.
    fn share_session(&self, record: SessionRecord);
}

impl Hub {
    /// Registrations on this hub go through `log` from now on (they fail
    /// when it is unreachable). Once; false if a log is set already.
    pub fn set_account_log(&self, log: Arc<dyn AccountLog>) -> bool {
        self.shared.account_log.set(log).is_ok()
    }

    pub(super) fn account_log(&self) -> Option<Arc<dyn AccountLog>> {
        self.shared.account_log.get().cloned()
    }

    /// Whether `nick` (or a nick that looks like it) is registered here.
    pub fn is_registered(&self, nick: &str) -> bool {
        self.lock().registered.contains(&name_key(nick))
    }

    /// Changes whenever a nick becomes registered here (from a client, or
    /// from another hub).
    pub fn accounts_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.accounts_changed.subscribe()
    }

    /// How long a page session lasts here.
    pub fn session_ttl(&self) -> std::time::Duration {
        self.shared.config.auth.session_ttl
    }

    /// Changes whenever a session from another hub is stored or forgotten here.
    pub fn sessions_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.sessions_changed.subscribe()
    }

    pub(super) fn share_session(&self, record: SessionRecord) {
        if let Some(log) = self.shared.account_log.get() {
            log.share_session(record);
        }
    }

    /// A page session (or a logout) from another hub: stored (forgotten)
    /// here, so the page logs in with its token on this hub too. A
    /// malformed record is refused.
    pub async fn apply_remote_session(&self, record: SessionRecord) -> Result<(), HubError> {
        let Some(accounts) = self.shared.accounts.clone() else {
            return Ok(());
        };
        record.check().map_err(HubError::BadAccount)?;
        super::login::blocking(move || accounts.apply_session(&record)).await?;
        self.shared.sessions_changed.send_modify(|v| *v += 1);
        Ok(())
    }

    pub(super) fn registered_now(&self, key: String) {
        if self.lock().registered.insert(key) {
            self.shared.accounts_changed.send_modify(|v| *v += 1);
        }
    }

    /// The accounts registered here (none without accounts), to claim in
    /// a log this hub starts to share.
    pub async fn local_accounts(&self) -> Result<Vec<AccountRecord>, HubError> {
        let Some(accounts) = self.shared.accounts.clone() else {
            return Ok(Vec::new());
        };
        super::login::blocking(move || accounts.all()).await
    }

    /// An account another hub registered (read from the shared log):
    /// stored here, and its nick reserved for its owner. Returns whether it
    /// was new here. A malformed record is refused; an account this hub
    /// holds already under the key is kept as it is (one registered here
    /// before the hubs shared a log; a warning says so when the two differ).
    pub async fn apply_remote_account(&self, record: AccountRecord) -> Result<bool, HubError> {
        let Some(accounts) = self.shared.accounts.clone() else {
            return Ok(false);
        };
        record.check().map_err(HubError::BadAccount)?;
        let key = name_key(&record.nick);
        let rec = record.clone();
        let (stored, existing) = super::login::blocking(move || {
            let stored = accounts.insert(&rec)?;
            let existing = if stored {
                None
            } else {
                accounts.get(&rec.nick)?
            };
            Ok((stored, existing))
        })
        .await?;
        if let Some(mine) = existing
            && mine.password != record.password
        {
            tracing::warn!(
                account = %key,
                "chat: the account '{}' registered on this hub differs from the one the other hubs share; this hub keeps its own",
                mine.nick
            );
        }
        self.registered_now(key);
        Ok(stored)
    }
}

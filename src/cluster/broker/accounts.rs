//! Broker mode, accounts and page sessions: a registration is claimed in
//! the accounts stream (the engine takes the first claim of each key), and
//! page sessions and logouts are shared on the sessions stream
//! (docs/cluster.md, "Accounts"). The hubs read both in `events`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Broker, Refused, keyed_stream, wire};
use crate::chat::Hub;
use crate::chat::accounts::{AccountRecord, SessionRecord};
use crate::chat::hub::{AccountLog, ClaimError};

impl Broker {
    /// Claims `record`'s key in the accounts stream: published only if the
    /// key has no entry yet (expected last subject sequence 0), so of two
    /// hubs registering one nick at once the engine takes exactly one. A
    /// lost acknowledgement is retried once with the same message id.
    async fn claim_account(self: Arc<Self>, record: AccountRecord) -> Result<(), ClaimError> {
        let (subject, payload) = (wire::account_subject(&record.nick), wire::account(&record));
        match self.publish_retried(subject, payload, true).await {
            Ok(_) => Ok(()),
            Err(Refused::NotFirst) => Err(ClaimError::Taken),
            Err(Refused::Unavailable(why)) => Err(ClaimError::Unavailable(why)),
        }
    }
}

impl AccountLog for Arc<Broker> {
    fn claim(&self, record: AccountRecord) -> BoxFuture<'static, Result<(), ClaimError>> {
        Box::pin(self.clone().claim_account(record))
    }

    fn share_session(&self, record: SessionRecord) {
        let js = self.js.clone();
        let revoked = record.revoked;
        let (subject, payload) = (
            wire::session_subject(&record.selector),
            wire::session(&record),
        );
        tokio::spawn(async move {
            let stored = match js.publish(subject, payload).await {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                let what = if revoked { "logout" } else { "session" };
                tracing::warn!(
                    "broker: {what} not shared with the other hubs (it holds on this one): {e}"
                );
            }
        });
    }
}

/// Makes sure the stream of page sessions exists: entries kept one per
/// selector and no longer than a session lasts (`ttl`, and a day). A
/// stream made by a hub with a shorter session TTL is given this hub's
/// longer one (the longest of the hubs wins; it is never shortened), or
/// its sessions would leave the stream, and the hubs that start later,
/// before they expire.
pub(super) async fn sessions_stream(
    broker: &Broker,
    ttl: Duration,
    replicas: u8,
) -> anyhow::Result<()> {
    let (name, prefix) = (wire::SESSIONS_STREAM, wire::SESSION_PREFIX);
    let replicas = usize::from(replicas.max(1));
    let max_age = ttl.saturating_add(Duration::from_secs(24 * 3600));
    keyed_stream(&broker.js, &broker.servers, name, prefix, replicas, |c| {
        c.max_age = max_age;
    })
    .await?;
    // Two hubs raising it at once: each looks again after its update, so
    // the longer one stands unless the other's lands after that look.
    for _ in 0..3 {
        // get_stream reads the stream's info from the server each time.
        let stream = broker.js.get_stream(name).await.map_err(|e| {
            anyhow::anyhow!("--broker: cannot read the JetStream stream {name}: {e}")
        })?;
        let mut config = stream.cached_info().config.clone();
        if !keeps_less(config.max_age, max_age) {
            return Ok(());
        }
        tracing::info!(
            "broker: the stream {name} kept sessions {:?}; raised to {max_age:?} (--chat-session-ttl and a day)",
            config.max_age
        );
        config.max_age = max_age;
        broker.js.update_stream(config).await.map_err(|e| {
            anyhow::anyhow!("--broker: cannot raise the max age of the stream {name}: {e}")
        })?;
    }
    Ok(())
}

/// Whether a stream whose entries live `current` (zero: for ever) keeps
/// them less than `wanted`.
fn keeps_less(current: Duration, wanted: Duration) -> bool {
    !current.is_zero() && current < wanted
}

/// Claims, in the accounts stream, the accounts this hub registered before
/// it shared one (a data dir from a hub on its own): each stands unless
/// another hub claimed its nick first, and then this hub keeps its own and
/// says so.
pub(super) async fn claim_local_accounts(broker: Arc<Broker>, hub: Hub) {
    let mine = match hub.local_accounts().await {
        Ok(v) => v,
        Err(e) => return tracing::warn!("broker: the accounts of this hub were not read: {e}"),
    };
    if mine.is_empty() {
        return;
    }
    // Only the keys the stream lacks (one listing, not a claim per account
    // at every start); a failed listing claims them all.
    let held = held_keys(&broker).await.unwrap_or_else(|e| {
        tracing::debug!("broker: the accounts stream's keys were not listed: {e}");
        Default::default()
    });
    for record in mine {
        if held.contains(&wire::account_subject(&record.nick)) {
            continue;
        }
        match broker.clone().claim_account(record.clone()).await {
            Ok(()) => {
                tracing::info!(nick = %record.nick, "broker: account shared with the other hubs")
            }
            Err(ClaimError::Taken) => {} // already there (ours or another's: the reader tells)
            Err(ClaimError::Unavailable(why)) => {
                return tracing::warn!(
                    "broker: accounts of this hub not shared ({why}); they are at the next start"
                );
            }
        }
    }
}

/// The subjects the accounts stream holds an entry on.
async fn held_keys(broker: &Broker) -> anyhow::Result<std::collections::HashSet<String>> {
    use futures_util::TryStreamExt;
    let stream = broker.js.get_stream(wire::ACCOUNTS_STREAM).await?;
    let mut listing = stream
        .info_with_subjects(format!("{}>", wire::ACCOUNT_PREFIX))
        .await?;
    let mut held = std::collections::HashSet::new();
    while let Some((subject, _)) = listing.try_next().await? {
        held.insert(subject);
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::keeps_less;
    use std::time::Duration;

    #[test]
    fn a_stream_keeping_sessions_for_less_is_raised_never_lowered() {
        let day = Duration::from_secs(24 * 3600);
        assert!(keeps_less(day, 31 * day));
        assert!(!keeps_less(31 * day, 31 * day));
        assert!(!keeps_less(31 * day, day));
        // Zero: the stream keeps its entries for ever already.
        assert!(!keeps_less(Duration::ZERO, 31 * day));
    }
}

//! Shutdown plumbing: a [`CancellationToken`] cancelled on SIGINT/SIGTERM, and
//! a helper to wait for tracked tasks within a grace period.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Waits for the first SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot install SIGTERM handler: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Returns a token that is cancelled when the process receives SIGINT or SIGTERM.
/// The handlers are installed before it returns, so a signal sent right after
/// (say, once the `--ready-json` line is out) is never the default, fatal one.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                }
                t.cancel();
            });
            return token;
        }
    }
    tokio::spawn(async move {
        signal().await;
        t.cancel();
    });
    token
}

/// Closes `tracker` and waits for its tasks; after `grace`, cancels `hard` (which
/// tasks race against to abandon what they were doing) and waits once more.
/// Returns `true` if every task finished within the grace period.
pub async fn drain(tracker: &TaskTracker, grace: Duration, hard: &CancellationToken) -> bool {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return true;
    }
    tracing::warn!(
        remaining = tracker.len(),
        "grace period of {} over, closing remaining connections",
        humantime::format_duration(grace)
    );
    hard.cancel();
    tracker.wait().await;
    false
}

//! Room files across a cluster: a hub asked for a file it does not hold
//! fetches it once from another hub (gossip members or broker hubs, by
//! their HTTP address), streams it to a part file, checks the BLAKE3 of the
//! link before the copy takes its content-addressed name, and then serves
//! it like any local file. Concurrent requests for one missing file share
//! one fetch. See docs/cluster.md, "Files across hubs".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hyper::body::Incoming;

use super::AppState;
use super::api::api_error;
use super::get::{FileUrl, Silent, save_body, send_get};
use crate::chat::files::{FileError, FileStore};

/// Header of a hub's request to another hub: answer from what you hold,
/// never fetch in turn (so two hubs missing a file never ask each other in a loop).
pub const FETCH_HEADER: &str = "x-netkit-fetch";

/// Why a fetch failed, as the requester is told (shared by everyone waiting on it).
#[derive(Debug, Clone)]
pub struct FetchFail {
    /// 404 (nobody holds it), 502 (a hub failed or sent wrong bytes),
    /// 504 (a hub went silent), or the store's own refusal.
    pub status: StatusCode,
    /// The JSON error code.
    pub code: &'static str,
    /// What happened, for a person.
    pub message: String,
}

impl FetchFail {
    fn new(status: StatusCode, code: &'static str, message: String) -> FetchFail {
        FetchFail {
            status,
            code,
            message,
        }
    }

    /// A failure of the store on this hub (too large, over quota, disk full …).
    fn store(e: FileError) -> FetchFail {
        let (status, code) = super::files::file_error_status(&e);
        FetchFail::new(status, code, e.to_string())
    }

    /// A failure talking to `peer`: 504 if it went silent, else 502.
    fn peer(peer: SocketAddr, e: anyhow::Error) -> FetchFail {
        let silent = e.chain().any(|c| c.is::<Silent>());
        let (status, code) = if silent {
            (StatusCode::GATEWAY_TIMEOUT, "fetch_timeout")
        } else {
            (StatusCode::BAD_GATEWAY, "fetch_failed")
        };
        FetchFail::new(
            status,
            code,
            format!("fetching the file from hub {peer} failed: {e:#}; nothing was kept"),
        )
    }

    /// The JSON error response.
    pub fn response(&self) -> Response {
        api_error(self.status, self.code, self.message.clone())
    }
}

type Flight = Shared<BoxFuture<'static, Result<(), FetchFail>>>;

/// The fetches in progress, by room and BLAKE3.
#[derive(Default)]
pub struct Fetches {
    flights: Mutex<HashMap<(String, String), Flight>>,
}

impl Fetches {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Flight>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Brings file `hex` of `room` (asked for as `name`) to this hub's store
/// from another hub, joining the fetch already under way if there is one.
/// The fetch runs in its own task: a requester that goes away does not cut
/// it for the others.
pub async fn fetch_missing(
    app: &AppState,
    files: &Arc<FileStore>,
    room: &str,
    hex: &str,
    name: &str,
) -> Result<(), FetchFail> {
    let key = (room.to_string(), hex.to_string());
    let flight = {
        let mut flights = app.fetches.lock();
        match flights.get(&key) {
            Some(f) => f.clone(),
            None => {
                let (app, files, name) = (app.clone(), files.clone(), name.to_string());
                let key2 = key.clone();
                let task = tokio::spawn(async move {
                    let got = fetch(&app, &files, &key2.0, &key2.1, &name).await;
                    app.fetches.lock().remove(&key2);
                    got
                });
                let flight = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(FetchFail::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "fetch_failed",
                            format!("the fetch task failed: {e}"),
                        ))
                    })
                }
                .boxed()
                .shared();
                flights.insert(key, flight.clone());
                flight
            }
        }
    };
    flight.await
}

/// The HTTP doors of the other live hubs (see [`dial_addr`]).
fn peers(app: &AppState) -> Vec<SocketAddr> {
    app.cluster
        .report(Vec::new())
        .members
        .into_iter()
        .filter(|m| !m.is_self && matches!(m.state.as_str(), "alive" | "suspect"))
        .filter_map(|m| Some(dial_addr(m.http?, m.gossip)))
        .collect()
}

/// Where to reach a hub whose HTTP door is bound to `http`: a door bound to
/// every address (`0.0.0.0`, `::`) is reached at the address the hub
/// gossips from (its machine), or at loopback when that is unknown or
/// unspecified too.
pub fn dial_addr(mut http: SocketAddr, gossip: Option<SocketAddr>) -> SocketAddr {
    if http.ip().is_unspecified() {
        let ip = gossip
            .map(|g| g.ip())
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        http.set_ip(ip);
    }
    http
}

/// Asks each other hub in turn until one hands over verified bytes.
async fn fetch(
    app: &AppState,
    files: &FileStore,
    room: &str,
    hex: &str,
    name: &str,
) -> Result<(), FetchFail> {
    let not_held = || {
        FetchFail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file on this hub or any other hub of the cluster".into(),
        )
    };
    let want = match blake3::Hash::from_hex(hex) {
        Ok(h) if h.to_hex().as_str() == hex && crate::chat::protocol::valid_room(room) => h,
        _ => return Err(FetchFail::store(FileError::NotFound)),
    };
    let peers = peers(app);
    if peers.is_empty() {
        return Err(FetchFail::store(FileError::NotFound));
    }
    let mut failed = None;
    for peer in peers {
        match from_peer(app, files, peer, room, want, name).await {
            Ok(true) => {
                tracing::info!(%room, blake3 = %hex, %peer, "files: fetched from another hub");
                return Ok(());
            }
            Ok(false) => {}
            Err(f) => {
                tracing::warn!(%room, blake3 = %hex, %peer, "files: {}", f.message);
                failed = Some(f);
            }
        }
    }
    Err(failed.unwrap_or_else(not_held))
}

/// Fetches the file from `peer`: `Ok(false)` if it does not hold it,
/// `Ok(true)` once a verified copy is stored here.
async fn from_peer(
    app: &AppState,
    files: &FileStore,
    peer: SocketAddr,
    room: &str,
    want: blake3::Hash,
    name: &str,
) -> Result<bool, FetchFail> {
    let hex = want.to_hex();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    let url = FileUrl {
        tls: app.config.door.is_tls(),
        authority: peer.to_string(),
        path: format!("/files/{room}/{hex}/{encoded}"),
        blake3: want,
        name: name.to_string(),
    };
    let timeout = files.limits().stall_timeout;
    let mut resp = request(&url, &app.config.peer_tls, timeout)
        .await
        .map_err(|e| FetchFail::peer(peer, e))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(false),
        s => {
            return Err(FetchFail::peer(peer, anyhow::anyhow!("it answered {s}")));
        }
    }
    let max = files.limits().max_size;
    let size = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let part = files
        .fetch_part(room, &hex, size.unwrap_or(max))
        .map_err(FetchFail::store)?;
    let verified = receive(&mut resp, &part, want, size.unwrap_or(max), timeout).await;
    let stored = match verified {
        Ok(n) => files
            .adopt_fetched(room, &part, &hex, n)
            .map_err(FetchFail::store),
        Err(e) => Err(FetchFail::peer(peer, e)),
    };
    if stored.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    stored.map(|()| true)
}

/// Streams the body to `part` (at most `limit` bytes) and checks its BLAKE3
/// is `want`; returns its size. The caller removes `part` on failure.
async fn receive(
    resp: &mut hyper::Response<Incoming>,
    part: &std::path::Path,
    want: blake3::Hash,
    limit: u64,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let mut hasher = blake3::Hasher::new();
    let n = save_body(resp, part, 0, &mut hasher, timeout, limit).await?;
    let got = hasher.finalize();
    if got != want {
        anyhow::bail!(
            "it sent {n} bytes whose BLAKE3 is {}, not the {} of the link",
            got.to_hex(),
            want.to_hex()
        );
    }
    Ok(n)
}

/// Sends the GET to the hub in `url`, over TLS when this hub's door is TLS
/// (the certificate checked as `peer_tls` says: `--cluster-tls-ca`, else the
/// system's roots, as `netkit get` does without flags).
async fn request(
    url: &FileUrl,
    peer_tls: &crate::tls::ClientTlsArgs,
    timeout: Duration,
) -> anyhow::Result<hyper::Response<Incoming>> {
    let tcp = crate::transfer::send::connect_peer(
        &url.authority,
        timeout,
        "the hub",
        "--http on that hub",
    )
    .await?;
    let extra = Some((FETCH_HEADER, "1"));
    if url.tls {
        let tls = peer_tls
            .connect(tcp, &url.authority, &[b"http/1.1"], timeout)
            .await
            .context(
                "TLS with the other hub failed (a hub checks the others' certificates \
                 against --cluster-tls-ca, else the system roots)",
            )?;
        send_get(tls, url, 0, timeout, extra).await
    } else {
        send_get(tcp, url, 0, timeout, extra).await
    }
}

#[cfg(test)]
mod tests {
    use super::dial_addr;

    #[test]
    fn a_door_bound_to_every_address_is_dialled_on_the_hubs_machine() {
        let at = |s: &str| s.parse().unwrap();
        // A door on a named address is dialled as it is.
        assert_eq!(
            dial_addr(at("10.0.0.5:8080"), Some(at("10.0.0.9:7946"))),
            at("10.0.0.5:8080")
        );
        // 0.0.0.0 and :: take the gossip address's IP (another machine).
        assert_eq!(
            dial_addr(at("0.0.0.0:8080"), Some(at("10.0.0.9:7946"))),
            at("10.0.0.9:8080")
        );
        assert_eq!(
            dial_addr(at("[::]:8080"), Some(at("[fd00::2]:7946"))),
            at("[fd00::2]:8080")
        );
        // Unknown or unspecified there too: loopback.
        assert_eq!(dial_addr(at("0.0.0.0:8080"), None), at("127.0.0.1:8080"));
        assert_eq!(
            dial_addr(at("0.0.0.0:8080"), Some(at("0.0.0.0:7946"))),
            at("127.0.0.1:8080")
        );
    }
}

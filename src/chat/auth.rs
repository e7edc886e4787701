//! How a chat user proves who it is: the auth mode ([`AuthMode`]), the
//! application tokens a deployment's backend signs ([`TokenVerifier`], JWT),
//! and the rate limit on password logins ([`LoginLimiter`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

/// Who may chat without logging in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthMode {
    /// Anyone, under any free nick (no accounts).
    #[default]
    Open,
    /// Anyone; a nick may be registered, and then only its owner uses it.
    Accounts,
    /// Only logged-in users (account or application token).
    Required,
}

/// The auth settings of a hub.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Who may chat without logging in.
    pub mode: AuthMode,
    /// Verifies application tokens; `None` refuses them.
    pub tokens: Option<Arc<TokenVerifier>>,
    /// How long a page's session token stays valid.
    pub session_ttl: Duration,
    /// Password logins per minute per account (an address gets four times as many).
    pub logins_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Open,
            tokens: None,
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            logins_per_minute: 5,
        }
    }
}

/// The flags of chat identity, for `netkit serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatAuthArgs {
    /// Who may chat: `open` (anyone, any free nick), `accounts` (nicks may be
    /// registered with /register and are then their owner's), `required`
    /// (only logged-in users).
    #[arg(long, value_enum, default_value_t = AuthMode::Open, env = "NETKIT_CHAT_AUTH")]
    pub chat_auth: AuthMode,
    /// Accept application tokens (JWT, HS256) signed with this secret (32 bytes or more).
    #[arg(
        long,
        env = "NETKIT_CHAT_TOKEN_SECRET",
        conflicts_with = "chat_token_key",
        hide_env_values = true
    )]
    pub chat_token_secret: Option<String>,
    /// Accept application tokens (JWT, RS256 or EdDSA) verified with this PEM public key.
    #[arg(long, env = "NETKIT_CHAT_TOKEN_KEY")]
    pub chat_token_key: Option<std::path::PathBuf>,
    /// How long the page's session token (kept instead of the password) stays valid.
    #[arg(long, default_value = "30d", value_parser = crate::cli::parse_duration, env = "NETKIT_CHAT_SESSION_TTL")]
    pub chat_session_ttl: Duration,
    /// Password login attempts per minute per account (an address gets four times as many).
    #[arg(long, default_value_t = 5, env = "NETKIT_CHAT_LOGINS_PER_MINUTE")]
    pub chat_logins_per_minute: u32,
}

impl ChatAuthArgs {
    /// The auth settings these flags describe (reads the token key file).
    pub fn auth_config(&self) -> anyhow::Result<AuthConfig> {
        let tokens = match (&self.chat_token_secret, &self.chat_token_key) {
            (Some(secret), _) => Some(
                TokenVerifier::from_secret(secret.as_bytes())
                    .map_err(|e| anyhow::anyhow!("--chat-token-secret: {e}"))?,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("cannot read --chat-token-key {}: {e}", path.display())
                })?;
                Some(
                    TokenVerifier::from_public_pem(&pem)
                        .map_err(|e| anyhow::anyhow!("--chat-token-key {}: {e}", path.display()))?,
                )
            }
            (None, None) => None,
        };
        Ok(AuthConfig {
            mode: self.chat_auth,
            tokens: tokens.map(Arc::new),
            session_ttl: self.chat_session_ttl,
            logins_per_minute: self.chat_logins_per_minute,
        })
    }
}

/// Slack allowed on `exp` and `nbf` for clocks that differ a little.
pub const TOKEN_LEEWAY_SECS: u64 = 30;

/// What a valid application token says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TokenClaims {
    /// The nick the user gets.
    pub sub: String,
    /// The only rooms the user may join (absent: any).
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
}

/// Checks application tokens: one key, one algorithm (HS256 with a shared
/// secret, or RS256 / EdDSA with a public key); any other `alg` is refused.
pub struct TokenVerifier {
    key: DecodingKey,
    alg: Algorithm,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("alg", &self.alg)
            .finish()
    }
}

impl TokenVerifier {
    /// HS256 tokens signed with `secret`.
    pub fn from_secret(secret: &[u8]) -> Result<TokenVerifier, String> {
        if secret.len() < 32 {
            return Err("an HS256 secret must be at least 32 bytes".into());
        }
        Ok(TokenVerifier {
            key: DecodingKey::from_secret(secret).map_err(|e| e.to_string())?,
            alg: Algorithm::HS256,
        })
    }

    /// RS256 or EdDSA tokens, by the kind of the PEM public key.
    pub fn from_public_pem(pem: &[u8]) -> Result<TokenVerifier, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(TokenVerifier {
                key,
                alg: Algorithm::RS256,
            });
        }
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(TokenVerifier {
                key,
                alg: Algorithm::EdDSA,
            });
        }
        Err("not an RSA or Ed25519 public key in PEM form".into())
    }

    /// The one algorithm accepted.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The claims of `token` if it is signed with this key and algorithm,
    /// has a `sub`, has not expired and is valid already; else why not.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, String> {
        let alg = header_alg(token)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err("unsigned token (alg \"none\") refused".into());
        }
        let want = format!("{:?}", self.alg);
        if alg != want {
            return Err(format!(
                "token signed with {alg}; this server accepts {want} only"
            ));
        }
        let mut v = Validation::new(self.alg);
        v.leeway = TOKEN_LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        match jsonwebtoken::decode::<TokenClaims>(token, &self.key, &v) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired (its exp is past)".into(),
                ErrorKind::ImmatureSignature => "token not valid yet (its nbf is ahead)".into(),
                ErrorKind::InvalidSignature => {
                    "token signature does not match (forged, or signed with another key)".into()
                }
                ErrorKind::InvalidAlgorithm => format!("token algorithm not accepted: {want} only"),
                ErrorKind::MissingRequiredClaim(c) => format!("token has no '{c}' claim"),
                _ => format!("malformed token: {e}"),
            }),
        }
    }
}

/// The `alg` of a JWT's header, read before any verification.
fn header_alg(token: &str) -> Result<String, String> {
    let bad = || "malformed token: not a JWT (header.payload.signature)".to_string();
    let head = token.split('.').next().ok_or_else(bad)?;
    let bytes = URL_SAFE_NO_PAD.decode(head).map_err(|_| bad())?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    json.get("alg")
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .ok_or_else(|| "malformed token: its header has no alg".into())
}

/// Most buckets kept; beyond it, full ones are forgotten.
const MAX_BUCKETS: usize = 100_000;

/// Password login attempts, limited per account and per address: each
/// attempt takes a token from both buckets, a successful one gives them
/// back. So guessing is slowed to the refill rate, and a user who types the
/// right password is never held back by its own logins.
#[derive(Debug)]
pub struct LoginLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    per_minute: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl LoginLimiter {
    /// `per_minute` attempts a minute (and as many at once) per account, four
    /// times that per address.
    pub fn new(per_minute: u32) -> LoginLimiter {
        LoginLimiter {
            buckets: Mutex::default(),
            per_minute: f64::from(per_minute.max(1)),
        }
    }

    /// Takes an attempt for `account` (a name key) from `addr`, or says how
    /// long to wait.
    pub fn attempt(&self, account: &str, addr: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() > MAX_BUCKETS {
            let cap = self.per_minute * 4.0;
            b.retain(|_, k| refilled(k, now, self.per_minute / 60.0, cap) < cap);
        }
        let keys = keys(account, addr);
        let mut wait = Duration::ZERO;
        for (key, scale) in &keys {
            let (rate, cap) = (self.per_minute * scale / 60.0, self.per_minute * scale);
            let k = b.entry(key.clone()).or_insert(Bucket {
                tokens: cap,
                at: now,
            });
            let have = refilled(k, now, rate, cap);
            if have < 1.0 {
                wait = wait.max(Duration::from_secs_f64((1.0 - have) / rate));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (key, scale) in &keys {
            let (rate, cap) = (self.per_minute * scale / 60.0, self.per_minute * scale);
            if let Some(k) = b.get_mut(key) {
                k.tokens = refilled(k, now, rate, cap) - 1.0;
                k.at = now;
            }
        }
        Ok(())
    }

    /// Gives back the attempt of a login that succeeded.
    pub fn succeeded(&self, account: &str, addr: Option<IpAddr>) {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for (key, scale) in keys(account, addr) {
            if let Some(k) = b.get_mut(&key) {
                k.tokens = (k.tokens + 1.0).min(self.per_minute * scale);
            }
        }
    }
}

/// A bucket's tokens at `now`.
fn refilled(k: &Bucket, now: Instant, rate: f64, cap: f64) -> f64 {
    (k.tokens + now.duration_since(k.at).as_secs_f64() * rate).min(cap)
}

/// The buckets an attempt draws on, with their size relative to the
/// account's: the account, and the address (IPv6 by its /64).
fn keys(account: &str, addr: Option<IpAddr>) -> Vec<(String, f64)> {
    let mut v = vec![(format!("a:{account}"), 1.0)];
    match addr {
        Some(IpAddr::V4(a)) => v.push((format!("i:{a}"), 4.0)),
        Some(IpAddr::V6(a)) => {
            let s = a.segments();
            v.push((
                format!("i:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]),
                4.0,
            ));
        }
        None => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn attempts_are_limited_per_account_and_per_address() {
        let lim = LoginLimiter::new(5);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..5 {
            assert!(lim.attempt("alice", Some(ip)).is_ok());
        }
        let wait = lim.attempt("alice", Some(ip)).unwrap_err();
        assert!(
            wait > Duration::from_secs(11) && wait <= Duration::from_secs(12),
            "{wait:?}"
        );
        // Another account from the same address still may, up to 20 in all.
        for i in 0..15 {
            assert!(lim.attempt(&format!("u{i}"), Some(ip)).is_ok(), "{i}");
        }
        assert!(lim.attempt("bob", Some(ip)).is_err());
        assert!(
            lim.attempt("bob", Some("10.0.0.2".parse().unwrap()))
                .is_ok()
        );
        tokio::time::advance(Duration::from_secs(12)).await;
        assert!(lim.attempt("alice", None).is_ok());
        assert!(lim.attempt("alice", None).is_err());
        // A successful login gives its attempt back.
        lim.succeeded("alice", None);
        assert!(lim.attempt("alice", None).is_ok());
    }
}

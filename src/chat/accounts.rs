//! Registered nicknames in the chat database: the `accounts` table (keyed
//! by the nick's [`name_key`], so that later moderation — operators, bans —
//! can key by it too), argon2id password hashes, and the page's session
//! tokens (`account_sessions`, stored hashed, expiring). Every call blocks
//! (SQLite, argon2): run it on a blocking thread, never on the hub's writer.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use argon2::Params;
use argon2::password_hash::PasswordHash;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::{OsRng, RngCore};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::names::name_key;
use super::passwords::Hasher;
use super::protocol::now_ms;
use super::store::{DB_FILE, StoreError};

/// argon2id memory cost in KiB (19 MiB): the OWASP minimum for argon2id.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// argon2id passes over that memory.
pub const ARGON2_PASSES: u32 = 2;
/// argon2id lanes: one, so one login uses one core.
pub const ARGON2_LANES: u32 = 1;
/// Shortest password accepted at registration, in bytes.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted, in bytes (argon2 takes more, but nobody types it).
pub const MAX_PASSWORD: usize = 1024;

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The nick (or one that looks like it) is registered already.
    #[error("nickname '{0}' is registered already")]
    Exists(String),
    /// Unknown account or wrong password (the two are not told apart).
    #[error("wrong nickname or password")]
    Wrong,
    /// Unknown, expired or forged session token.
    #[error("session token unknown or expired; log in with your password")]
    BadSession,
    /// A password that is too short or too long.
    #[error("a password must be {MIN_PASSWORD} to {MAX_PASSWORD} bytes")]
    BadPassword,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One registered account as hubs share it in broker mode: the nick as
/// registered, its argon2id hash (a PHC string: salt and parameters
/// included, never the password) and when it was registered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    /// The nick as registered (its [`name_key`] is the account's key).
    pub nick: String,
    /// The argon2id PHC string.
    pub password: String,
    /// Milliseconds since the epoch.
    pub created_ms: i64,
}

/// A page session as hubs share it in broker mode: the token's selector,
/// the account it is for, the SHA-256 of its secret (never the secret) and
/// when it expires; `revoked` marks a logout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    /// The token's public part (16 base64url characters).
    pub selector: String,
    /// The account's name key.
    pub account: String,
    /// SHA-256 of the token's secret, base64url.
    pub verifier: String,
    /// Milliseconds since the epoch.
    pub expires_ms: i64,
    /// A logout: the session is forgotten everywhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// Length of a session selector (12 random bytes, base64url).
const SELECTOR_LEN: usize = 16;

/// Furthest in the future a shared session may expire (a year).
const MAX_SESSION_MS: i64 = 366 * 24 * 3600 * 1000;

impl SessionRecord {
    /// Refuses a record that is not one a hub makes.
    pub fn check(&self) -> Result<(), String> {
        if !valid_selector(&self.selector) {
            return Err("bad selector".into());
        }
        if self.revoked {
            return Ok(());
        }
        if self.account.is_empty() || self.account.len() > 4 * super::names::MAX_NICK_CHARS {
            return Err("bad account".into());
        }
        match URL_SAFE_NO_PAD.decode(&self.verifier) {
            Ok(v) if v.len() == 32 => {}
            _ => return Err("bad verifier".into()),
        }
        if self.expires_ms > now_ms().saturating_add(MAX_SESSION_MS) {
            return Err("expires too far ahead".into());
        }
        Ok(())
    }
}

impl SessionRecord {
    /// The logout of session `token` as other hubs read it, if the token
    /// has a selector a hub makes.
    pub fn revocation(token: &str) -> Option<SessionRecord> {
        let selector = token.split_once('.').map_or(token, |(s, _)| s);
        valid_selector(selector).then(|| SessionRecord {
            selector: selector.to_string(),
            account: String::new(),
            verifier: String::new(),
            expires_ms: 0,
            revoked: true,
        })
    }
}

/// Whether `selector` is one [`Accounts::issue_session`] makes.
pub fn valid_selector(selector: &str) -> bool {
    selector.len() == SELECTOR_LEN
        && selector
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Longest PHC string taken from another hub.
const MAX_PHC: usize = 256;
/// Most argon2 passes and lanes a hash from another hub may ask for (the
/// memory is bounded where hashes are checked).
const MAX_REMOTE_PASSES: u32 = 16;
const MAX_REMOTE_LANES: u32 = 8;

impl AccountRecord {
    /// Refuses a record that is not one a hub makes: an invalid nick, or a
    /// hash that is not argon2id or asks for more than a login should cost.
    pub fn check(&self) -> Result<(), String> {
        super::names::check_nick(&self.nick).map_err(|e| format!("bad nick: {e}"))?;
        if self.password.len() > MAX_PHC {
            return Err("password hash too long".into());
        }
        let phc =
            PasswordHash::new(&self.password).map_err(|e| format!("bad password hash: {e}"))?;
        if phc.algorithm != argon2::Algorithm::Argon2id.ident()
            || phc.salt.is_none()
            || phc.hash.is_none()
        {
            return Err("not an argon2id hash".into());
        }
        let params = Params::try_from(&phc).map_err(|e| format!("bad argon2 parameters: {e}"))?;
        if params.m_cost() > super::passwords::MAX_MEMORY_KIB
            || params.t_cost() > MAX_REMOTE_PASSES
            || params.p_cost() > MAX_REMOTE_LANES
        {
            return Err("argon2 parameters beyond what a login may cost".into());
        }
        Ok(())
    }
}

/// The registered accounts and their sessions.
pub struct Accounts {
    conn: Mutex<Connection>,
    path: PathBuf,
    hasher: Hasher,
    session_ttl: Duration,
    /// A hash checked when the account does not exist, so that a login
    /// takes as long for an unknown nick as for a wrong password.
    decoy: OnceLock<String>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("path", &self.path)
            .finish()
    }
}

impl Accounts {
    /// Opens (creating the tables if needed) the accounts in `dir`'s chat
    /// database; sessions last `session_ttl`.
    pub fn open_in(dir: &Path, session_ttl: Duration) -> Result<Accounts, StoreError> {
        let path = dir.join(DB_FILE);
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS accounts (
                 key TEXT PRIMARY KEY,
                 nick TEXT NOT NULL,
                 password TEXT NOT NULL,
                 created_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS account_sessions (
                 selector TEXT PRIMARY KEY,
                 account TEXT NOT NULL,
                 verifier BLOB NOT NULL,
                 expires_ms INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        conn.execute(
            "DELETE FROM account_sessions WHERE expires_ms <= ?1",
            params![now_ms()],
        )
        .map_err(err)?;
        let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, None)
            .expect("fixed argon2 parameters are valid");
        Ok(Accounts {
            conn: Mutex::new(conn),
            path,
            hasher: Hasher::new(params),
            session_ttl,
            decoy: OnceLock::new(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys of every registered nick.
    pub fn registered_keys(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT key FROM accounts")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Registers `nick` with `password` (hashed with argon2id and a fresh
    /// random salt); refuses a nick whose key is registered already.
    pub fn register(&self, nick: &str, password: &str) -> Result<(), AccountError> {
        let record = self.new_record(nick, password)?;
        if !self.insert(&record)? {
            return Err(AccountError::Exists(nick.to_string()));
        }
        Ok(())
    }

    /// The account `nick` would be with `password` (hashed with argon2id
    /// and a fresh random salt), not stored.
    pub fn new_record(&self, nick: &str, password: &str) -> Result<AccountRecord, AccountError> {
        check_password(password)?;
        let hash = self
            .hasher
            .hash(password.as_bytes())
            .expect("argon2 hashes any password within the length limit");
        Ok(AccountRecord {
            nick: nick.to_string(),
            password: hash,
            created_ms: now_ms(),
        })
    }

    /// Stores `record` unless its key is registered already; true if stored.
    pub fn insert(&self, record: &AccountRecord) -> Result<bool, AccountError> {
        let inserted = self
            .conn()
            .execute(
                "INSERT OR IGNORE INTO accounts (key, nick, password, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    name_key(&record.nick),
                    record.nick,
                    record.password,
                    record.created_ms
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(inserted > 0)
    }

    /// The account whose key is `nick`'s, if registered.
    pub fn get(&self, nick: &str) -> Result<Option<AccountRecord>, AccountError> {
        self.conn()
            .query_row(
                "SELECT nick, password, created_ms FROM accounts WHERE key = ?1",
                params![name_key(nick)],
                account_row,
            )
            .optional()
            .map_err(|e| self.err(e).into())
    }

    /// Every registered account, oldest first.
    pub fn all(&self) -> Result<Vec<AccountRecord>, AccountError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT nick, password, created_ms FROM accounts ORDER BY created_ms, key")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], account_row).map_err(|e| self.err(e))?;
        Ok(rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?)
    }

    /// Checks `password` for the account of `nick` (any name with its key);
    /// returns the nick as registered.
    pub fn verify(&self, nick: &str, password: &str) -> Result<String, AccountError> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT nick, password FROM accounts WHERE key = ?1",
                params![name_key(nick)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let too_long = password.len() > MAX_PASSWORD;
        let (registered, phc) = match row {
            Some((n, phc)) if !too_long => (Some(n), phc),
            _ => (None, self.decoy().to_string()),
        };
        let parsed = PasswordHash::new(&phc).map_err(|_| AccountError::Wrong)?;
        let ok = self.hasher.verify(password.as_bytes(), &parsed);
        match registered {
            Some(n) if ok => Ok(n),
            _ => Err(AccountError::Wrong),
        }
    }

    /// A hash of a random password, made once.
    fn decoy(&self) -> &str {
        self.decoy.get_or_init(|| {
            let mut pw = [0u8; 16];
            OsRng.fill_bytes(&mut pw);
            self.hasher.hash(&pw).expect("argon2 hashes 16 bytes")
        })
    }

    /// Issues a session token for the account of `nick`: `SELECTOR.SECRET`,
    /// of which only the SHA-256 of the secret is stored. Returns the token
    /// and the session as other hubs store it (with when it expires).
    pub fn issue_session(&self, nick: &str) -> Result<(String, SessionRecord), AccountError> {
        let mut selector = [0u8; 12];
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut selector);
        OsRng.fill_bytes(&mut secret);
        let selector = URL_SAFE_NO_PAD.encode(selector);
        let verifier = Sha256::digest(secret).to_vec();
        let ttl = i64::try_from(self.session_ttl.as_millis()).unwrap_or(i64::MAX);
        let expires = now_ms().saturating_add(ttl);
        self.conn()
            .execute(
                "INSERT INTO account_sessions (selector, account, verifier, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![selector, name_key(nick), verifier, expires],
            )
            .map_err(|e| self.err(e))?;
        let record = SessionRecord {
            account: name_key(nick),
            verifier: URL_SAFE_NO_PAD.encode(&verifier),
            expires_ms: expires,
            revoked: false,
            selector: selector.clone(),
        };
        Ok((
            format!("{selector}.{}", URL_SAFE_NO_PAD.encode(secret)),
            record,
        ))
    }

    /// Stores (or, revoked, forgets) a session another hub issued.
    pub fn apply_session(&self, record: &SessionRecord) -> Result<(), AccountError> {
        if record.revoked || record.expires_ms <= now_ms() {
            return self.revoke_session(&record.selector);
        }
        let verifier = URL_SAFE_NO_PAD
            .decode(&record.verifier)
            .map_err(|_| AccountError::BadSession)?;
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO account_sessions (selector, account, verifier, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![record.selector, record.account, verifier, record.expires_ms],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The nick whose session `token` is, if it is known and not expired;
    /// the secret is compared in constant time.
    pub fn check_session(&self, token: &str) -> Result<String, AccountError> {
        let (selector, secret) = token.split_once('.').ok_or(AccountError::BadSession)?;
        let secret = URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| AccountError::BadSession)?;
        let row: Option<(String, Vec<u8>, i64)> = self
            .conn()
            .query_row(
                "SELECT a.nick, s.verifier, s.expires_ms FROM account_sessions s
                 JOIN accounts a ON a.key = s.account WHERE s.selector = ?1",
                params![selector],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((nick, verifier, expires)) = row else {
            return Err(AccountError::BadSession);
        };
        let digest = Sha256::digest(&secret);
        if !bool::from(digest.as_slice().ct_eq(&verifier)) || expires <= now_ms() {
            return Err(AccountError::BadSession);
        }
        Ok(nick)
    }

    /// Forgets the session `token` (logging out); unknown tokens are ignored.
    pub fn revoke_session(&self, token: &str) -> Result<(), AccountError> {
        let selector = token.split_once('.').map_or(token, |(s, _)| s);
        self.conn()
            .execute(
                "DELETE FROM account_sessions WHERE selector = ?1",
                params![selector],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// An account from a row of `nick, password, created_ms`.
fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRecord> {
    Ok(AccountRecord {
        nick: r.get(0)?,
        password: r.get(1)?,
        created_ms: r.get(2)?,
    })
}

/// Refuses a password shorter than [`MIN_PASSWORD`] or longer than [`MAX_PASSWORD`] bytes.
pub fn check_password(password: &str) -> Result<(), AccountError> {
    if (MIN_PASSWORD..=MAX_PASSWORD).contains(&password.len()) {
        Ok(())
    } else {
        Err(AccountError::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_verify_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let acc = Accounts::open_in(dir.path(), Duration::from_secs(60)).unwrap();
        acc.register("Alice", "correct horse").unwrap();
        assert!(matches!(
            acc.register("ALICE", "another one"),
            Err(AccountError::Exists(_))
        ));
        assert_eq!(acc.verify("alice", "correct horse").unwrap(), "Alice");
        assert!(matches!(
            acc.verify("alice", "wrong pass"),
            Err(AccountError::Wrong)
        ));
        assert!(matches!(
            acc.verify("nobody", "correct horse"),
            Err(AccountError::Wrong)
        ));
        assert!(matches!(
            acc.register("bob", "short"),
            Err(AccountError::BadPassword)
        ));
        // The stored hash is argon2id with its own salt, never the password.
        let phc: String = acc
            .conn()
            .query_row("SELECT password FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct horse"));

        let (token, session) = acc.issue_session("alice").unwrap();
        let expires = session.expires_ms;
        assert!(expires > now_ms());
        assert_eq!(acc.check_session(&token).unwrap(), "Alice");
        let (sel, _) = token.split_once('.').unwrap();
        let forged = format!("{sel}.{}", URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert!(matches!(
            acc.check_session(&forged),
            Err(AccountError::BadSession)
        ));
        acc.revoke_session(&token).unwrap();
        assert!(matches!(
            acc.check_session(&token),
            Err(AccountError::BadSession)
        ));
    }
}

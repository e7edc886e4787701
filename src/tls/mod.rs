//! TLS for every door, one module: the server acceptor (PEM files or a self-signed
//! certificate, reloaded when the files change or on SIGHUP, a handshake timeout, a
//! clear answer to plaintext) and the client configuration (system roots, a CA file,
//! a pinned fingerprint, or loudly insecure) with errors that name the problem.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::parse_duration;

/// A connection accepted on a door: TLS when the door has a certificate, plain otherwise.
pub type ServerStream =
    tokio_util::either::Either<tokio_rustls::server::TlsStream<TcpStream>, TcpStream>;

/// The TLS stream a client gets from [`connect`].
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The one crypto provider: ring (small, builds everywhere, no C toolchain beyond cc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 fingerprint of a DER certificate, as colon-separated upper-case hex
/// (`AB:CD:…`), the form `--tls-pin` takes and `openssl x509 -fingerprint -sha256` prints.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Parses a `--tls-pin`: 64 hex digits, colons and a `sha256:` prefix allowed.
pub fn parse_pin(pin: &str) -> anyhow::Result<[u8; 32]> {
    let t = pin.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "--tls-pin '{pin}' is not a SHA-256 fingerprint; give the 64 hex digits the server logged (AB:CD:… or abcd…)"
        );
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// TLS flags of a server door (`netkit serve`, `netkit tcp serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain (leaf first): turns the door(s) into TLS. Needs --tls-key.
    #[arg(long, env = "NETKIT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, RSA or EC).
    #[arg(long, env = "NETKIT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Longest time a client may take to complete the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "NETKIT_TLS_HANDSHAKE_TIMEOUT")]
    pub tls_handshake_timeout: Duration,
    /// How often the certificate files are checked for changes (SIGHUP reloads at once).
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "NETKIT_TLS_RELOAD_INTERVAL")]
    pub tls_reload_interval: Duration,
}

/// The certificate and key files of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl ServerTlsArgs {
    /// The files given with `--tls-cert`/`--tls-key`, if any.
    pub fn files(&self) -> Option<CertFiles> {
        Some(CertFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }

    /// The acceptor for `files`, its reload watcher spawned until `shutdown`.
    pub fn acceptor(
        &self,
        files: &CertFiles,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<TlsAcceptor> {
        let acceptor = TlsAcceptor::from_files(files, self.tls_handshake_timeout)?;
        tokio::spawn(acceptor.clone().watch(
            files.clone(),
            self.tls_reload_interval,
            shutdown.clone(),
        ));
        Ok(acceptor)
    }
}

/// Reads a PEM certificate chain and key into a key rustls can serve.
pub fn load_certified_key(files: &CertFiles) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("cannot read certificate {}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", files.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        anyhow::anyhow!(
            "cannot read a private key (PKCS#8, RSA or EC PEM) from {}: {e}",
            files.key.display()
        )
    })?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        anyhow::anyhow!(
            "{} and {} do not make a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })
}

/// Hands the current certificate to every new handshake; swapped on reload.
#[derive(Debug)]
struct CurrentKey(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Why a TLS handshake on a door failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client did not finish the handshake within the timeout.
    #[error("TLS handshake not finished within {0:?}; closed")]
    Timeout(Duration),
    /// The client spoke plaintext (HTTP when `http`) to the TLS port.
    #[error("the client spoke plaintext{} to this TLS port; told it and closed", if *.http { " HTTP" } else { "" })]
    Plaintext {
        /// The first bytes looked like an HTTP request.
        http: bool,
    },
    /// The client closed before saying anything.
    #[error("the client closed before the TLS handshake")]
    Closed,
    /// The handshake itself failed (bad records, no common protocol, …).
    #[error("TLS handshake failed: {0}")]
    Tls(#[from] io::Error),
}

/// The one TLS acceptor of every door: a rustls server configuration whose
/// certificate can be replaced while it runs, and a handshake timeout.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    key: Arc<CurrentKey>,
    timeout: Duration,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("fingerprint", &self.fingerprint())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TlsAcceptor {
    /// An acceptor serving `key`, giving each handshake `timeout`.
    pub fn new(key: CertifiedKey, timeout: Duration) -> Self {
        let key = Arc::new(CurrentKey(RwLock::new(Arc::new(key))));
        Self::with_key(key, timeout, Vec::new())
    }

    fn with_key(key: Arc<CurrentKey>, timeout: Duration, alpn: Vec<Vec<u8>>) -> Self {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_cert_resolver(key.clone());
        config.alpn_protocols = alpn;
        TlsAcceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            key,
            timeout,
        }
    }

    /// An acceptor for the PEM files, logging the certificate's fingerprint.
    pub fn from_files(files: &CertFiles, timeout: Duration) -> anyhow::Result<Self> {
        let acceptor = Self::new(load_certified_key(files)?, timeout);
        acceptor.log_identity(&files.cert);
        Ok(acceptor)
    }

    /// The same certificate (and its reloads), offering these ALPN protocols.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> Self {
        let alpn = protocols.iter().map(|p| p.to_vec()).collect();
        Self::with_key(self.key.clone(), self.timeout, alpn)
    }

    /// The SHA-256 fingerprint of the leaf certificate served now.
    pub fn fingerprint(&self) -> String {
        let key = self.key.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        key.cert.first().map(|c| fingerprint(c)).unwrap_or_default()
    }

    /// Base64 SHA-256 of the served key's SubjectPublicKeyInfo (what browsers'
    /// `--ignore-certificate-errors-spki-list` and HPKP-style pins take).
    pub fn spki_hash(&self) -> Option<String> {
        let key = self.key.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        let spki = key.key.public_key()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
        Some(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
    }

    fn log_identity(&self, from: &Path) {
        info!(
            cert = %from.display(),
            spki_sha256 = self.spki_hash().unwrap_or_default(),
            "tls: certificate SHA-256 fingerprint {} (clients may --tls-pin it)",
            self.fingerprint()
        );
    }

    /// Replaces the certificate with the one in `files`; handshakes from now on
    /// get it, established connections keep theirs. On error the old one stays.
    pub fn reload(&self, files: &CertFiles) -> anyhow::Result<()> {
        let key = load_certified_key(files)?;
        *self.key.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        self.log_identity(&files.cert);
        Ok(())
    }

    /// Reloads when the files' modification times change (checked every
    /// `interval`) or on SIGHUP, until `shutdown`.
    /// The SIGHUP handler is installed before this returns (so a SIGHUP right
    /// after start reloads rather than ends the process); call it in a runtime.
    pub fn watch(
        self,
        files: CertFiles,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        #[cfg(unix)]
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        #[cfg(not(unix))]
        let hup = None::<()>;
        self.watch_with(files, interval, hup, shutdown)
    }

    async fn watch_with(
        self,
        files: CertFiles,
        interval: Duration,
        #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
        #[cfg(not(unix))] _hup: Option<()>,
        shutdown: CancellationToken,
    ) {
        let stamp = |f: &CertFiles| -> Option<(SystemTime, SystemTime)> {
            let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            Some((m(&f.cert)?, m(&f.key)?))
        };
        let mut seen = stamp(&files);
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                _ = sighup => true,
            };
            let now = stamp(&files);
            if !forced && (now == seen || now.is_none()) {
                continue;
            }
            seen = now;
            match self.reload(&files) {
                Ok(()) => info!("tls: certificate reloaded; new connections get it"),
                Err(e) => {
                    error!("tls: reload failed, still serving the previous certificate: {e:#}")
                }
            }
        }
    }

    /// Runs the server side of the handshake on `stream`, bounded by the
    /// timeout. A client that speaks plaintext is told so (a 400 answer to an
    /// HTTP request, an `ERR` line otherwise) and closed.
    pub async fn accept(
        &self,
        mut stream: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, HandshakeError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = |_| HandshakeError::Timeout(self.timeout);
        let mut first = [0u8; 1];
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .map_err(timed_out)??;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        // Every TLS connection opens with a handshake record (content type 22).
        if first[0] != 0x16 {
            let http = first[0].is_ascii_uppercase();
            let answer: &[u8] = if http {
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 46\r\n\r\nthis port speaks TLS: use https:// or wss://\r\n"
            } else {
                b"ERR this port speaks TLS: connect with a TLS client (netkit chat tls://, openssl s_client)\n"
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
            let _ = stream.shutdown().await;
            return Err(HandshakeError::Plaintext { http });
        }
        let r = tokio::time::timeout_at(deadline, self.inner.accept(stream))
            .await
            .map_err(timed_out)?;
        Ok(r?)
    }

    /// [`accept`](Self::accept), counting and logging a failure (at debug for
    /// a client that merely went away) under `door`.
    pub async fn accept_logged(
        &self,
        stream: TcpStream,
        door: &'static str,
    ) -> Option<ServerStream> {
        match self.accept(stream).await {
            Ok(s) => Some(tokio_util::either::Either::Left(s)),
            Err(e) => {
                metrics::counter!("netkit_tls_handshake_failures_total", "door" => door)
                    .increment(1);
                match e {
                    HandshakeError::Closed => tracing::debug!("{door}: {e}"),
                    _ => warn!("{door}: {e}"),
                }
                None
            }
        }
    }
}

/// `--tls-self-signed` and the names it covers (`netkit serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct SelfSignedArgs {
    /// Generate (once; reused on restart) a self-signed certificate under
    /// <data-dir>/tls/ and serve TLS with it; its fingerprint is logged for --tls-pin.
    #[arg(long, env = "NETKIT_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// Host names (or addresses) the self-signed certificate is for, comma-separated;
    /// localhost, 127.0.0.1 and ::1 are always in it.
    #[arg(long, value_delimiter = ',', env = "NETKIT_TLS_NAME")]
    pub tls_name: Vec<String>,
}

impl SelfSignedArgs {
    /// The names for the certificate: `--tls-name`, plus the host of each
    /// listen address that names one host (not 0.0.0.0 or ::).
    pub fn names(&self, listen: &[&str]) -> Vec<String> {
        let mut names = self.tls_name.clone();
        for addr in listen {
            let host = host_of(addr);
            let any = host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified());
            if !host.is_empty() && !any {
                names.push(host.to_string());
            }
        }
        names
    }
}

/// The TLS acceptor of `netkit serve`'s doors: from `--tls-cert/--tls-key`, or a
/// self-signed certificate under `<data_dir>/tls/` for `listen`'s hosts; `None`
/// when neither is asked for. Its reload watcher runs until `shutdown`.
pub fn serve_acceptor(
    files: &ServerTlsArgs,
    self_signed: &SelfSignedArgs,
    data_dir: &Path,
    listen: &[&str],
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<TlsAcceptor>> {
    let cert_files = match files.files() {
        Some(f) => f,
        None if self_signed.tls_self_signed => {
            crate::tls::self_signed(&data_dir.join("tls"), &self_signed.names(listen))?
        }
        None => return Ok(None),
    };
    Ok(Some(files.acceptor(&cert_files, shutdown)?))
}

/// The self-signed certificate under `dir` (`cert.pem`, `key.pem` with mode
/// 0600): made for `names` plus localhost, 127.0.0.1 and ::1 if missing, reused if there.
pub fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<CertFiles> {
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create {} — check --data-dir", dir.display()))?;
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        let n = n.trim();
        if !n.is_empty() && !all.iter().any(|a| a.eq_ignore_ascii_case(n)) {
            all.push(n.to_string());
        }
    }
    let key = rcgen::KeyPair::generate().context("cannot generate a key pair")?;
    let mut params = rcgen::CertificateParams::new(all.clone())
        .with_context(|| format!("cannot make a certificate for {all:?}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "netkit self-signed");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(3600));
    params.not_after = epoch + now + Duration::from_secs(5 * 365 * 24 * 3600);
    let cert = params
        .self_signed(&key)
        .context("cannot sign the certificate")?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem())
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    info!(names = ?all, dir = %dir.display(), "tls: generated a self-signed certificate");
    Ok(files)
}

/// Writes a secret file readable by its owner only (created with mode 0600).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// The client side: roots, a private CA, a pin, and errors that name the problem.
mod client;
pub use client::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_both_forms() {
        let der = b"some certificate";
        let fp = fingerprint(der);
        let a = parse_pin(&fp).unwrap();
        let b = parse_pin(&format!("sha256:{}", fp.replace(':', "").to_lowercase())).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.as_ref(),
            ring::digest::digest(&ring::digest::SHA256, der).as_ref()
        );
        assert!(parse_pin("AB:CD").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("example.org:443"), "example.org");
        assert_eq!(host_of("[::1]:8330"), "::1");
        assert_eq!(host_of("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn self_signed_is_made_once_and_its_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path(), &["chat.example".into()]).unwrap();
        let first = std::fs::read(&files.cert).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = self_signed(dir.path(), &[]).unwrap();
        assert_eq!(again, files);
        assert_eq!(std::fs::read(&files.cert).unwrap(), first);
        assert!(load_certified_key(&files).is_ok());
    }
}

//! TLS clients: verification against the system roots, a private CA or one
//! pinned certificate, and connection errors that name the problem.

use super::*;

/// How a client checks the server's certificate.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// Trust the CA certificate(s) in this PEM file instead of the system roots.
    #[arg(long, env = "NETKIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Accept exactly the certificate with this SHA-256 fingerprint (what a
    /// `--tls-self-signed` server logs), whatever its issuer, names or dates.
    #[arg(long, env = "NETKIT_TLS_PIN", conflicts_with = "tls_ca")]
    pub tls_pin: Option<String>,
    /// Accept any certificate: encrypts but does NOT authenticate the server
    /// (anyone in the path can read and change the traffic). Testing only.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_pin"])]
    pub tls_insecure: bool,
}

impl ClientTlsArgs {
    /// The client configuration these flags ask for.
    pub fn config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions");
        let config = if self.tls_insecure {
            warn!(
                "--tls-insecure: the server's certificate is NOT checked; the connection is encrypted but anyone in the path can impersonate the server"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier::new(None)))
                .with_no_client_auth()
        } else if let Some(pin) = &self.tls_pin {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier::new(Some(parse_pin(pin)?))))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(self.roots()?)
                .with_no_client_auth()
        };
        Ok(Arc::new(config))
    }

    /// The TLS client handshake over `tcp` with the server at `addr`
    /// (`host:port`, the host checked against the certificate), offering `alpn`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: &str,
        alpn: &[&[u8]],
        timeout: Duration,
    ) -> anyhow::Result<ClientStream> {
        let mut config = Arc::unwrap_or_clone(self.config()?);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        connect(tcp, host_of(addr), Arc::new(config), timeout).await
    }

    fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.tls_ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read the CA file {}", ca.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("the CA file {} is not PEM", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("the CA file {} holds no usable certificate", ca.display());
            }
            return Ok(roots);
        }
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!("tls: system roots: {e}");
        }
        roots.add_parsable_certificates(native.certs);
        if roots.is_empty() {
            bail!(
                "no system root certificates found (install ca-certificates) — or pass --tls-ca FILE or --tls-pin SHA256"
            );
        }
        Ok(roots)
    }
}

/// Checks only that the server's leaf certificate has the pinned fingerprint
/// (or, with no pin, nothing: `--tls-insecure`); handshake signatures are still verified.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    fn new(pin: Option<[u8; 32]>) -> Self {
        PinVerifier {
            pin,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = &self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if got.as_ref() == pin {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "pin mismatch: the server's certificate is {}, not the pinned {}",
            fingerprint(end_entity),
            pin.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host part of `host:port` or `[v6]:port`, for the certificate check.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The TLS client handshake over `tcp` for `host`, bounded by `timeout`;
/// an error says what was wrong (expired, wrong host name, unknown issuer,
/// pin mismatch, not a TLS port).
pub async fn connect(
    tcp: TcpStream,
    host: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> anyhow::Result<ClientStream> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| {
        anyhow::anyhow!("'{host}' is not a host name or address to check a certificate against")
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => bail!(
            "TLS handshake with {host} not finished within {} — is this a TLS port?",
            humantime::format_duration(timeout)
        ),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(anyhow::anyhow!(describe_client_error(host, &e))),
    }
}

/// A user-facing sentence for a failed client handshake with `host`.
pub fn describe_client_error(host: &str, e: &io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!(
            "TLS handshake with {host} failed: {e} — is this a TLS port (the server may speak plaintext)?"
        );
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => {
                format!("the certificate of {host} has expired ({c:?}) — the server must renew it")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("the certificate of {host} is not valid yet — check both clocks")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "wrong host name: the certificate of the server is not valid for '{host}' ({c:?}) — connect by a name it holds"
            ),
            C::UnknownIssuer => format!(
                "the certificate of {host} is signed by an unknown issuer (self-signed or a private CA) — pass --tls-ca FILE, or --tls-pin with the fingerprint the server logged"
            ),
            other => format!("the certificate of {host} is not acceptable: {other:?}"),
        },
        rustls::Error::General(msg) => format!("{host}: {msg}"),
        rustls::Error::InvalidMessage(_) => format!(
            "{host} did not answer with TLS ({tls}) — is this a plaintext port? drop the TLS option or use its TLS port"
        ),
        other => format!("TLS handshake with {host} failed: {other}"),
    }
}

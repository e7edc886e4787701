//! TLS on the doors, with real handshakes on port 0: HTTPS, WSS, TLS line chat
//! and the TCP line service against rustls clients; pinning; plaintext against
//! TLS and TLS against plaintext; stalled and garbage handshakes; certificate
//! reload under a connected client; expired and wrong-host certificates.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use netkit::chat::hub::{Hub, HubConfig};
use netkit::chat::{ConnConfig, line};
use netkit::http::{self, HttpConfig};
use netkit::net::door::Door;
use netkit::net::limit::PerIpLimit;
use netkit::tls::{CertFiles, ClientTlsArgs, TlsAcceptor};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The longest any single wait in these tests.
const T: Duration = Duration::from_secs(10);

/// Makes `params` valid from `from` to `until`, in days from now.
fn valid(params: &mut rcgen::CertificateParams, from: i64, until: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |days: i64| Duration::from_secs((now + days * 86_400) as u64);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + at(from);
    params.not_after = epoch + at(until);
}

/// Writes a certificate for `names`, valid from `from` to `until` (days from
/// now), issued by a fresh CA: `<stem>.pem`, `<stem>.key` and the CA as `<stem>-ca.pem`.
fn cert(dir: &Path, stem: &str, names: &[&str], from: i64, until: i64) -> CertFiles {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {stem}"));
    valid(&mut ca_params, -2, 365);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    valid(&mut params, from, until);
    let c = params.signed_by(&key, &ca).unwrap();
    let files = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&files.cert, c.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}-ca.pem")), ca.pem()).unwrap();
    files
}

fn fingerprint_of(files: &CertFiles) -> String {
    let pem = std::fs::read_to_string(&files.cert).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    netkit::tls::fingerprint(&der)
}

use rustls_pki_types::pem::PemObject;

/// Trusts the CA that issued `files`.
fn trusting(files: &CertFiles) -> ClientTlsArgs {
    let stem = files.cert.file_stem().unwrap().to_string_lossy();
    ClientTlsArgs {
        tls_ca: Some(files.cert.with_file_name(format!("{stem}-ca.pem"))),
        ..ClientTlsArgs::default()
    }
}

fn pinned(pin: &str) -> ClientTlsArgs {
    ClientTlsArgs {
        tls_pin: Some(pin.to_string()),
        ..ClientTlsArgs::default()
    }
}

/// A hub with its HTTP and line doors on port 0, both speaking TLS with `tls`.
struct Doors {
    http: SocketAddr,
    chat: SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Doors {
    async fn start(tls: Option<TlsAcceptor>, chat_per_ip: PerIpLimit) -> Doors {
        let dir = tempfile::tempdir().unwrap();
        let (hub, _writer) = Hub::open(dir.path(), HubConfig::default()).unwrap();
        let hl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http, chat) = (hl.local_addr().unwrap(), cl.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let cfg = HttpConfig {
            door: Door::new("http", tls.as_ref().map(|t| t.with_alpn(&[b"http/1.1"])), 0),
            ..HttpConfig::default()
        };
        let s = shutdown.clone();
        let h = hub.clone();
        tokio::spawn(async move { http::run(hl, h, cfg, None, s).await.unwrap() });
        let door = Door {
            per_ip: chat_per_ip,
            ..Door::new("chat", tls, 0)
        };
        tokio::spawn(line::run(
            cl,
            hub,
            ConnConfig::default(),
            door,
            shutdown.clone(),
        ));
        Doors {
            http,
            chat,
            shutdown,
            _dir: dir,
        }
    }
}

impl Drop for Doors {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn acceptor(files: &CertFiles) -> TlsAcceptor {
    TlsAcceptor::from_files(files, Duration::from_millis(500)).unwrap()
}

async fn tls_to(
    addr: SocketAddr,
    args: &ClientTlsArgs,
) -> anyhow::Result<netkit::tls::ClientStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    args.connect(tcp, &addr.to_string(), &[], T).await
}

/// `GET path` over HTTP/1.0 on `s`; the whole answer.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: S, path: &str) -> String {
    // HTTP/1.0 without a Host header: served (only a wrong Host is refused).
    get_as(s, path, None).await
}

/// `GET path` over HTTP/1.0 on `s` with `Host: host` when given; the whole answer.
async fn get_as<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    path: &str,
    host: Option<SocketAddr>,
) -> String {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.0\r\n{host}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The next line from a line-chat reader, within the deadline.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut s = String::new();
    tokio::time::timeout(T, r.read_line(&mut s))
        .await
        .unwrap()
        .unwrap();
    s
}

/// Reads lines until one contains `needle`.
async fn line_with<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, needle: &str) -> String {
    loop {
        let l = next_line(r).await;
        assert!(!l.is_empty(), "stream ended before a line with {needle:?}");
        if l.contains(needle) {
            return l;
        }
    }
}

/// Joins `room` on a line-chat connection, says `text` there and waits until it comes back.
async fn say_in_room<R, W>(rd: &mut R, wr: &mut W, room: &str, text: &str)
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(format!("/join {room}\n").as_bytes())
        .await
        .unwrap();
    line_with(rd, "joined").await;
    wr.write_all(format!("{text}\n").as_bytes()).await.unwrap();
    line_with(rd, text).await;
}

#[tokio::test]
async fn https_answers_with_security_headers_and_hsts() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["localhost", "127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let s = tls_to(doors.http, &trusting(&files)).await.unwrap();
    let answer = get_as(s, "/", Some(doors.http)).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    for h in [
        "strict-transport-security: max-age=",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "frame-ancestors 'none'",
        "connect-src 'self' wss://127.0.0.1",
    ] {
        assert!(lower.contains(h), "missing {h} in {answer}");
    }
    assert!(!lower.contains("unsafe-inline"));
    // The page itself has no inline script for the CSP to block.
    assert!(!answer.contains("<script>"), "inline script in the page");
}

#[tokio::test]
async fn plain_http_has_the_headers_but_no_hsts() {
    let doors = Doors::start(None, PerIpLimit::unlimited("chat")).await;
    let answer = get(TcpStream::connect(doors.http).await.unwrap(), "/healthz").await;
    let lower = answer.to_ascii_lowercase();
    // Not a page: a policy that loads nothing.
    assert!(
        lower.contains("content-security-policy: default-src 'none'; frame-ancestors 'none'\r\n"),
        "{answer}"
    );
    assert!(lower.contains("x-content-type-options: nosniff"));
    assert!(!lower.contains("strict-transport-security"), "{answer}");
}

#[tokio::test]
async fn websocket_over_tls_chats() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let tcp = TcpStream::connect(doors.http).await.unwrap();
    let tls = trusting(&files)
        .connect(tcp, &doors.http.to_string(), &[b"http/1.1"], T)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://{}/ws?nick=ann", doors.http);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let join = r#"{"type":"join","room":"tls"}"#;
    ws.send(Message::Text(join.into())).await.unwrap();
    let say = r#"{"type":"say","room":"tls","text":"over tls"}"#;
    ws.send(Message::Text(say.into())).await.unwrap();
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m
            && t.contains("over tls")
        {
            break;
        }
    }
}

#[tokio::test]
async fn the_origin_allow_list_applies_to_wss() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let open = |origin: String| {
        let files = files.clone();
        let http = doors.http;
        async move {
            let tcp = TcpStream::connect(http).await.unwrap();
            let tls = trusting(&files)
                .connect(tcp, &http.to_string(), &[b"http/1.1"], T)
                .await
                .unwrap();
            let mut req = format!("wss://{http}/ws").into_client_request().unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            tokio_tungstenite::client_async(req, tls).await.map(|_| ())
        }
    };
    assert!(open(format!("https://{}", doors.http)).await.is_ok());
    let refused = open("https://evil.example".into()).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
}

#[tokio::test]
async fn line_chat_over_tls_and_a_pinned_client() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["chat.example"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    // Pinned: names and issuer do not matter, the fingerprint does.
    let s = tls_to(doors.chat, &pinned(&fingerprint_of(&files)))
        .await
        .unwrap();
    let (rd, mut wr) = tokio::io::split(s);
    let mut rd = BufReader::new(rd);
    line_with(&mut rd, "welcome").await;
    say_in_room(&mut rd, &mut wr, "lobby", "hello tls").await;
    // Another fingerprint is refused, and the error says so.
    let other = cert(dir.path(), "o", &["chat.example"], -1, 30);
    let e = tls_to(doors.chat, &pinned(&fingerprint_of(&other)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pin mismatch"), "{e}");
}

#[tokio::test]
async fn plaintext_to_a_tls_port_is_told_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let answer = get(TcpStream::connect(doors.http).await.unwrap(), "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("this port speaks TLS"), "{answer}");
    let mut plain = TcpStream::connect(doors.chat).await.unwrap();
    plain.write_all(b"/nick x\n").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(T, plain.read_to_string(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got.starts_with("ERR this port speaks TLS"), "{got}");
    // Both doors still serve TLS clients.
    assert!(tls_to(doors.chat, &trusting(&files)).await.is_ok());
    let s = tls_to(doors.http, &trusting(&files)).await.unwrap();
    assert!(get(s, "/healthz").await.starts_with("HTTP/1.0 200"));
}

#[tokio::test]
async fn tls_to_a_plaintext_port_is_a_clear_client_error() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(None, PerIpLimit::unlimited("chat")).await;
    for addr in [doors.chat, doors.http] {
        let e = tls_to(addr, &trusting(&files))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plaintext port") || e.contains("is this a TLS port"),
            "{e}"
        );
    }
    // And the plaintext doors go on.
    let answer = get(TcpStream::connect(doors.http).await.unwrap(), "/healthz").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

/// True when the server closes `s` (EOF or reset) within the deadline.
async fn closed_by_server(mut s: TcpStream) -> bool {
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn a_half_finished_handshake_is_cut_by_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    for addr in [doors.chat, doors.http] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A record header announcing 512 bytes of ClientHello, then silence.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let started = std::time::Instant::now();
        assert!(closed_by_server(s).await, "{addr}: held open");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[tokio::test]
async fn garbage_records_are_refused_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let mut s = TcpStream::connect(doors.chat).await.unwrap();
    let mut junk = vec![0x16, 0x03, 0x03, 0x00, 0x40];
    junk.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    junk.extend([0x17, 0x03, 0x03, 0xff, 0xff, 1, 2, 3]);
    s.write_all(&junk).await.unwrap();
    assert!(closed_by_server(s).await);
    assert!(tls_to(doors.chat, &trusting(&files)).await.is_ok());
}

#[tokio::test]
async fn a_client_certificate_nobody_asked_for_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let client = cert(dir.path(), "c", &["client.example"], -1, 30);
    let doors = Doors::start(Some(acceptor(&files)), PerIpLimit::unlimited("chat")).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls_pki_types::CertificateDer::pem_file_iter(dir.path().join("s-ca.pem"))
            .unwrap()
            .map(|c| c.unwrap()),
    );
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(netkit::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(doors.chat).await.unwrap();
    let s = netkit::tls::connect(tcp, "127.0.0.1", Arc::new(config), T)
        .await
        .unwrap();
    let mut rd = BufReader::new(s);
    line_with(&mut rd, "welcome").await;
}

#[tokio::test]
async fn a_reloaded_certificate_reaches_new_clients_and_old_ones_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let old_pin = fingerprint_of(&files);
    let tls = acceptor(&files);
    let shutdown = CancellationToken::new();
    tokio::spawn(
        tls.clone()
            .watch(files.clone(), Duration::from_millis(50), shutdown.clone()),
    );
    let doors = Doors::start(Some(tls.clone()), PerIpLimit::unlimited("chat")).await;
    let s = tls_to(doors.chat, &pinned(&old_pin)).await.unwrap();
    let (rd, mut wr) = tokio::io::split(s);
    let mut rd = BufReader::new(rd);
    line_with(&mut rd, "welcome").await;

    // Replace the files in place (a renewal); the watcher sees the new mtime.
    let fresh = cert(dir.path(), "new", &["127.0.0.1"], -1, 60);
    let new_pin = fingerprint_of(&fresh);
    std::fs::copy(&fresh.key, &files.key).unwrap();
    std::fs::copy(&fresh.cert, &files.cert).unwrap();
    let deadline = std::time::Instant::now() + T;
    while tls.fingerprint() != new_pin {
        assert!(std::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New clients get the new certificate…
    assert!(tls_to(doors.chat, &pinned(&new_pin)).await.is_ok());
    let e = tls_to(doors.chat, &pinned(&old_pin)).await.unwrap_err();
    assert!(e.to_string().contains("pin mismatch"), "{e}");
    // …and the one connected before goes on.
    say_in_room(&mut rd, &mut wr, "r", "still here").await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_broken_reload_keeps_the_previous_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let tls = acceptor(&files);
    let before = tls.fingerprint();
    std::fs::write(&files.cert, "not a certificate").unwrap();
    assert!(tls.reload(&files).is_err());
    assert_eq!(tls.fingerprint(), before);
}

#[tokio::test]
async fn expired_wrong_host_and_unknown_issuer_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let expired = cert(dir.path(), "e", &["127.0.0.1"], -30, -1);
    let other = cert(dir.path(), "w", &["elsewhere.example"], -1, 30);
    for (files, want) in [(&expired, "has expired"), (&other, "wrong host name")] {
        let doors = Doors::start(Some(acceptor(files)), PerIpLimit::unlimited("chat")).await;
        let e = tls_to(doors.chat, &trusting(files))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let good = cert(dir.path(), "g", &["127.0.0.1"], -1, 30);
    let doors = Doors::start(Some(acceptor(&good)), PerIpLimit::unlimited("chat")).await;
    // Trusting another certificate: this one's issuer is unknown.
    let e = tls_to(doors.chat, &trusting(&other))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown issuer"), "{e}");
}

#[tokio::test]
async fn the_per_address_limit_closes_the_extra_connection() {
    let doors = Doors::start(None, PerIpLimit::including_loopback("chat", 2)).await;
    let mut a = BufReader::new(TcpStream::connect(doors.chat).await.unwrap());
    let mut b = BufReader::new(TcpStream::connect(doors.chat).await.unwrap());
    line_with(&mut a, "welcome").await;
    line_with(&mut b, "welcome").await;
    let c = TcpStream::connect(doors.chat).await.unwrap();
    assert!(closed_by_server(c).await);
    // A freed slot is taken again.
    drop(a);
    let deadline = std::time::Instant::now() + T;
    loop {
        let mut d = BufReader::new(TcpStream::connect(doors.chat).await.unwrap());
        let mut l = String::new();
        let _ = tokio::time::timeout(T, d.read_line(&mut l)).await.unwrap();
        if l.contains("welcome") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = get(TcpStream::connect(doors.http).await.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("netkit_conns_refused_per_ip_total{door=\"chat\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tcp_serve_speaks_tls_with_the_same_acceptor() {
    let dir = tempfile::tempdir().unwrap();
    let files = cert(dir.path(), "s", &["127.0.0.1"], -1, 30);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = netkit::tcp::server::Config {
        service: netkit::service::Service::Echo,
        door: Door::new("tcp", Some(acceptor(&files)), 0),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let stats = Arc::new(netkit::tcp::server::Stats::default());
    tokio::spawn(netkit::tcp::server::run(
        listener,
        config,
        stats,
        shutdown.clone(),
    ));
    let s = tls_to(addr, &trusting(&files)).await.unwrap();
    let (rd, mut wr) = tokio::io::split(s);
    let mut rd = BufReader::new(rd);
    wr.write_all(b"echo me\n").await.unwrap();
    assert_eq!(next_line(&mut rd).await, "echo me\n");
    // The client's close gets the server's close_notify, not a truncation.
    wr.shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(T, rd.read_to_string(&mut rest))
        .await
        .unwrap()
        .unwrap();
    shutdown.cancel();
}

//! DNS rebinding: a request naming a host the server does not answer to is
//! refused on every route, and a WebSocket Origin must be one of the
//! server's own hosts; its own addresses, localhost and `--http-host` names
//! keep working. Real sockets on 127.0.0.1 port 0.

mod chat_util;
mod ws_util;

use std::net::SocketAddr;

use netkit::chat::ConnConfig;
use netkit::chat::hub::HubConfig;
use netkit::http::HttpConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use chat_util::{Server, T};

/// Sends `head` (request line and headers, without the blank line) and
/// returns the response's status code.
async fn status(addr: SocketAddr, head: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
}

async fn api(addr: SocketAddr, host: &str) -> u16 {
    status(
        addr,
        &format!("GET /api/rooms HTTP/1.1\r\nHost: {host}\r\nConnection: close"),
    )
    .await
}

async fn upgrade(addr: SocketAddr, host: &str, origin: &str) -> u16 {
    status(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13"
        ),
    )
    .await
}

async fn server(hosts: &[&str]) -> Server {
    let http = HttpConfig {
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..HttpConfig::default()
    };
    Server::start_with(HubConfig::default(), ConnConfig::default(), http).await
}

#[tokio::test]
async fn a_rebound_name_is_refused_while_own_addresses_and_localhost_work() {
    let srv = server(&[]).await;
    let port = srv.http.port();
    let evil = format!("evil.example:{port}");
    assert_eq!(
        upgrade(srv.http, &evil, &format!("http://{evil}")).await,
        421
    );
    assert_eq!(api(srv.http, &evil).await, 421);
    assert_eq!(
        status(srv.http, &format!("GET / HTTP/1.1\r\nHost: {evil}")).await,
        421
    );
    for own in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        assert_eq!(api(srv.http, &own).await, 200, "{own}");
        assert_eq!(upgrade(srv.http, &own, &format!("http://{own}")).await, 101);
    }
    // A page from one own name may talk to another; a foreign one may not.
    let local = format!("127.0.0.1:{port}");
    assert_eq!(
        upgrade(srv.http, &local, &format!("http://localhost:{port}")).await,
        101
    );
    assert_eq!(
        upgrade(srv.http, &local, &format!("http://{evil}")).await,
        403
    );
    // The right name on another port is another server.
    assert_eq!(api(srv.http, &format!("localhost:{}", port ^ 1)).await, 421);
    // No Host at all (HTTP/1.0): not a browser page, served.
    assert_eq!(status(srv.http, "GET /api/rooms HTTP/1.0").await, 200);
    srv.stop().await;
}

#[tokio::test]
async fn a_configured_public_name_works() {
    let srv = server(&["chat.example.org"]).await;
    let port = srv.http.port();
    let public = format!("chat.example.org:{port}");
    assert_eq!(api(srv.http, &public).await, 200);
    assert_eq!(api(srv.http, "CHAT.example.org").await, 200);
    assert_eq!(
        upgrade(srv.http, &public, &format!("http://{public}")).await,
        101
    );
    assert_eq!(
        upgrade(srv.http, &public, "https://chat.example.org").await,
        101
    );
    let evil = format!("evil.example:{port}");
    assert_eq!(api(srv.http, &evil).await, 421);
    assert_eq!(
        upgrade(srv.http, &public, &format!("http://{evil}")).await,
        403
    );
    srv.stop().await;
}

#[test]
fn serve_takes_http_host_flags_and_env() {
    let out = assert_cmd::Command::cargo_bin("netkit")
        .unwrap()
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--http-host"), "{help}");
    assert!(help.contains("NETKIT_HTTP_HOST"), "{help}");
}

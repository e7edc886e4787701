//! The real binary with TLS: `netkit serve --tls-self-signed` against curl,
//! openssl s_client, `netkit chat tls://` with a pin, `netkit members https://`
//! and `netkit tcp connect --tls`; the certificate is kept across restarts.

mod proc_util;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use proc_util::{Netkit, run_with_stdin};

const T: Duration = Duration::from_secs(30);

/// `netkit serve` with a self-signed certificate in `data`: its HTTPS and TLS
/// chat addresses and the fingerprint it logged.
fn serve(data: &Path) -> (Netkit, SocketAddr, SocketAddr, String) {
    let mut n = Netkit::serve_chat(data, &["--tls-reload-interval", "1h", "--tls-self-signed"]);
    let line = n.wait_for("fingerprint ", T);
    let fp = line
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    n.wait_for("http: listening on https://", T);
    let (http, chat) = (n.ready.http.unwrap(), n.ready.chat.unwrap());
    (n, http, chat, fp)
}

/// Runs `netkit chat ARGS`, joins #tls, and returns once it printed the join
/// (stdin stays open until then, so the server answers before the client ends).
fn chat_joins(args: &[&str]) {
    use std::io::{BufRead, BufReader, Write};
    let mut c = proc_util::bin()
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(b"/join tls\n").unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(c.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("joined #tls");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("joined #tls")),
        "netkit chat {args:?} never joined; printed {seen:?}"
    );
    drop(stdin);
    let status = c.wait().unwrap();
    assert!(
        status.success(),
        "netkit chat {args:?} failed; printed {seen:?}"
    );
}

#[test]
fn self_signed_serve_works_with_curl_openssl_and_netkit_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n, http, chat, fp) = serve(dir.path());
    let cert = dir.path().join("tls/cert.pem");
    let key = dir.path().join("tls/key.pem");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key must be private");
    }

    // curl, verifying against the certificate.
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(format!("https://127.0.0.1:{}/healthz", http.port()))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("strict-transport-security"), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");

    // openssl s_client against the line chat, verifying too.
    let mut s = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(chat.to_string())
        .arg("-CAfile")
        .arg(&cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    {
        use std::io::{BufRead, BufReader, Write};
        let mut stdin = s.stdin.take().unwrap();
        stdin.write_all(b"/nick ossl\n/join tls\n").unwrap();
        let mut lines = BufReader::new(s.stdout.take().unwrap()).lines();
        let joined = lines
            .find(|l| l.as_ref().is_ok_and(|l| l.contains("joined #tls")))
            .expect("openssl s_client saw the join")
            .unwrap();
        assert!(joined.contains("ossl"), "{joined}");
        drop(stdin);
    }
    let _ = s.kill();
    let _ = s.wait();

    // netkit chat over TLS, pinned to the logged fingerprint.
    let url = format!("tls://{chat}");
    chat_joins(&[&url, "--tls-pin", &fp, "--nick", "pinned"]);

    // netkit members over HTTPS, trusting the certificate.
    let base = format!("https://{http}");
    let (status, stdout, stderr) = run_with_stdin(
        &[
            "members",
            &base,
            "--tls-ca",
            cert.to_str().unwrap(),
            "--json",
        ],
        b"",
        T,
    );
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("\"members\""), "{stdout}");

    // Without a CA or pin, the self-signed certificate is refused: exit 1, a named reason.
    let (status, _, stderr) =
        run_with_stdin(&["tcp", "connect", "--tls", &chat.to_string()], b"", T);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("unknown issuer"), "{stderr}");
    let wrong = fp.replacen(&fp[..2], if &fp[..2] == "00" { "11" } else { "00" }, 1);
    let (status, _, stderr) = run_with_stdin(&["chat", &url, "--tls-pin", &wrong], b"", T);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("pin mismatch"), "{stderr}");

    // A restart keeps the certificate (clients' pins stay valid).
    n.terminate();
    let (mut n, _, chat, again) = serve(dir.path());
    assert_eq!(again, fp);

    // Replaced files plus SIGHUP (the file poll is an hour here): new clients
    // get the new certificate without a restart.
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let fresh = params.self_signed(&key_pair).unwrap();
    std::fs::write(&key, key_pair.serialize_pem()).unwrap();
    std::fs::write(&cert, fresh.pem()).unwrap();
    n.signal(libc::SIGHUP);
    n.wait_for("certificate reloaded", T);
    let new_fp = netkit::tls::fingerprint(fresh.der());
    chat_joins(&[&format!("tls://{chat}"), "--tls-pin", &new_fp]);
}

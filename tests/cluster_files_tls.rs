//! Room files between hubs whose doors are HTTPS, with real `netkit serve`
//! processes on 127.0.0.1 and curl as the user's client: a hub started
//! with `--cluster-tls-ca` (the private CA that issued the hubs'
//! certificates) fetches a file another hub holds over verified TLS and
//! serves it; a hub without it (system roots only) refuses the other hub's
//! certificate with a clear error, keeps nothing and stays up; a CA file
//! that cannot be read stops `serve` at start. Every wait polls HTTPS with
//! a deadline.

mod files_util;
mod proc_util;
mod ws_util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use files_util::Member;
use proc_util::{ClusterNode, Netkit, cluster_node_command, files_under, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

/// A private CA (`ca.pem`) and, for each of `stems`, a certificate it
/// issued for 127.0.0.1 (`<stem>.pem`, `<stem>.key`).
fn private_ca(dir: &Path, stems: &[&str]) -> PathBuf {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hubs' private CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    for stem in stems {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

/// `netkit serve` node `name` with an HTTPS door (certificate `<stem>` of
/// `certs`), joining through `join`, trusting `cluster_ca` for other hubs.
fn tls_node(
    name: &str,
    data: &Path,
    join: &str,
    certs: &Path,
    cluster_ca: Option<&Path>,
) -> Netkit {
    let mut cmd = cluster_node_command(name, data, "127.0.0.1:0", join, false);
    cmd.arg("--tls-cert")
        .arg(certs.join(format!("{name}.pem")))
        .arg("--tls-key")
        .arg(certs.join(format!("{name}.key")))
        .env_remove("NETKIT_CLUSTER_TLS_CA");
    if let Some(ca) = cluster_ca {
        cmd.arg("--cluster-tls-ca").arg(ca);
    }
    Netkit::start(cmd)
}

/// `GET path` on `node`'s HTTPS door with curl, verifying against `ca`:
/// the status and the body.
fn curl(node: &Netkit, path: &str, ca: &Path) -> (u16, Vec<u8>) {
    let http = node.ready.http.expect("http is on");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .arg(format!("https://127.0.0.1:{}{path}", http.port()))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let at = body.iter().rposition(|&b| b == b'\n').unwrap();
    let status = std::str::from_utf8(&body[at + 1..])
        .unwrap()
        .parse()
        .unwrap();
    body.truncate(at);
    (status, body)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

/// True once `node` lists `n` other members as alive.
fn sees_alive(node: &Netkit, ca: &Path, n: usize) -> bool {
    let (_, body) = curl(node, "/api/cluster", ca);
    json(&body)["members"].as_array().is_some_and(|ms| {
        ms.iter()
            .filter(|m| m["self"] == false && m["state"] == "alive")
            .count()
            == n
    })
}

/// True once `node` has stored a message of lobby sharing `hex`.
fn has_file_message(node: &Netkit, ca: &Path, hex: &str) -> bool {
    let (_, body) = curl(node, "/api/rooms/lobby/messages", ca);
    json(&body)["messages"]
        .as_array()
        .is_some_and(|ms| ms.iter().any(|m| m["file"]["blake3"] == hex))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_fetch_files_over_verified_tls_with_the_cluster_ca_and_refuse_without_it() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let certs = dirs[3].path();
    let ca = private_ca(certs, &["a", "b", "c"]);

    // ann shares a file on a (plain HTTP for the upload); a then comes
    // back with an HTTPS door, keeping its data.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
    let hex = blake3::hash(&data).to_hex().to_string();
    let mut plain = ClusterNode::start("a", dirs[0].path(), "127.0.0.1:0", "", false);
    let ann = Member::join(plain.http, "ann", "lobby").await;
    let r = ann.upload(plain.http, "notes.bin", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    drop(ann);
    plain.p.terminate();
    let a = tls_node("a", dirs[0].path(), "", certs, Some(&ca));
    let join = a.ready.cluster.unwrap().to_string();
    // b trusts the hubs' CA; c knows only the system roots.
    let mut b = tls_node("b", dirs[1].path(), &join, certs, Some(&ca));
    let mut c = tls_node("c", dirs[2].path(), &join, certs, None);
    wait_until("the three hubs see each other", DEADLINE, || {
        sees_alive(&a, &ca, 2) && sees_alive(&b, &ca, 2) && sees_alive(&c, &ca, 2)
    });
    wait_until("b and c store the file message", DEADLINE, || {
        has_file_message(&b, &ca, &hex) && has_file_message(&c, &ca, &hex)
    });
    let path = format!("/files/lobby/{hex}/notes.bin");

    // b fetches it from a over TLS checked against the CA, and serves it.
    let (status, body) = curl(&b, &path, &ca);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == data, "b serves the bytes a holds");
    b.wait_for("fetched from another hub", Duration::from_secs(10));

    // c cannot check the other hubs' certificates: a clear 502 naming the
    // problem, nothing kept, and c goes on serving.
    let (status, body) = curl(&c, &path, &ca);
    let err = json(&body);
    assert_eq!(status, 502, "{err}");
    assert_eq!(err["error"]["code"], "fetch_failed", "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown issuer") && message.contains("--cluster-tls-ca"),
        "{message}"
    );
    assert!(
        files_under(&dirs[2].path().join("rooms")).is_empty(),
        "c keeps nothing"
    );
    assert_eq!(curl(&c, "/healthz", &ca).0, 200);
    c.wait_for("fetching the file from hub", Duration::from_secs(10));

    // A CA file that cannot be read is refused at start: serve exits by
    // itself (one still running at the deadline is killed with the future).
    let mut cmd = cluster_node_command("d", dirs[2].path(), "127.0.0.1:0", "", false);
    cmd.arg("--tls-cert")
        .arg(certs.join("c.pem"))
        .arg("--tls-key")
        .arg(certs.join("c.key"))
        .arg("--cluster-tls-ca")
        .arg(certs.join("missing.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.spawn().unwrap().wait_with_output())
        .await
        .expect("serve started with an unreadable --cluster-tls-ca")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--cluster-tls-ca: cannot read the CA file"),
        "{stderr}"
    );
}

//! `netkit send --code` / `netkit recv --code` and `--password-file`, driven
//! through the real binary on port 0: the code handshake, then sealed frames.

mod proc_util;

use std::process::{Command, Stdio};
use std::time::Duration;

use proc_util::{Netkit, files_under};

const BIN: &str = env!("CARGO_BIN_EXE_netkit");
const WRONG: &str = "wrong code (or someone tried to guess it); nothing was sent";

/// `netkit recv --listen 127.0.0.1:0 --dir DIR FLAGS…` and its address.
fn recv(dir: &std::path::Path, flags: &[&str]) -> (Netkit, String) {
    let (p, addr) = proc_util::recv(dir, flags);
    (p, addr.to_string())
}

fn send(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("send")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `netkit send --to ADDR AUTH… FILE`, which must succeed.
fn send_ok(addr: &str, auth: &[&str], file: &std::path::Path) {
    let mut args = vec!["--to", addr];
    args.extend_from_slice(auth);
    args.push(file.to_str().unwrap());
    let o = send(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_tree_goes_through_with_the_same_code() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = src.path().join("docs");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    // Larger than one chunk, so several sealed Data records.
    let big: Vec<u8> = (0..700_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(tree.join("sub/big.bin"), &big).unwrap();
    std::fs::write(tree.join("a.txt"), "hello").unwrap();

    let (mut r, addr) = recv(out.path(), &["--code", "7-aardvark-adroitness"]);
    let o = send(&[
        "--to",
        &addr,
        "--code",
        "7-Aardvark-Adroitness",
        tree.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        r.wait(Duration::from_secs(60)).success(),
        "recv --code serves one sender and exits"
    );
    assert_eq!(
        std::fs::read(out.path().join("docs/sub/big.bin")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("docs/a.txt")).unwrap(),
        "hello"
    );
}

#[test]
fn a_wrong_code_fails_on_both_sides_after_one_attempt() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("secret.txt");
    std::fs::write(&f, "do not deliver").unwrap();

    let (mut r, addr) = recv(out.path(), &["--code", "7-aardvark-adroitness"]);
    let o = send(&[
        "--to",
        &addr,
        "--code",
        "7-aardvark-aftermath",
        f.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(WRONG), "sender: {err}");
    assert!(
        !r.wait(Duration::from_secs(60)).success(),
        "the receiver fails too"
    );
    let log = r.seen.join("\n");
    assert!(log.contains(WRONG), "receiver: {log}");
    assert!(files_under(out.path()).is_empty(), "nothing written");
    // The code was single-use: the receiver is gone, a second guess cannot reach it.
    let again = send(&[
        "--to",
        &addr,
        "--code",
        "7-aardvark-adroitness",
        f.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
}

#[test]
fn code_and_no_code_do_not_mix() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("x.txt");
    std::fs::write(&f, "x").unwrap();

    // A plain sender to a receiver that requires a code.
    let (mut r, addr) = recv(out.path(), &["--code", "7-aardvark-adroitness"]);
    let o = send(&["--to", &addr, f.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("uses a code"), "sender: {err}");
    assert!(!r.wait(Duration::from_secs(60)).success());

    // A sender with a code to a plain receiver.
    let (mut r, addr) = recv(out.path(), &["--once"]);
    let o = send(&[
        "--to",
        &addr,
        "--code",
        "7-aardvark-adroitness",
        f.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not use a code"), "sender: {err}");
    r.wait(Duration::from_secs(60));
    assert!(files_under(out.path()).is_empty(), "nothing written");
}

#[test]
fn a_password_file_receiver_takes_only_senders_who_know_it() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pw = src.path().join("pw");
    std::fs::write(&pw, "correct horse battery staple\n").unwrap();
    let bad = src.path().join("bad");
    std::fs::write(&bad, "wrong horse\n").unwrap();
    let f = src.path().join("f.txt");
    std::fs::write(&f, "payload").unwrap();

    let (mut r, addr) = recv(out.path(), &["--password-file", pw.to_str().unwrap()]);
    let o = send(&[
        "--to",
        &addr,
        "--password-file",
        bad.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(WRONG));
    // A fixed password serves many senders: the right one still gets in.
    send_ok(&addr, &["--password-file", pw.to_str().unwrap()], &f);
    assert_eq!(
        std::fs::read_to_string(out.path().join("f.txt")).unwrap(),
        "payload"
    );
    r.terminate();
}

/// How the man in the middle attacks the sender's sealed records.
#[derive(Clone, Copy, Debug)]
enum Attack {
    Flip,
    Drop,
    Replay,
    Swap,
    Truncate,
}

/// Reads one sealed record (header and body) from `r`.
fn read_record(r: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h).ok()?;
    let len = (u32::from_be_bytes(h) & 0x7fff_ffff) as usize;
    let mut rec = h.to_vec();
    rec.resize(4 + len, 0);
    r.read_exact(&mut rec[4..]).ok()?;
    Some(rec)
}

/// A man in the middle between sender and receiver (a malicious relay): it
/// passes the handshake, then forwards the sender's sealed records one by
/// one and applies `attack` at record 2 (the first `Data` record).
fn tamper_proxy(to: String, attack: Attack) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut from_s, _) = l.accept().unwrap();
        let mut to_r = std::net::TcpStream::connect(to).unwrap();
        let (mut r2, mut s2) = (to_r.try_clone().unwrap(), from_s.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut r2, &mut s2));
        // 12 preamble + 38 SPAKE2 bytes, then 37 confirmation bytes; the
        // sender waits for the receiver between the two.
        for n in [12 + 38, 37] {
            let mut head = vec![0u8; n];
            from_s.read_exact(&mut head).unwrap();
            to_r.write_all(&head).unwrap();
        }
        let mut i = 0;
        while let Some(mut rec) = read_record(&mut from_s) {
            let out = match (i, attack) {
                (2, Attack::Flip) => {
                    rec[10] ^= 0x10;
                    rec
                }
                (2, Attack::Drop) => vec![],
                (2, Attack::Replay) => [&rec[..], &rec[..]].concat(),
                (2, Attack::Swap) => {
                    let next = read_record(&mut from_s).unwrap_or_default();
                    [next, rec].concat()
                }
                (2, Attack::Truncate) => {
                    let _ = to_r.write_all(&rec[..rec.len() / 2]);
                    break;
                }
                _ => rec,
            };
            if to_r.write_all(&out).is_err() {
                break;
            }
            i += 1;
        }
        let _ = to_r.shutdown(std::net::Shutdown::Both);
        let _ = from_s.shutdown(std::net::Shutdown::Both);
    });
    addr
}

#[test]
fn a_tampered_stream_is_detected_and_nothing_is_stored() {
    use Attack::*;
    for attack in [Flip, Drop, Replay, Swap, Truncate] {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let f = src.path().join("f.bin");
        std::fs::write(&f, vec![5u8; 300_000]).unwrap();
        let (mut r, addr) = recv(out.path(), &["--code", "7-aardvark-adroitness"]);
        let via = tamper_proxy(addr, attack);
        let o = send(&[
            "--to",
            &via,
            "--code",
            "7-aardvark-adroitness",
            f.to_str().unwrap(),
        ]);
        assert!(
            !o.status.success(),
            "{attack:?}: the sender must not see success"
        );
        assert!(
            !r.wait(Duration::from_secs(60)).success(),
            "{attack:?}: receiver"
        );
        let log = r.seen.join("\n");
        assert!(
            log.contains("sealed"),
            "{attack:?}: receiver says why: {log}"
        );
        assert!(
            !out.path().join("f.bin").exists(),
            "{attack:?}: nothing under the final name"
        );
    }
}

#[test]
fn the_file_drop_takes_a_password_file() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let pw = src.path().join("pw");
    std::fs::write(&pw, "drop secret").unwrap();
    let f = src.path().join("f.txt");
    std::fs::write(&f, "dropped").unwrap();
    let mut p = Netkit::spawn(&[
        "serve",
        "--relay",
        "off",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--http",
        "off",
        "--chat",
        "off",
        "--tcp",
        "off",
        "--udp",
        "off",
        "--drop",
        "127.0.0.1:0",
        "--drop-password-file",
        pw.to_str().unwrap(),
    ]);
    let addr = p.ready.drop.expect("drop address").to_string();
    let o = send(&["--to", &addr, f.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "a sender without the password is refused"
    );
    send_ok(&addr, &["--password-file", pw.to_str().unwrap()], &f);
    assert_eq!(
        std::fs::read_to_string(data.path().join("files/f.txt")).unwrap(),
        "dropped"
    );
    p.terminate();
}

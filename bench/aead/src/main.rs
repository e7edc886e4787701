//! Seals 1 GiB in 128 KiB records (the transfer's chunk size) with
//! ChaCha20-Poly1305 and AES-256-GCM (RustCrypto's, and ring's, which
//! `src/transfer/seal.rs` uses) and prints each one's throughput.
//! Run: `cargo run --release --manifest-path bench/aead/Cargo.toml`.
//!
//! `-- --ring-json` instead seals and opens 1 GiB with ring's AES-256-GCM in
//! records of netkit's size (a 128 KiB chunk and its 5-byte frame header),
//! three times, and prints one JSON line with the median CPU seconds of the
//! pair: what any transfer that seals and opens every byte with this cipher
//! pays, at the least (bench/transfer_code --floor uses it).

use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};

const RECORD: usize = 128 * 1024;
const TOTAL: usize = 1 << 30;

fn run<A: AeadInPlace>(name: &str, aead: &A) {
    measure(name, |nonce, buf| {
        aead.encrypt_in_place_detached(aes_gcm::aead::Nonce::<A>::from_slice(&nonce), b"hdr", buf)
            .expect("seal")[0]
    });
}

fn run_ring(key: &[u8; 32]) {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("key"));
    measure("ring aes-256-gcm", |nonce, buf| {
        k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(b"hdr"), buf)
            .expect("seal")
            .as_ref()[0]
    });
}

/// The nonce of record `i`, as netkit builds it: 4 zero bytes, then the counter.
fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

/// Seals 1 GiB in RECORD-sized records with `seal(nonce, record) -> first tag byte`.
fn measure(name: &str, mut seal: impl FnMut([u8; 12], &mut [u8]) -> u8) {
    let mut buf = vec![7u8; RECORD];
    let start = Instant::now();
    let cpu0 = cpu_ns();
    let mut sum = 0u8;
    for i in 0..(TOTAL / RECORD) as u64 {
        sum ^= seal(nonce(i), &mut buf);
    }
    let wall = start.elapsed().as_secs_f64();
    // CPU time, not wall time: the machine is shared, and a busy neighbour
    // would otherwise count against whichever cipher ran while it was busy.
    let secs = (cpu_ns() - cpu0) as f64 / 1e9;
    println!(
        "{name:<20} {:7.0} MB/s per core  ({secs:.2} s CPU, {wall:.2} s wall for 1 GiB, check {sum})",
        TOTAL as f64 / secs / 1e6
    );
}

/// Nanoseconds this thread has run on a CPU (Linux schedstat).
fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat field")
}

/// Seals then opens, in place, 1 GiB of netkit-sized records with ring's
/// AES-256-GCM; the CPU seconds of the whole (each record opened is the
/// one just sealed, so the open checks a real tag).
fn ring_seal_open(key: &[u8; 32]) -> f64 {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    const PLAIN: usize = RECORD + 5;
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("key"));
    let mut buf = vec![7u8; PLAIN + 16];
    let cpu0 = cpu_ns();
    for i in 0..(TOTAL / RECORD) as u64 {
        let n = nonce(i);
        let tag = k
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from([1u8; 4]),
                &mut buf[..PLAIN],
            )
            .expect("seal");
        buf[PLAIN..].copy_from_slice(tag.as_ref());
        let plain = k
            .open_in_place(
                Nonce::assume_unique_for_key(n),
                Aad::from([1u8; 4]),
                &mut buf,
            )
            .expect("open");
        assert_eq!(plain.len(), PLAIN);
    }
    (cpu_ns() - cpu0) as f64 / 1e9
}

fn main() {
    let key = [9u8; 32];
    if std::env::args().any(|a| a == "--ring-json") {
        let mut runs: Vec<f64> = (0..3).map(|_| ring_seal_open(&key)).collect();
        runs.sort_by(f64::total_cmp);
        println!(
            "{{\"cipher\":\"ring aes-256-gcm\",\"record\":{},\"seal_open_cpu_s_per_gib\":{:.3},\"runs\":[{}]}}",
            RECORD + 5,
            runs[1],
            runs.iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        return;
    }
    for _ in 0..2 {
        run(
            "chacha20poly1305",
            &chacha20poly1305::ChaCha20Poly1305::new((&key).into()),
        );
        run("aes-256-gcm", &aes_gcm::Aes256Gcm::new((&key).into()));
        run_ring(&key);
    }
}

//! Seals 1 GiB in 128 KiB records (the transfer's chunk size) with
//! ChaCha20-Poly1305 and AES-256-GCM (RustCrypto's, and ring's, which
//! `src/transfer/seal.rs` uses) and prints each one's throughput.
//! Run: `cargo run --release --manifest-path bench/aead/Cargo.toml`.

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

/// Seals 1 GiB in RECORD-sized records with `seal(nonce, record) -> first tag byte`.
fn measure(name: &str, mut seal: impl FnMut([u8; 12], &mut [u8]) -> u8) {
    let mut buf = vec![7u8; RECORD];
    let start = Instant::now();
    let cpu0 = cpu_ns();
    let mut sum = 0u8;
    for i in 0..(TOTAL / RECORD) as u64 {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&i.to_be_bytes());
        sum ^= seal(nonce, &mut buf);
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
    s.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat field")
}

fn main() {
    let key = [9u8; 32];
    for _ in 0..2 {
        run("chacha20poly1305", &chacha20poly1305::ChaCha20Poly1305::new((&key).into()));
        run("aes-256-gcm", &aes_gcm::Aes256Gcm::new((&key).into()));
        run_ring(&key);
    }
}

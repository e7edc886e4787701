//! `nc` that verifies: the least a transfer costs that moves a file the way
//! `nc` does (read, write, 128 KiB at a time, one thread per end) and hashes
//! every byte with BLAKE3 on both ends, as netkit does. bench/transfer
//! `--floor` runs it beside nc and netkit.
//!
//!   hash-nc recv HOST PORT OUT    listen, take one sender, store OUT, exit 0 if the hashes match
//!   hash-nc send HOST PORT FILE   send FILE, exit 0 once the receiver said the hashes match
//!
//! Wire: u64 length (big-endian), the bytes, the 32-byte BLAKE3 of them; the
//! receiver answers one byte, 1 for a match. Nothing is synced to disk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;

const BUF: usize = 128 * 1024;

fn recv(addr: &str, out: &str) -> io::Result<bool> {
    let (mut s, _) = TcpListener::bind(addr)?.accept()?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut left = u64::from_be_bytes(len);
    let mut f = File::create(out)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    while left > 0 {
        let want = left.min(BUF as u64) as usize;
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sender left early",
            ));
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs)?;
    let ok = h.finalize().as_bytes() == &theirs;
    s.write_all(&[ok as u8])?;
    Ok(ok)
}

fn send(addr: &str, path: &str) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&len.to_be_bytes())?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut left = len;
    while left > 0 {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        h.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        left = left.saturating_sub(n as u64);
    }
    s.write_all(h.finalize().as_bytes())?;
    let mut verdict = [0u8; 1];
    s.read_exact(&mut verdict)?;
    Ok(verdict[0] == 1)
}

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: hash-nc recv|send HOST PORT OUT|FILE");
        return ExitCode::from(2);
    }
    let addr = format!("{}:{}", a[2], a[3]);
    let r = match a[1].as_str() {
        "recv" => recv(&addr, &a[4]),
        "send" => send(&addr, &a[4]),
        _ => {
            eprintln!("usage: hash-nc recv|send HOST PORT OUT|FILE");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("hash-nc: BLAKE3 mismatch");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hash-nc: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `nc` that verifies: the least a transfer costs that moves a file the way
//! `nc` does (read, write, 128 KiB at a time, one thread per end) and hashes
//! every byte with BLAKE3 on both ends, as netkit does. bench/transfer
//! `--floor` runs it beside nc and netkit.
//!
//!   hash-nc recv HOST PORT OUT    listen, take one sender, store OUT, exit 0 if the hashes match
//!   hash-nc send HOST PORT FILE   send FILE, exit 0 once the receiver said the hashes match
//!
//! `recv-zc` and `send-zc` are the same with no copy the kernel can avoid:
//! the sender hashes the file from a read-only mapping of its page cache
//! and sends it with `sendfile`; the receiver moves the bytes socket → pipe
//! → file with `splice` (the one copy left is the kernel's into the file's
//! page cache) and hashes them from a mapping of the file it wrote. The
//! least CPU any transfer that hashes every byte on both ends can spend;
//! a mapping is unsafe for a tool (a file cut short while mapped kills the
//! process with SIGBUS), which is why netkit reads instead. `recv-zcr`
//! splices the same way but hashes by reading the file back into one
//! reused buffer: what a receiver without a mapping could do.
//!
//! Wire: u64 length (big-endian), the bytes, the 32-byte BLAKE3 of them; the
//! receiver answers one byte, 1 for a match. Nothing is synced to disk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;

const BUF: usize = 128 * 1024;

/// The receiver's end: reads the sender's hash, compares it with `h`, and
/// answers 1 for a match.
fn answer(s: &mut TcpStream, h: &blake3::Hasher) -> io::Result<bool> {
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs)?;
    let ok = h.finalize().as_bytes() == &theirs;
    s.write_all(&[ok as u8])?;
    Ok(ok)
}

/// The sender's end: sends the hash `h` and reads the receiver's verdict.
fn ask(s: &mut TcpStream, h: &blake3::Hasher) -> io::Result<bool> {
    s.write_all(h.finalize().as_bytes())?;
    let mut verdict = [0u8; 1];
    s.read_exact(&mut verdict)?;
    Ok(verdict[0] == 1)
}

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
    answer(&mut s, &h)
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
    ask(&mut s, &h)
}

/// Bytes per `sendfile`/`splice` and per hash step in the zero-copy mode.
const ZC_STEP: usize = 1 << 20;

fn os_err(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A read-only shared mapping of the first `len` bytes of `f`.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn new(f: &File, len: usize) -> io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Mapped {
                ptr: std::ptr::null_mut(),
                len,
            });
        }
        // SAFETY: a fresh mapping of a file this process opened; read only.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    fn slice(&self, from: usize, to: usize) -> &[u8] {
        assert!(from <= to && to <= self.len);
        if from == to {
            return &[];
        }
        // SAFETY: inside the mapping; the file is not cut short meanwhile
        // (this floor's own files; see the module's note).
        unsafe { std::slice::from_raw_parts((self.ptr as *const u8).add(from), to - from) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// A pipe's read and write ends, closed when dropped.
fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: a two-int array for pipe2 to fill.
    os_err(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as isize)?;
    // SAFETY: both descriptors were just made and are owned by nothing else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

fn recv_zc(addr: &str, out: &str) -> io::Result<bool> {
    recv_spliced(addr, out, true)
}

fn recv_spliced(addr: &str, out: &str, mapped: bool) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (mut s, _) = TcpListener::bind(addr)?.accept()?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len) as usize;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)?;
    f.set_len(len as u64)?;
    let map = Mapped::new(&f, if mapped { len } else { 0 })?;
    let mut back = vec![0u8; if mapped { 0 } else { ZC_STEP }];
    let (pr, pw) = pipe()?;
    // SAFETY: fcntl on the pipe just made.
    unsafe { libc::fcntl(pw.as_raw_fd(), libc::F_SETPIPE_SZ, ZC_STEP as libc::c_int) };
    let mut h = blake3::Hasher::new();
    let mut done = 0usize;
    while done < len {
        let want = (len - done).min(ZC_STEP);
        // SAFETY: splice between fds this function owns.
        let n = os_err(unsafe {
            libc::splice(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                pw.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE,
            )
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sender left early",
            ));
        }
        let mut moved = 0;
        while moved < n {
            let mut off = (done + moved) as libc::loff_t;
            // SAFETY: as above; `off` is this call's own offset.
            moved += os_err(unsafe {
                libc::splice(
                    pr.as_raw_fd(),
                    std::ptr::null_mut(),
                    f.as_raw_fd(),
                    &mut off,
                    n - moved,
                    libc::SPLICE_F_MOVE,
                )
            })?;
        }
        if mapped {
            h.update(map.slice(done, done + n));
        } else {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut back[..n], done as u64)?;
            h.update(&back[..n]);
        }
        done += n;
    }
    answer(&mut s, &h)
}

fn send_zc(addr: &str, path: &str) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    let len = f.metadata()?.len() as usize;
    let map = Mapped::new(&f, len)?;
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&(len as u64).to_be_bytes())?;
    let mut h = blake3::Hasher::new();
    let mut off: libc::off_t = 0;
    while (off as usize) < len {
        let from = off as usize;
        let to = (from + ZC_STEP).min(len);
        h.update(map.slice(from, to));
        while (off as usize) < to {
            // SAFETY: sendfile from this function's file to its socket.
            let n = os_err(unsafe {
                libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut off, to - off as usize)
            })?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
            }
        }
    }
    ask(&mut s, &h)
}

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: hash-nc recv|send|recv-zc|recv-zcr|send-zc HOST PORT OUT|FILE");
        return ExitCode::from(2);
    }
    let addr = format!("{}:{}", a[2], a[3]);
    let r = match a[1].as_str() {
        "recv" => recv(&addr, &a[4]),
        "send" => send(&addr, &a[4]),
        "recv-zc" => recv_zc(&addr, &a[4]),
        "recv-zcr" => recv_spliced(&addr, &a[4], false),
        "send-zc" => send_zc(&addr, &a[4]),
        _ => {
            eprintln!("usage: hash-nc recv|send|recv-zc|recv-zcr|send-zc HOST PORT OUT|FILE");
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

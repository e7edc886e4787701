//! `netkit get URL`: downloads a file shared in a room, resuming a partial
//! download (`Range` from its length, `If-Range` with the ETag) and checking
//! the BLAKE3 in the URL before the file gets its final name.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::cli::parse_duration;

/// Suffix of the partial file kept next to the final name.
const PART_SUFFIX: &str = ".netkit-part";

/// Command-line options of `netkit get`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// The file's link from its room message
    /// (`http(s)://HOST:PORT/files/ROOM/BLAKE3/NAME`).
    pub url: String,
    /// Where to save it (default: NAME in the current folder); the partial
    /// download is kept as `PATH.netkit-part` and resumed from.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Give up when the server sends nothing for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "NETKIT_GET_TIMEOUT")]
    pub timeout: Duration,
    /// How an https server's certificate is checked.
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
}

/// The server sent nothing for this long (a timeout, told apart from
/// other failures by callers that answer 504 for it).
#[derive(Debug, thiserror::Error)]
#[error("the server sent nothing for {0:?}")]
pub(crate) struct Silent(pub(crate) Duration);

/// A room file's link, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileUrl {
    /// `https`.
    pub tls: bool,
    /// `HOST:PORT` (the port filled in from the scheme).
    pub authority: String,
    /// Path of the request.
    pub path: String,
    /// The BLAKE3 in the path (also the strong ETag).
    pub blake3: blake3::Hash,
    /// The file's name (percent-decoded, checked like an uploaded name).
    pub name: String,
}

impl FileUrl {
    /// Parses `http(s)://HOST[:PORT]/files/ROOM/BLAKE3/NAME`.
    pub fn parse(url: &str) -> anyhow::Result<FileUrl> {
        let usage = || {
            anyhow::anyhow!(
                "{url} is not a room file's link: expected http(s)://HOST:PORT/files/ROOM/BLAKE3/NAME"
            )
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(usage());
        };
        let (host, path) = rest.split_once('/').ok_or_else(usage)?;
        let path = format!("/{}", path.split(['?', '#']).next().unwrap_or(""));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let [files, _room, hash, name] = parts[..] else {
            return Err(usage());
        };
        let blake3 = blake3::Hash::from_hex(hash).map_err(|_| usage())?;
        if files != "files" || host.is_empty() {
            return Err(usage());
        }
        let name = percent_encoding::percent_decode_str(name)
            .decode_utf8()
            .map_err(|_| usage())?
            .into_owned();
        crate::chat::files::names::check_name(&name)
            .map_err(|e| anyhow::anyhow!("{url}: {e}; pass --output PATH"))?;
        let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        let authority = if has_port {
            host.to_string()
        } else {
            format!("{host}:{}", if tls { 443 } else { 80 })
        };
        Ok(FileUrl {
            tls,
            authority,
            path,
            blake3,
            name,
        })
    }
}

/// What a finished `netkit get` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    /// Where the file is.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Bytes already there from an earlier, cut download.
    pub resumed_from: u64,
}

/// Runs `netkit get`.
pub async fn run_command(args: GetArgs) -> anyhow::Result<()> {
    let url = FileUrl::parse(&args.url)?;
    let dest = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(&url.name));
    let got = get(&url, &dest, &args).await?;
    println!(
        "saved {} ({} bytes, BLAKE3 verified{})",
        got.path.display(),
        got.size,
        if got.resumed_from > 0 {
            format!(", resumed from byte {}", got.resumed_from)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Downloads `url` to `dest` through `dest.netkit-part`, resuming from it.
pub async fn get(url: &FileUrl, dest: &Path, args: &GetArgs) -> anyhow::Result<Got> {
    if dest.exists() {
        let have = hash_prefix(dest.to_path_buf(), u64::MAX).await?;
        if have.0.finalize() == url.blake3 {
            info!("{} is already there and complete", dest.display());
            return Ok(Got {
                path: dest.to_path_buf(),
                size: have.1,
                resumed_from: have.1,
            });
        }
        bail!(
            "{} exists with other content; remove it or pass --output PATH",
            dest.display()
        );
    }
    let mut part_name = dest.as_os_str().to_owned();
    part_name.push(PART_SUFFIX);
    let part = PathBuf::from(part_name);
    // A partial download that is already whole (cut before the rename) is
    // asked for from its end: 416, then checked as it is.
    let (mut hasher, mut have) = match part.exists() {
        true => hash_prefix(part.clone(), u64::MAX).await?,
        false => (blake3::Hasher::new(), 0),
    };
    let mut resumed_from = have;
    let mut resp = request(url, have, args).await?;
    if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        debug!("the server has no bytes past {have}");
    } else {
        if resp.status() == StatusCode::OK && have > 0 {
            info!("the server sent the whole file (no resume); starting over");
            (hasher, have, resumed_from) = (blake3::Hasher::new(), 0, 0);
        } else if resp.status() == StatusCode::PARTIAL_CONTENT {
            check_range(&resp, have)?;
        } else if resp.status() != StatusCode::OK {
            bail!(
                "GET {} answered {} — is the link right and the file not expired?",
                url.path,
                resp.status()
            );
        }
        have = save_body(&mut resp, &part, have, &mut hasher, args.timeout, u64::MAX).await?;
    }
    finish(&part, dest, hasher.finalize(), url.blake3).await?;
    Ok(Got {
        path: dest.to_path_buf(),
        size: have,
        resumed_from: resumed_from.min(have),
    })
}

/// Checks a 206's `Content-Range` starts where the partial file ends.
fn check_range(resp: &Response<Incoming>, have: u64) -> anyhow::Result<()> {
    let cr = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !cr.starts_with(&format!("bytes {have}-")) {
        bail!("asked for the bytes from {have} but the server sent '{cr}'");
    }
    Ok(())
}

/// Sends the GET (with `Range` and `If-Range` from byte `from` on).
async fn request(url: &FileUrl, from: u64, args: &GetArgs) -> anyhow::Result<Response<Incoming>> {
    let tcp = crate::transfer::send::connect_peer(
        &url.authority,
        args.timeout,
        "`netkit serve`",
        "the URL",
    )
    .await?;
    if url.tls {
        let tls = args
            .tls
            .connect(tcp, &url.authority, &[b"http/1.1"], args.timeout)
            .await?;
        send_get(tls, url, from, args.timeout, None).await
    } else {
        send_get(tcp, url, from, args.timeout, None).await
    }
}

/// Sends the GET of `url` over `stream` (bytes from `from` on, with
/// `If-Range`), with the header `extra` if given; the answer's head within `timeout`.
pub(crate) async fn send_get<S>(
    stream: S,
    url: &FileUrl,
    from: u64,
    timeout: Duration,
    extra: Option<(&'static str, &'static str)>,
) -> anyhow::Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("get: connection ended: {e}");
        }
    });
    let mut req = Request::get(url.path.as_str())
        .header(header::HOST, url.authority.as_str())
        .header(header::USER_AGENT, "netkit-get");
    if let Some((name, value)) = extra {
        req = req.header(name, value);
    }
    if from > 0 {
        let etag = format!("\"{}\"", url.blake3.to_hex());
        req = req
            .header(header::RANGE, format!("bytes={from}-"))
            .header(header::IF_RANGE, HeaderValue::from_str(&etag)?);
    }
    let req = req.body(String::new())?;
    tokio::time::timeout(timeout, sender.send_request(req))
        .await
        .map_err(|_| anyhow::Error::from(Silent(timeout)).context(url.authority.clone()))?
        .with_context(|| format!("GET {} from {}", url.path, url.authority))
}

/// Appends the body of `resp` to `part` from byte `from` (truncating what
/// follows), hashing it; returns the end offset. A body that breaks off, or
/// would pass `limit` bytes in all, leaves `part` as far as it came (for
/// the next run to resume, or for the caller to remove).
pub(crate) async fn save_body(
    resp: &mut Response<Incoming>,
    part: &Path,
    from: u64,
    hasher: &mut blake3::Hasher,
    timeout: Duration,
    limit: u64,
) -> anyhow::Result<u64> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    file.set_len(from).await?;
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(from)).await?;
    let mut pos = from;
    let body = resp.body_mut();
    let result = loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        match tokio::time::timeout(timeout, next).await {
            Err(_) => break Err(Silent(timeout).into()),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(anyhow::anyhow!("the download broke off: {e}")),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let data: Bytes = data;
                    if pos.saturating_add(data.len() as u64) > limit {
                        break Err(anyhow::anyhow!("the server sent more than {limit} bytes"));
                    }
                    hasher.update(&data);
                    file.write_all(&data).await?;
                    pos += data.len() as u64;
                }
            }
        }
    };
    file.flush().await?;
    file.get_ref().sync_data().await?;
    result.with_context(|| {
        format!(
            "{} kept at {pos} bytes; run the same command again to resume",
            part.display()
        )
    })?;
    Ok(pos)
}

/// Names `part` `dest` once its BLAKE3 `got` is the expected one; a file
/// that does not match is removed (its bytes cannot be trusted).
async fn finish(
    part: &Path,
    dest: &Path,
    got: blake3::Hash,
    want: blake3::Hash,
) -> anyhow::Result<()> {
    if got != want {
        let _ = std::fs::remove_file(part);
        bail!(
            "BLAKE3 mismatch: the download hashes to {} but the link says {}; the partial file was removed, run the command again",
            got.to_hex(),
            want.to_hex()
        );
    }
    std::fs::rename(part, dest)
        .with_context(|| format!("cannot name the download {}", dest.display()))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The BLAKE3 hasher over the first `limit` bytes of `path`, and how many there were.
async fn hash_prefix(path: PathBuf, limit: u64) -> anyhow::Result<(blake3::Hasher, u64)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(blake3::Hasher, u64)> {
        use std::io::Read;
        let f = std::fs::File::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let n = std::io::copy(&mut f.take(limit), &mut hasher)?;
        Ok((hasher, n))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_parse_and_bad_ones_do_not() {
        let h = blake3::hash(b"x").to_hex();
        let u =
            FileUrl::parse(&format!("http://127.0.0.1:8080/files/lobby/{h}/a%20b.txt")).unwrap();
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.name, "a b.txt");
        assert!(!u.tls);
        let u = FileUrl::parse(&format!("https://chat.example.org/files/r/{h}/x.pdf")).unwrap();
        assert_eq!(
            (u.authority.as_str(), u.tls),
            ("chat.example.org:443", true)
        );
        let u = FileUrl::parse(&format!("http://[::1]/files/r/{h}/x")).unwrap();
        assert_eq!(u.authority, "[::1]:80");
        for bad in [
            format!("ftp://h/files/r/{h}/x"),
            format!("http://h/other/r/{h}/x"),
            "http://h/files/r/nothex/x".to_string(),
            format!("http://h/files/r/{h}/a%2Fb"),
            format!("http://h/files/r/{h}/.."),
        ] {
            assert!(FileUrl::parse(&bad).is_err(), "{bad}");
        }
    }
}

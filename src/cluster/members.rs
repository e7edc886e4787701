//! `netkit members URL`: fetches `GET /api/cluster` from a node's HTTP server
//! and prints the member table (or the JSON with `--json`). The request is a
//! plain HTTP/1.0 GET, so the answer comes unchunked and ends at close.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::report::ClusterReport;

/// Largest `/api/cluster` answer accepted, headers included.
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

/// Command-line options of `netkit members`.
#[derive(Debug, Clone, clap::Args)]
pub struct MembersArgs {
    /// The node's HTTP base URL, e.g. http://127.0.0.1:8080.
    pub url: String,
    /// Print the node's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// How the node's certificate is checked (https://).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
}

/// Runs `netkit members`: prints the cluster as the node at `url` sees it.
pub async fn run_command(args: MembersArgs) -> anyhow::Result<()> {
    let body = tokio::time::timeout(args.timeout, get_cluster_with(&args.url, &args.tls))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{}: no answer within {:?} — is `netkit serve --http ADDR` running there? (--timeout sets the limit)",
                args.url,
                args.timeout
            )
        })??;
    let report: ClusterReport = serde_json::from_str(&body).with_context(|| {
        format!(
            "{}/api/cluster did not answer with a cluster report — is this a netkit node's HTTP address?",
            args.url.trim_end_matches('/')
        )
    })?;
    let out = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        report.table()
    };
    let mut stdout = tokio::io::stdout();
    stdout.write_all(out.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// Splits `http://HOST:PORT[/]` (or `https://…`) into `HOST:PORT`.
pub fn authority(url: &str) -> anyhow::Result<&str> {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        bail!("'{url}' is not an HTTP base URL; give http://HOST:PORT, e.g. http://127.0.0.1:8080");
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        bail!(
            "'{url}': give the node's base URL only, http://HOST:PORT (the path /api/cluster is added)"
        );
    }
    Ok(host)
}

/// `GET /api/cluster` from the node at `url`; returns the body of a 200 answer.
pub async fn get_cluster(url: &str) -> anyhow::Result<String> {
    get_cluster_with(url, &crate::tls::ClientTlsArgs::default()).await
}

/// [`get_cluster`], checking an `https://` node's certificate as `tls` says.
pub async fn get_cluster_with(
    url: &str,
    tls: &crate::tls::ClientTlsArgs,
) -> anyhow::Result<String> {
    let host = authority(url)?;
    let tcp = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| {
            format!("cannot connect to {host} — is `netkit serve --http {host}` running?")
        })?;
    if url.starts_with("https://") {
        // The caller's timeout bounds the handshake too.
        let stream = tls
            .connect(tcp, host, &[b"http/1.1"], Duration::MAX)
            .await?;
        fetch(stream, host).await
    } else {
        fetch(tcp, host).await
    }
}

/// Sends the request over `stream` and reads the answer.
async fn fetch<S>(mut stream: S, host: &str) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET /api/cluster HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\nUser-Agent: netkit-members\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .await
        .with_context(|| format!("reading the answer of {host}"))?;
    if raw.len() as u64 > MAX_RESPONSE {
        bail!("{host}: the answer is larger than {MAX_RESPONSE} bytes; refusing it");
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{host}: not an HTTP answer — is this a netkit node's HTTP address?");
    };
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/") {
        bail!("{host}: not an HTTP answer — is this a netkit node's HTTP address?");
    }
    if code != "200" {
        bail!(
            "{host}: GET /api/cluster answered '{status}' — is this node a netkit serve of this version?"
        );
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            authority("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(authority("http://a:1/").unwrap(), "a:1");
        assert!(authority("127.0.0.1:8080").is_err());
        assert_eq!(authority("https://a:1").unwrap(), "a:1");
        assert!(authority("http://a:1/api/cluster").is_err());
        assert!(authority("http://").is_err());
    }
}

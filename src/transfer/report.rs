//! What became of each offered entry: [`FileReport`] for logs, `--json` and
//! exit codes, its [`Verdict`], and the MB/s rate both ends print.

use serde::Serialize;

use super::proto::EntryKind;

/// The outcome of one file or folder, for logs, `--json` and exit codes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileReport {
    /// The name as offered by the sender.
    pub name: String,
    /// The name it was stored under (may be `name (1).ext`), when stored or skipped.
    pub stored_as: Option<String>,
    /// `"file"` or `"dir"`.
    pub kind: &'static str,
    /// Size of the file in bytes (bytes received for a stream of unknown size).
    pub size: u64,
    /// Bytes that crossed the network for this file.
    pub transferred: u64,
    /// Offset the content resumed from (0 for a fresh transfer).
    pub resumed_from: u64,
    /// `stored`, `skipped`, `rejected` or `failed`.
    pub verdict: Verdict,
    /// Why, for `rejected` and `failed`.
    pub reason: Option<String>,
    /// Seconds from offer to confirmation.
    pub seconds: f64,
    /// Transferred bytes per second, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

/// What became of an offered entry.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Stored durably under its final name.
    Stored,
    /// An identical file was already there.
    Skipped,
    /// Refused before any content was sent.
    Rejected,
    /// Content was sent but not stored.
    Failed,
}

impl Verdict {
    /// True when the entry is safely at the receiver.
    pub fn confirmed(self) -> bool {
        matches!(self, Verdict::Stored | Verdict::Skipped)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Stored => "stored",
            Verdict::Skipped => "skipped",
            Verdict::Rejected => "rejected",
            Verdict::Failed => "failed",
        })
    }
}

impl FileReport {
    /// A one-line human summary.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<8} {} ({} bytes",
            self.verdict.to_string(),
            self.name,
            self.size
        );
        if self.resumed_from > 0 {
            s.push_str(&format!(", resumed at {}", self.resumed_from));
        }
        if self.transferred > 0 {
            s.push_str(&format!(", {:.1} MB/s", self.mb_per_s));
        }
        s.push(')');
        if let Some(n) = &self.stored_as
            && n != &self.name
        {
            s.push_str(&format!(" as {n}"));
        }
        if let Some(r) = &self.reason {
            s.push_str(&format!(": {r}"));
        }
        s
    }
}

/// Bytes per second in MB/s (10^6 bytes); 0 when no time passed.
pub(crate) fn rate(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

/// The report's `kind` for an entry kind: `"file"` or `"dir"`.
pub(crate) fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
    }
}

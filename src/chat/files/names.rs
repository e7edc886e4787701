//! The untrusted parts of a shared file: its name (validated on upload,
//! made safe for `Content-Disposition` on download) and its content type
//! (sniffed from the bytes, never taken from the uploader).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Longest file name accepted, in bytes (what most file systems store).
pub const MAX_NAME: usize = 255;

/// How many leading bytes the content type is sniffed from.
pub const SNIFF_LEN: usize = 8192;

/// Why a file name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    /// Empty, `.` or `..`.
    #[error("the file name is empty, '.' or '..'")]
    Empty,
    /// Over [`MAX_NAME`] bytes.
    #[error("the file name is {0} bytes long; the limit is {MAX_NAME}")]
    TooLong(usize),
    /// `/` or `\`.
    #[error("the file name {0:?} contains a path separator; give a plain name")]
    Separator(String),
    /// NUL, another control character, or an invisible format character.
    #[error("the file name {0:?} contains a control or invisible format character")]
    Control(String),
}

/// Checks an uploaded file's name: a plain name of 1–255 bytes, no `/` or
/// `\`, no control or Unicode format characters, not `.` or `..`.
pub fn check_name(name: &str) -> Result<(), BadName> {
    let shown = || {
        name.chars()
            .take(64)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(BadName::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(BadName::TooLong(name.len()));
    }
    if name.contains(['/', '\\']) {
        return Err(BadName::Separator(shown()));
    }
    if name
        .chars()
        .any(|c| c.is_control() || crate::transfer::names::is_format(c))
    {
        return Err(BadName::Control(shown()));
    }
    Ok(())
}

/// What RFC 5987 lets through unencoded in `filename*` (attr-char).
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `Content-Disposition: attachment` for `name` (RFC 6266): an ASCII
/// `filename` with anything else replaced by `_`, and the exact name
/// percent-encoded in `filename*`. A name that fails [`check_name`] is
/// served as `download`.
pub fn content_disposition(name: &str) -> String {
    let name = if check_name(name).is_ok() {
        name
    } else {
        "download"
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' && c != '%' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        utf8_percent_encode(name, ATTR_CHAR)
    )
}

/// The media type of content starting with `head` (at most [`SNIFF_LEN`]
/// bytes): a known signature, else HTML/SVG/XML markup, else UTF-8 text,
/// else `application/octet-stream`.
pub fn sniff(head: &[u8]) -> String {
    // Markup is told apart below (an SVG starts like any XML).
    if let Some(t) = infer::get(head)
        && !is_active(t.mime_type())
    {
        return t.mime_type().to_string();
    }
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        // A cut at the end of the sniffed part may split a character.
        Err(e) if head.len() - e.valid_up_to() < 4 && e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return "application/octet-stream".into(),
    };
    if text.contains('\0') {
        return "application/octet-stream".into();
    }
    let lower = text.trim_start_matches('\u{feff}').to_ascii_lowercase();
    let start = lower.trim_start();
    if lower.contains("<svg") {
        "image/svg+xml".into()
    } else if start.starts_with("<!doctype html")
        || ["<html", "<script", "<body", "<head", "<iframe"]
            .iter()
            .any(|t| lower.contains(t))
    {
        "text/html".into()
    } else if start.starts_with("<?xml") {
        "application/xml".into()
    } else if text.is_empty() {
        "application/octet-stream".into()
    } else {
        "text/plain".into()
    }
}

/// True for a type a browser could run or render as a document of this
/// origin (markup, script, style sheets): such files are served as
/// `application/octet-stream`.
pub fn is_active(mime: &str) -> bool {
    let m = mime.to_ascii_lowercase();
    (m.starts_with("text/") && m != "text/plain")
        || ["html", "xml", "svg", "javascript", "ecmascript", "wasm"]
            .iter()
            .any(|t| m.contains(t))
}

/// The `Content-Type` a download is served with: the sniffed type, or
/// `application/octet-stream` for active ones ([`is_active`]).
pub fn served_type(mime: &str) -> String {
    if is_active(mime) {
        "application/octet-stream".into()
    } else if mime == "text/plain" {
        "text/plain; charset=utf-8".into()
    } else {
        mime.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_separators_controls_or_too_many_bytes_are_refused() {
        assert!(check_name("report.pdf").is_ok());
        assert!(check_name("Bericht über 2024 (final).pdf").is_ok());
        assert_eq!(check_name(""), Err(BadName::Empty));
        assert_eq!(check_name(".."), Err(BadName::Empty));
        assert!(matches!(check_name("a/b"), Err(BadName::Separator(_))));
        assert!(matches!(check_name("..\\b"), Err(BadName::Separator(_))));
        assert!(matches!(check_name("a\0b"), Err(BadName::Control(_))));
        assert!(matches!(check_name("a\nb"), Err(BadName::Control(_))));
        assert!(matches!(
            check_name("a\u{202e}fdp.exe"),
            Err(BadName::Control(_))
        ));
        assert_eq!(check_name(&"x".repeat(300)), Err(BadName::TooLong(300)));
        assert!(check_name(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn dispositions_are_attachments_with_a_safe_ascii_and_an_exact_name() {
        assert_eq!(
            content_disposition("a b.txt"),
            "attachment; filename=\"a b.txt\"; filename*=UTF-8''a%20b.txt"
        );
        assert_eq!(
            content_disposition("über\"x\".pdf"),
            "attachment; filename=\"_ber_x_.pdf\"; filename*=UTF-8''%C3%BCber%22x%22.pdf"
        );
        assert_eq!(
            content_disposition("a\r\nSet-Cookie: x"),
            "attachment; filename=\"download\"; filename*=UTF-8''download"
        );
    }

    #[test]
    fn content_is_sniffed_and_active_types_are_never_served_as_such() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert_eq!(sniff(b"%PDF-1.7\n"), "application/pdf");
        assert_eq!(sniff(b"hello\n"), "text/plain");
        assert_eq!(sniff(b""), "application/octet-stream");
        assert_eq!(sniff(b"\x00\x01\x02"), "application/octet-stream");
        let svg = sniff(b"<?xml version=\"1.0\"?><svg onload=\"alert(1)\"/>");
        assert_eq!(svg, "image/svg+xml");
        let html = sniff(b"  <p>hi</p><script>alert(1)</script>");
        assert_eq!(html, "text/html");
        for t in [
            svg.as_str(),
            html.as_str(),
            "application/xhtml+xml",
            "text/css",
        ] {
            assert!(is_active(t), "{t}");
            assert_eq!(served_type(t), "application/octet-stream");
        }
        assert_eq!(served_type("image/png"), "image/png");
        assert_eq!(served_type("text/plain"), "text/plain; charset=utf-8");
    }
}

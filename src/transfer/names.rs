//! Names from the network are untrusted: validation component by component,
//! creation of parent folders that never follows a symlink, and the
//! `name (1).ext` scheme for keeping both files.

use std::io;
use std::path::{Path, PathBuf};

/// Longest relative path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest single component accepted, in bytes.
pub const MAX_COMPONENT: usize = 255;
/// Suffix of a file being received; never a valid offered name.
pub const PART_SUFFIX: &str = ".netkit-part";

/// Why an offered name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("empty name")]
    Empty,
    /// The name starts with `/`.
    #[error("absolute path {0:?}: names must be relative to the receiving folder")]
    Absolute(String),
    /// A `..` component.
    #[error("path {0:?} contains '..': names may not leave the receiving folder")]
    ParentDir(String),
    /// A `.` component.
    #[error("path {0:?} contains a '.' component")]
    CurDir(String),
    /// An empty component (`a//b`, trailing `/`).
    #[error("path {0:?} has an empty component ('//' or a trailing '/')")]
    EmptyComponent(String),
    /// NUL or another control character.
    #[error("path {0:?} contains a NUL or control character")]
    Control(String),
    /// A component longer than [`MAX_COMPONENT`] bytes.
    #[error("a component of the path is {0} bytes long; the limit is {MAX_COMPONENT}")]
    ComponentTooLong(usize),
    /// A path longer than [`MAX_PATH`] bytes.
    #[error("path is {0} bytes long; the limit is {MAX_PATH}")]
    PathTooLong(usize),
    /// The name ends with the reserved partial-file suffix.
    #[error("path {0:?} ends with the reserved suffix {PART_SUFFIX}")]
    Reserved(String),
    /// An invisible Unicode format character (category Cf), which can make a
    /// name display as another (`\u{202E}txt.exe` shows as `exe.txt`).
    #[error(
        "path {path:?} contains U+{code:04X}, a Unicode format character ({class}); \
         it can make the name display differently from what it is"
    )]
    Format {
        /// The offered path, escaped.
        path: String,
        /// The code point found.
        code: u32,
        /// Which kind of format character it is.
        class: &'static str,
    },
    /// With `--portable-names`: a name Windows or macOS cannot store.
    #[error("path {path:?} cannot be stored on Windows or macOS (--portable-names): {why}")]
    NotPortable {
        /// The offered path, escaped.
        path: String,
        /// What makes it unportable.
        why: String,
    },
}

/// Validates an offered relative path and returns its components.
pub fn validate(name: &str) -> Result<Vec<&str>, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_PATH {
        return Err(NameError::PathTooLong(name.len()));
    }
    let shown = || name.escape_debug().to_string();
    if name.chars().any(|c| c.is_control()) {
        return Err(NameError::Control(shown()));
    }
    if let Some(c) = name.chars().find(|c| is_format(*c)) {
        return Err(NameError::Format {
            path: shown(),
            code: c as u32,
            class: format_class(c),
        });
    }
    if name.starts_with('/') {
        return Err(NameError::Absolute(shown()));
    }
    let mut comps = Vec::new();
    for c in name.split('/') {
        match c {
            "" => return Err(NameError::EmptyComponent(shown())),
            "." => return Err(NameError::CurDir(shown())),
            ".." => return Err(NameError::ParentDir(shown())),
            c if c.len() > MAX_COMPONENT => return Err(NameError::ComponentTooLong(c.len())),
            c => comps.push(c),
        }
    }
    if name.ends_with(PART_SUFFIX) {
        return Err(NameError::Reserved(shown()));
    }
    Ok(comps)
}

/// True for a Unicode format character (general category Cf).
pub fn is_format(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.general_category() == GeneralCategory::Format
}

/// Names the kind of the format character `c`, for the refusal message.
fn format_class(c: char) -> &'static str {
    match c {
        '\u{202A}'..='\u{202E}' => "bidi embedding or override",
        '\u{2066}'..='\u{2069}' => "bidi isolate",
        '\u{200E}' | '\u{200F}' | '\u{061C}' => "bidi mark",
        '\u{200B}'..='\u{200D}' | '\u{2060}' => "zero-width character",
        '\u{FEFF}' => "byte order mark / zero-width no-break space",
        '\u{00AD}' => "soft hyphen",
        _ => "invisible format character",
    }
}

/// Device names Windows reserves in every folder, with or without an extension.
const WINDOWS_DEVICES: [&str; 4] = ["CON", "PRN", "AUX", "NUL"];

/// Checks the validated components `comps` of `name` against what Windows
/// and macOS can store: no reserved device names (`CON`, `NUL`, `COM1`…,
/// `LPT1`…), none of `\ : * ? " < > |`, no trailing dot or space.
pub fn check_portable(name: &str, comps: &[&str]) -> Result<(), NameError> {
    let refuse = |why: String| NameError::NotPortable {
        path: name.escape_debug().to_string(),
        why,
    };
    for c in comps {
        if let Some(bad) = c.chars().find(|ch| "\\:*?\"<>|".contains(*ch)) {
            return Err(refuse(format!("'{bad}' is not allowed in a name")));
        }
        if c.ends_with('.') || c.ends_with(' ') {
            return Err(refuse(format!("'{c}' ends with a dot or a space")));
        }
        let stem = c
            .split('.')
            .next()
            .unwrap_or(c)
            .trim_end()
            .to_ascii_uppercase();
        let numbered = |p: &str| {
            stem.strip_prefix(p)
                .is_some_and(|n| n.len() == 1 && n.as_bytes()[0].is_ascii_digit())
        };
        if WINDOWS_DEVICES.contains(&stem.as_str()) || numbered("COM") || numbered("LPT") {
            return Err(refuse(format!(
                "'{c}' is a reserved device name on Windows"
            )));
        }
    }
    Ok(())
}

/// Makes sure every parent folder of `comps` exists inside `root` as a real
/// directory, creating missing ones; refuses to pass through a symlink or a
/// non-directory. Returns the parent path.
pub fn ensure_parents(root: &Path, comps: &[&str]) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    let parents = &comps[..comps.len().saturating_sub(1)];
    for c in parents {
        dir.push(c);
        ensure_real_dir(&dir, c)?;
    }
    Ok(dir)
}

/// Creates `dir` if missing; fails if it is a symlink or not a directory.
pub fn ensure_real_dir(dir: &Path, shown: &str) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{shown}' is a symlink inside the receiving folder; refusing to write through it"
            ),
        )),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("'{shown}' exists and is not a folder"),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(dir) {
            Ok(()) => Ok(()),
            // Created concurrently by another sender: check again what it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let m = std::fs::symlink_metadata(dir)?;
                if m.is_dir() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("'{shown}' exists and is not a folder"),
                    ))
                }
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// The `n`th alternative for `file_name`: `report.pdf` → `report (n).pdf`.
pub fn numbered(file_name: &str, n: u32) -> String {
    // A leading dot is part of the stem (".bashrc" → ".bashrc (1)").
    match file_name.rfind('.') {
        Some(i) if i > 0 => format!("{} ({n}){}", &file_name[..i], &file_name[i..]),
        _ => format!("{file_name} ({n})"),
    }
}

/// The partial-file name for `file_name`.
pub fn part_name(file_name: &str) -> String {
    format!("{file_name}{PART_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        assert_eq!(validate("a.txt").unwrap(), vec!["a.txt"]);
        assert_eq!(validate("d/e/ünï cødé.txt").unwrap().len(), 3);
        assert!(validate("...").is_ok());
        assert!(validate("a..b").is_ok());
        assert!(validate(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn bad_names() {
        assert_eq!(validate(""), Err(NameError::Empty));
        assert!(matches!(
            validate("/etc/passwd"),
            Err(NameError::Absolute(_))
        ));
        assert!(matches!(validate("../x"), Err(NameError::ParentDir(_))));
        assert!(matches!(
            validate("a/../../x"),
            Err(NameError::ParentDir(_))
        ));
        assert!(matches!(validate("a/./x"), Err(NameError::CurDir(_))));
        assert!(matches!(
            validate("a//b"),
            Err(NameError::EmptyComponent(_))
        ));
        assert!(matches!(validate("a/"), Err(NameError::EmptyComponent(_))));
        assert!(matches!(validate("a\0b"), Err(NameError::Control(_))));
        assert!(matches!(validate("a\nb"), Err(NameError::Control(_))));
        assert!(matches!(validate("a\u{7f}"), Err(NameError::Control(_))));
        assert!(matches!(validate("a\u{85}"), Err(NameError::Control(_))));
        assert_eq!(
            validate(&"x".repeat(256)),
            Err(NameError::ComponentTooLong(256))
        );
        let long = vec!["y".repeat(200); 21].join("/");
        assert!(matches!(validate(&long), Err(NameError::PathTooLong(_))));
        assert!(matches!(
            validate("f.netkit-part"),
            Err(NameError::Reserved(_))
        ));
    }

    #[test]
    fn format_characters_are_refused_by_class() {
        let cases = [
            ('\u{202E}', "override"),
            ('\u{202A}', "embedding"),
            ('\u{2067}', "isolate"),
            ('\u{200F}', "mark"),
            ('\u{200B}', "zero-width"),
            ('\u{200D}', "zero-width"),
            ('\u{2060}', "zero-width"),
            ('\u{FEFF}', "byte order"),
            ('\u{00AD}', "soft hyphen"),
            ('\u{E0001}', "format character"),
        ];
        for (c, class) in cases {
            for name in [format!("{c}txt.exe"), format!("dir{c}/a.txt")] {
                let e = validate(&name).unwrap_err();
                assert!(
                    matches!(e, NameError::Format { code, .. } if code == c as u32),
                    "{name:?}: {e}"
                );
                assert!(e.to_string().contains(class), "{e}");
            }
        }
        // Letters, marks and emoji around them are fine.
        assert!(validate("ünï/日本語/e\u{301}.txt").is_ok());
    }

    #[test]
    fn portable_names() {
        let check = |n: &str| check_portable(n, &validate(n).unwrap());
        for bad in [
            "CON", "con.txt", "a/NUL", "Com1.log", "LPT9", "aux .txt", "a\\b", "c:d", "a*", "q?",
            "\"x\"", "<a>", "p|q", "trail.", "trail ", "d./f",
        ] {
            let e = check(bad).unwrap_err();
            assert!(matches!(e, NameError::NotPortable { .. }), "{bad}: {e}");
        }
        for good in ["CONSOLE", "com10", "LPT", "a.b.c", "x/y z.txt", ".hidden"] {
            assert!(check(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn numbering() {
        assert_eq!(numbered("report.pdf", 1), "report (1).pdf");
        assert_eq!(numbered("a.tar.gz", 2), "a.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
        assert_eq!(numbered(".bashrc", 1), ".bashrc (1)");
    }

    #[test]
    fn parents_never_pass_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let e = ensure_parents(root.path(), &["link", "x.txt"]).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        std::fs::write(root.path().join("file"), b"x").unwrap();
        let e = ensure_parents(root.path(), &["file", "x.txt"]).unwrap_err();
        assert!(e.to_string().contains("not a folder"), "{e}");
        let p = ensure_parents(root.path(), &["a", "b", "c.txt"]).unwrap();
        assert!(p.ends_with("a/b") && p.is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}

//! The one rule set for nicknames and room names: which names are allowed
//! ([`check_nick`], [`check_room`]) and when two names are the same name
//! ([`name_key`]: case folding, NFKC and the UTS #39 confusables skeleton).

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;
use unicode_security::{GeneralSecurityProfile, RestrictionLevel, RestrictionLevelDetection};

/// Longest nickname, in characters.
pub const MAX_NICK_CHARS: usize = 24;
/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 32;
/// Longest name in bytes (UTF-8), whatever its characters.
const MAX_NAME_BYTES: usize = 96;

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than the limit.
    #[error("must be 1 to {0} characters")]
    Length(usize),
    /// A bidirectional control (e.g. U+202E RIGHT-TO-LEFT OVERRIDE).
    #[error("contains the bidirectional control U+{0:04X}, which reorders how text is shown")]
    Bidi(u32),
    /// An invisible format character (zero-width joiner, BOM, …).
    #[error("contains the invisible character U+{0:04X}")]
    Invisible(u32),
    /// A compatibility form (fullwidth, ligature, superscript, …).
    #[error("uses compatibility characters; write it as '{0}'")]
    NotNfkc(String),
    /// A character that is not a letter, digit, `-` or `_`, or one UTS #39
    /// does not allow in identifiers.
    #[error("contains '{0}' (U+{1:04X}); use letters, digits, '-' or '_'")]
    Char(char, u32),
    /// Letters of scripts mixed the way UTS #39 calls suspicious (Latin with
    /// Cyrillic or Greek, say).
    #[error("mixes scripts (e.g. Latin with Cyrillic or Greek letters), as look-alike names do")]
    MixedScript,
    /// A combining mark with no letter before it.
    #[error("starts with a combining mark")]
    LeadingMark,
}

/// Checks a nickname against the rules (see [`check_name`]).
pub fn check_nick(nick: &str) -> Result<(), NameError> {
    check_name(nick, MAX_NICK_CHARS)
}

/// Checks a room name against the rules (see [`check_name`]).
pub fn check_room(room: &str) -> Result<(), NameError> {
    check_name(room, MAX_ROOM_CHARS)
}

/// The rules: 1–`max_chars` characters (and at most 96 bytes), each a letter,
/// mark or digit that UTS #39 allows in identifiers, or `-` or `_`; in NFKC
/// form; no bidi controls or invisible characters; and letters from one
/// script, or from scripts UTS #39's "moderately restrictive" level allows
/// together (Latin with Han and Japanese or Korean, or with one other script
/// that is not Cyrillic or Greek).
pub fn check_name(name: &str, max_chars: usize) -> Result<(), NameError> {
    let count = name.chars().count();
    if count == 0 || count > max_chars || name.len() > MAX_NAME_BYTES {
        return Err(NameError::Length(max_chars));
    }
    // The specific reasons first: they say more than "bad character".
    for ch in name.chars() {
        if is_bidi_control(ch) {
            return Err(NameError::Bidi(ch as u32));
        }
        if is_invisible(ch) {
            return Err(NameError::Invisible(ch as u32));
        }
    }
    let nfkc: String = name.nfkc().collect();
    if nfkc != name {
        return Err(NameError::NotNfkc(nfkc));
    }
    for ch in name.chars() {
        let word = ch.is_alphanumeric() || is_combining_mark(ch);
        if !(ch == '-' || ch == '_' || (word && ch.identifier_allowed())) {
            return Err(NameError::Char(ch, ch as u32));
        }
    }
    if name.chars().next().is_some_and(is_combining_mark) {
        return Err(NameError::LeadingMark);
    }
    let letters: String = name.chars().filter(|c| *c != '-' && *c != '_').collect();
    if letters.as_str().detect_restriction_level() > RestrictionLevel::ModeratelyRestrictive {
        return Err(NameError::MixedScript);
    }
    Ok(())
}

/// True if `name` passes [`check_nick`].
pub fn valid_nick(nick: &str) -> bool {
    check_nick(nick).is_ok()
}

/// True if `name` passes [`check_room`].
pub fn valid_room(room: &str) -> bool {
    check_room(room).is_ok()
}

/// The key two names are compared by: NFKC, lower case, then the UTS #39
/// confusables skeleton, lower-cased again (the skeleton maps some letters
/// to capitals, `0` to `O` say). Names with the same key are one name:
/// `alice`, `ALICE`, `аlice` (Cyrillic а) and `ａｌｉｃｅ` all have `alice`'s.
pub fn name_key(name: &str) -> String {
    let folded: String = name.nfkc().flat_map(char::to_lowercase).nfkc().collect();
    let skeleton: String = unicode_security::skeleton(&folded).collect();
    skeleton.chars().flat_map(char::to_lowercase).collect()
}

/// Unicode's Bidi_Control characters (ALM, LRM, RLM, the embeddings,
/// overrides and isolates).
fn is_bidi_control(ch: char) -> bool {
    matches!(ch, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Format (Cf) and other default-ignorable characters: zero-width space,
/// joiners, BOM, soft hyphen, variation selectors, tags.
fn is_invisible(ch: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    ch.general_category() == GeneralCategory::Format
        || matches!(ch, '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}'
            | '\u{180B}'..='\u{180F}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_and_keep_their_old_rules() {
        for ok in [
            "ann",
            "Bob_2",
            "x-y",
            "guest-17",
            "Zoë",
            "José",
            "Дмитрий",
            "名前",
            "Ελένη",
        ] {
            assert_eq!(check_nick(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_nick(""), Err(NameError::Length(24)));
        assert_eq!(check_nick(&"a".repeat(25)), Err(NameError::Length(24)));
        assert!(check_room(&"a".repeat(32)).is_ok());
        for bad in ["a b", "a.b", "a/b", "#x", "a\nb", "<b>", "a@b", "😀"] {
            assert!(matches!(check_nick(bad), Err(NameError::Char(..))), "{bad}");
        }
    }

    #[test]
    fn keys_fold_case_compatibility_and_confusables() {
        assert_eq!(name_key("Alice"), name_key("alice"));
        assert_eq!(name_key("ａｌｉｃｅ"), name_key("alice"));
        assert_eq!(name_key("\u{0430}lice"), name_key("alice"));
        assert_eq!(name_key("b0b"), name_key("BOB"));
        assert_ne!(name_key("alice"), name_key("alicia"));
    }
}

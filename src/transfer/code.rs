//! Transfer codes such as `7-crossword-hamster`: a public channel number and
//! a password of words from the PGP word list (even list, then odd list,
//! alternating, so a dropped or swapped word is caught when the code is typed).

use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};

/// The PGP word list: 256 lines of "even-word odd-word", one line per byte value.
const PGP_WORDS: &str = include_str!("pgp-words.txt");

/// Words in a generated code's password: two words are 16 bits, enough
/// because the PAKE allows one online guess per attempt.
pub const GENERATED_WORDS: usize = 2;

/// Highest channel number a generated code uses (short to type, public anyway).
pub const MAX_GENERATED_CHANNEL: u32 = 99;

/// Salt of the relay's channel id: it hashes the channel number, never the password.
const CHANNEL_SALT: &[u8] = b"netkit transfer v2 relay channel";

/// A parsed transfer code: channel number and password words.
#[derive(Clone, PartialEq, Eq)]
pub struct Code {
    channel: u32,
    words: Vec<&'static str>,
}

/// Why a string is not a transfer code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    /// No `N-` channel number in front.
    #[error("a code starts with a channel number, like 7-crossword-hamster")]
    NoChannel,
    /// Fewer than two words.
    #[error("a code has at least two words after the number, like 7-crossword-hamster")]
    TooShort,
    /// A word is not in the list, or in the wrong position.
    #[error("\"{0}\" is not a code word at position {1} — check the spelling and the order")]
    BadWord(String, usize),
}

/// The (even, odd) word lists, parsed once.
fn lists() -> &'static (Vec<&'static str>, Vec<&'static str>) {
    static LISTS: std::sync::OnceLock<(Vec<&'static str>, Vec<&'static str>)> =
        std::sync::OnceLock::new();
    LISTS.get_or_init(|| {
        PGP_WORDS
            .lines()
            .map(|l| l.split_once(' ').expect("word list line has two words"))
            .unzip()
    })
}

/// The word for byte `b` at position `pos` (even positions use the even list).
fn word(b: u8, pos: usize) -> &'static str {
    let (even, odd) = lists();
    if pos.is_multiple_of(2) {
        even[b as usize]
    } else {
        odd[b as usize]
    }
}

impl Code {
    /// A fresh code: a channel in 1..=[`MAX_GENERATED_CHANNEL`] and
    /// [`GENERATED_WORDS`] random words.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Code {
        let channel = 1 + rng.next_u32() % MAX_GENERATED_CHANNEL;
        let mut bytes = [0u8; GENERATED_WORDS];
        rng.fill_bytes(&mut bytes);
        let words = bytes.iter().enumerate().map(|(i, &b)| word(b, i)).collect();
        Code { channel, words }
    }

    /// Parses `7-crossword-hamster` (case-insensitive).
    pub fn parse(s: &str) -> Result<Code, CodeError> {
        let mut parts = s.trim().split('-');
        let channel = parts
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or(CodeError::NoChannel)?;
        let (even, odd) = lists();
        let words = parts
            .enumerate()
            .map(|(i, w)| {
                let w = w.to_ascii_lowercase();
                let list = if i % 2 == 0 { even } else { odd };
                list.iter()
                    .find(|x| **x == w)
                    .copied()
                    .ok_or(CodeError::BadWord(w, i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if words.len() < 2 {
            return Err(CodeError::TooShort);
        }
        Ok(Code { channel, words })
    }

    /// The public channel number.
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// The secret part, as the PAKE password: the words joined by `-`.
    pub fn password(&self) -> String {
        self.words.join("-")
    }

    /// Bits of password entropy when the words are chosen at random.
    pub fn password_bits(&self) -> usize {
        8 * self.words.len()
    }

    /// The relay's rendezvous id: SHA-256 of a fixed salt and the channel
    /// number. The relay learns which peers belong together, not the password.
    pub fn channel_id(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(CHANNEL_SALT);
        h.update(self.channel.to_be_bytes());
        h.finalize().into()
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.channel, self.password())
    }
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password stays out of logs.
        write!(f, "Code({}-…)", self.channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_list_is_the_pgp_list() {
        let (even, odd) = lists();
        assert_eq!((even.len(), odd.len()), (256, 256));
        assert_eq!((even[0], odd[0]), ("aardvark", "adroitness"));
        assert_eq!((even[255], odd[255]), ("zulu", "yucatan"));
        let all: std::collections::HashSet<_> = even.iter().chain(odd).collect();
        assert_eq!(all.len(), 512, "every word is unique across both lists");
    }

    #[test]
    fn generated_codes_round_trip_and_have_16_bits() {
        let mut rng = rand_core::OsRng;
        for _ in 0..200 {
            let c = Code::generate(&mut rng);
            assert!((1..=MAX_GENERATED_CHANNEL).contains(&c.channel()));
            assert!(c.password_bits() >= 16);
            assert_eq!(Code::parse(&c.to_string()).unwrap(), c);
        }
    }

    #[test]
    fn parse_checks_words_and_order() {
        let c = Code::parse("7-Aardvark-adroitness").unwrap();
        assert_eq!(
            (c.channel(), c.password()),
            (7, "aardvark-adroitness".into())
        );
        assert_eq!(
            Code::parse("x-aardvark-adroitness"),
            Err(CodeError::NoChannel)
        );
        assert_eq!(Code::parse("7-aardvark"), Err(CodeError::TooShort));
        // An odd-list word in an even position is a typo or a swap.
        assert_eq!(
            Code::parse("7-adroitness-aardvark"),
            Err(CodeError::BadWord("adroitness".into(), 1))
        );
        assert!(matches!(
            Code::parse("7-aardvark-nosuch"),
            Err(CodeError::BadWord(..))
        ));
    }

    #[test]
    fn channel_id_hides_the_password() {
        let a = Code::parse("7-aardvark-adroitness").unwrap();
        let b = Code::parse("7-zulu-yucatan").unwrap();
        let c = Code::parse("8-aardvark-adroitness").unwrap();
        assert_eq!(a.channel_id(), b.channel_id());
        assert_ne!(a.channel_id(), c.channel_id());
        assert!(!format!("{a:?}").contains("aardvark"));
    }
}

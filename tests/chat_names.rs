//! Nicks and room names that pass for another: each pair of the table is
//! refused, either as a duplicate of the existing name (same case-folded,
//! NFKC, UTS #39 skeleton) or as unsafe (bidi control, invisible character,
//! compatibility form, suspicious mix of scripts).

use netkit::chat::hub::{Hub, HubConfig, HubError};
use netkit::chat::names::{check_nick, name_key};

/// How a look-alike is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Same key as the existing nick: `nick_taken`.
    Duplicate,
    /// Breaks a rule by itself: `bad_nick`.
    Unsafe,
}

use Refused::{Duplicate, Unsafe};

/// (existing nick, look-alike, how it is refused).
const PAIRS: &[(&str, &str, Refused)] = &[
    // case
    ("alice", "Alice", Duplicate),
    ("alice", "ALICE", Duplicate),
    ("bob", "bOB", Duplicate),
    // NFKC compatibility forms (fullwidth, ligatures, super/subscripts, circled, signs)
    ("alice", "ａｌｉｃｅ", Unsafe),
    ("bob", "ＢＯＢ", Unsafe),
    ("ab", "ａb", Unsafe),
    ("file", "\u{FB01}le", Unsafe),
    ("x2", "x\u{00B2}", Unsafe),
    ("a1", "a\u{2460}", Unsafe),
    ("kevin", "\u{212A}evin", Unsafe),
    ("a_b", "a\u{FF3F}b", Unsafe),
    ("José", "Jose\u{0301}", Unsafe),
    // Cyrillic look-alikes: mixed with Latin (unsafe) or wholly Cyrillic (duplicate)
    ("alice", "\u{0430}lice", Unsafe),
    (
        "paypal",
        "\u{0440}\u{0430}\u{0443}\u{0440}\u{0430}l",
        Unsafe,
    ),
    ("eve", "\u{0435}v\u{0435}", Unsafe),
    ("ape", "\u{0430}\u{0440}\u{0435}", Duplicate),
    ("cop", "\u{0441}\u{043E}\u{0440}", Duplicate),
    ("xo", "\u{0445}\u{043E}", Duplicate),
    // Greek look-alikes
    ("nico", "nic\u{03BF}", Unsafe),
    ("kappa", "\u{03BA}appa", Unsafe),
    ("ao", "\u{03B1}\u{03BF}", Duplicate),
    // digits and letter pairs that read alike (UTS #39 confusables)
    ("loot", "l00t", Duplicate),
    ("bill", "bi11", Duplicate),
    ("modern", "rnodern", Duplicate),
    // zero-width and other invisible characters
    ("alice", "al\u{200D}ice", Unsafe),
    ("alice", "ali\u{200B}ce", Unsafe),
    ("alice", "alice\u{200C}", Unsafe),
    ("bob", "\u{FEFF}bob", Unsafe),
    ("bob", "b\u{00AD}ob", Unsafe),
    ("bob", "bob\u{FE0F}", Unsafe),
    // bidi controls
    ("alice", "\u{202E}ecila", Unsafe),
    ("alice", "alice\u{200F}", Unsafe),
    ("bob", "\u{2066}bob\u{2069}", Unsafe),
    ("bob", "b\u{202D}ob", Unsafe),
];

#[tokio::test]
async fn every_look_alike_nick_is_refused() {
    assert!(PAIRS.len() >= 30);
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = Hub::open(dir.path(), HubConfig::default()).unwrap();
    let mut held = Vec::new();
    for (existing, _, _) in PAIRS {
        if !held.iter().any(|(n, _)| n == existing) {
            let (s, i) = hub.connect(Some(existing)).unwrap();
            assert_eq!(s.nick(), *existing, "{existing} is a fine nick by itself");
            held.push((existing.to_string(), (s, i)));
        }
    }
    let (mallory, _mi) = hub.connect(None).unwrap();
    for (existing, fake, how) in PAIRS {
        let got = mallory.set_nick(fake);
        match how {
            Duplicate => {
                assert_eq!(check_nick(fake), Ok(()), "{fake:?} is valid alone");
                assert_eq!(name_key(fake), name_key(existing), "{fake:?}");
                assert_eq!(got, Err(HubError::NickTaken(fake.to_string())), "{fake:?}");
            }
            Unsafe => {
                assert!(check_nick(fake).is_err(), "{fake:?}");
                assert!(
                    matches!(got, Err(HubError::BadNick(..))),
                    "{fake:?}: {got:?}"
                );
            }
        }
        assert!(mallory.nick().starts_with("guest-"));
    }
}

#[tokio::test]
async fn unsafe_nicks_say_why() {
    let why = |n: &str| check_nick(n).unwrap_err().to_string();
    assert!(why("\u{202E}ecila").contains("bidirectional control U+202E"));
    assert!(why("al\u{200D}ice").contains("invisible character U+200D"));
    assert!(why("ａｌｉｃｅ").contains("write it as 'alice'"));
    assert!(why("\u{0430}lice").contains("mixes scripts"));
}

#[tokio::test]
async fn room_names_follow_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _w) = Hub::open(dir.path(), HubConfig::default()).unwrap();
    let (s, _i) = hub.connect(Some("ann")).unwrap();
    s.join("lobby", None).await.unwrap();
    s.settle().await;
    assert_eq!(
        s.join("Lobby", None).await,
        Err(HubError::RoomLookalike("Lobby".into(), "lobby".into()))
    );
    assert!(matches!(
        s.join("l0bby", None).await,
        Err(HubError::RoomLookalike(..))
    ));
    for unsafe_room in ["ｌobby", "l\u{03BF}bby", "lob\u{200B}by", "\u{202E}ybbol"] {
        assert!(
            matches!(s.join(unsafe_room, None).await, Err(HubError::BadRoom(..))),
            "{unsafe_room:?}"
        );
    }
    // A room of another script, and names that only share a prefix, are fine.
    s.join("лобби", None).await.unwrap();
    s.join("lobby2", None).await.unwrap();
}

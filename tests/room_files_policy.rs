//! Policies of room files without a network: the per-user daily quota
//! (charged at the start of an upload, given back on cancel) and retention
//! (old, unshared files removed and their messages marked expired).

use std::time::Duration;

use netkit::chat::files::{FileError, FileLimits, FileStore};
use netkit::chat::protocol::{FileRef, MessageKind, now_ms};
use netkit::chat::store::{NewMessage, Store};

fn store(dir: &std::path::Path, limits: FileLimits) -> FileStore {
    FileStore::open(
        dir,
        FileLimits {
            min_free: 0,
            ..limits
        },
    )
    .unwrap()
}

#[test]
fn the_daily_quota_counts_per_user_and_a_cancel_gives_back() {
    let dir = tempfile::tempdir().unwrap();
    let files = store(
        dir.path(),
        FileLimits {
            user_daily_quota: 1000,
            ..FileLimits::default()
        },
    );
    let a = files.create("lobby", "ann", "a.bin", 600).unwrap();
    let err = files.create("lobby", "ann", "b.bin", 500).unwrap_err();
    assert!(
        matches!(err, FileError::OverUserQuota { used: 600, .. }),
        "{err}"
    );
    // Another user has a quota of their own.
    files.create("lobby", "bob", "b.bin", 900).unwrap();
    files.cancel(&a);
    files.create("lobby", "ann", "b.bin", 1000).unwrap();
}

fn file_message(history: &mut Store, id: u64, file: &FileRef, ts: i64) {
    let text = file.summary();
    history
        .write_batch(
            &["lobby"],
            &[NewMessage {
                room: "lobby",
                id,
                from: "ann",
                text: &text,
                ts,
                kind: MessageKind::Say,
                origin: None,
                file: Some(file),
                moderation: None,
            }],
            &[],
            ts,
        )
        .unwrap();
}

/// Puts `content` in lobby's store as a file (dated now) and returns its reference.
fn put(dir: &std::path::Path, content: &[u8]) -> FileRef {
    let hex = blake3::hash(content).to_hex().to_string();
    let files = dir.join("rooms/lobby/files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join(&hex), content).unwrap();
    FileRef {
        name: "n.txt".into(),
        size: content.len() as u64,
        url: format!("http://h/files/lobby/{hex}/n.txt"),
        blake3: hex,
        mime: "text/plain".into(),
        expired: false,
        thumb: None,
    }
}

#[test]
fn retention_removes_old_unshared_files_and_their_messages_say_expired() {
    let dir = tempfile::tempdir().unwrap();
    let files = store(dir.path(), FileLimits::default());
    let mut history = Store::open_in(dir.path()).unwrap();
    let now = now_ms();
    let day = 86_400_000i64;
    let mut old = put(dir.path(), b"old report");
    // As if it were an image with a thumbnail: both go, and the message drops the link.
    let thumb =
        netkit::chat::files::thumbs::path(&dir.path().join("rooms/lobby/files"), &old.blake3);
    std::fs::create_dir_all(thumb.parent().unwrap()).unwrap();
    std::fs::write(&thumb, b"png").unwrap();
    old.thumb = Some(format!("http://h/thumbs/lobby/{}.png", old.blake3));
    let reshared = put(dir.path(), b"shared again lately");
    let orphan = put(dir.path(), b"never posted");
    file_message(&mut history, 1, &old, now);
    file_message(&mut history, 2, &reshared, now);
    // Forty days on: the second file was shared again a day before.
    let later = now + 40 * day;
    file_message(&mut history, 3, &reshared, later - day);
    let leftover = dir
        .path()
        .join("rooms/lobby/files/.drop/big.iso.netkit-part");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"half").unwrap();
    let week = Duration::from_secs(7 * 86_400);
    let removed = files.sweep(&mut history, later, week).unwrap();
    assert_eq!(removed, 2);
    assert!(files.stored("lobby", &old.blake3).is_err());
    assert!(files.stored("lobby", &orphan.blake3).is_err());
    assert!(files.stored("lobby", &reshared.blake3).is_ok());
    assert!(
        !leftover.exists(),
        "an unfinished drop past the retention goes too"
    );
    let msgs = history.latest("lobby", 0, u64::MAX, 10).unwrap();
    let first = msgs.iter().find(|m| m.id == 1).unwrap();
    assert!(first.file.as_ref().unwrap().expired);
    assert_eq!(first.file.as_ref().unwrap().thumb, None);
    assert!(!thumb.exists(), "the thumbnail goes with its file");
    assert!(first.text.contains("expired"), "{}", first.text);
    assert!(
        msgs.iter()
            .filter(|m| m.id != 1)
            .all(|m| !m.file.as_ref().unwrap().expired)
    );
    // Files younger than the retention stay, shared or not.
    let fresh = put(dir.path(), b"fresh");
    assert_eq!(files.sweep(&mut history, now_ms(), week).unwrap(), 0);
    assert!(files.stored("lobby", &fresh.blake3).is_ok());
}

//! A data dir made by the version before the one log (`chat.sqlite3` beside
//! `relay.sqlite3`) moves over at the hub's first start: messages keep their
//! ids, origins and sequences, what the relay store alone held is added, the
//! origin tag comes along, and the relay store is renamed only once the
//! import has committed. The fixture is built with the SQL that version ran
//! (its `CREATE TABLE`s, then the `ALTER TABLE`s by which its databases
//! gained the origin columns).

use std::collections::BTreeMap;
use std::path::Path;

use netkit::chat::hub::{Hub, HubConfig};
use netkit::chat::protocol::{ChatMessage, MessageKind};
use netkit::chat::store::{LogMessage, RelayImport, Store, StoreError};

const A: &str = "a/0000abcd";
const B: &str = "b/0000beef";

/// `chat.sqlite3` as the previous version made it, then as its origin
/// migration left it (`origin`, `origin_id` and their index).
const OLD_CHAT_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS rooms (
        name TEXT PRIMARY KEY,
        topic TEXT NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS messages (
        room TEXT NOT NULL,
        id INTEGER NOT NULL,
        nick TEXT NOT NULL,
        text TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL DEFAULT 'say',
        PRIMARY KEY (room, id)
    ) WITHOUT ROWID;";
const OLD_CHAT_ORIGIN: &str = "
    ALTER TABLE messages ADD COLUMN origin TEXT;
    ALTER TABLE messages ADD COLUMN origin_id INTEGER;
    CREATE INDEX IF NOT EXISTS messages_by_origin
        ON messages (room, origin, origin_id) WHERE origin IS NOT NULL;";

/// `relay.sqlite3` as the previous version made it, then with the
/// `origin_id` column its later releases added.
const OLD_RELAY_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS relay_messages (
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        room TEXT NOT NULL,
        nick TEXT NOT NULL,
        text TEXT NOT NULL,
        kind TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (origin, seq)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS relay_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );";
const OLD_RELAY_ORIGIN_ID: &str =
    "ALTER TABLE relay_messages ADD COLUMN origin_id INTEGER NOT NULL DEFAULT 0";

fn open_old(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn
}

/// Node a's data dir of the previous version: its own messages, b's
/// (keyed by origin id, and one relayed before origin ids, stored without
/// origin), one from before clustering, and what a `kill -9` between the
/// relay's record (`done = 0`) and the hub's commit left: one message the
/// hub committed and one it did not. One relayed row names a room no hub
/// accepts (the hub refused it then).
fn old_data_dir(dir: &Path) {
    let chat = open_old(&dir.join("chat.sqlite3"));
    chat.execute_batch(OLD_CHAT_SCHEMA).unwrap();
    chat.execute_batch(OLD_CHAT_ORIGIN).unwrap();
    chat.execute_batch(&format!(
        "INSERT INTO rooms VALUES ('lobby', 'hello', 1), ('dev', '', 2);
         INSERT INTO messages VALUES
             ('lobby', 1, 'ann', 'before clustering', 10, 'say', NULL, NULL),
             ('lobby', 2, 'bob', 'relayed before origin ids', 11, 'say', NULL, NULL),
             ('lobby', 3, 'ann', 'one', 12, 'say', '{A}', 3),
             ('lobby', 4, 'bob', 'two', 13, 'me', '{B}', 7),
             ('dev', 1, 'ann', 'in dev', 14, 'say', '{A}', 1),
             ('lobby', 5, 'bob', 'committed before the crash', 15, 'say', '{B}', 8);"
    ))
    .unwrap();
    let relay = open_old(&dir.join("relay.sqlite3"));
    relay.execute_batch(OLD_RELAY_SCHEMA).unwrap();
    relay.execute_batch(OLD_RELAY_ORIGIN_ID).unwrap();
    relay
        .execute_batch(&format!(
            "INSERT INTO relay_meta VALUES ('origin_tag', '0000abcd');
             INSERT INTO relay_messages (origin, seq, room, nick, text, kind, ts_ms, done, origin_id)
             VALUES
                 ('{A}', 1, 'lobby', 'ann', 'one', 'say', 12, 1, 3),
                 ('{A}', 2, 'dev', 'ann', 'in dev', 'say', 14, 1, 1),
                 ('{B}', 1, 'lobby', 'bob', 'relayed before origin ids', 'say', 11, 1, 0),
                 ('{B}', 2, 'lobby', 'bob', 'two', 'me', 13, 1, 7),
                 ('{B}', 3, 'lobby', 'bob', 'committed before the crash', 'say', 15, 0, 8),
                 ('{B}', 4, 'lobby', 'bob', 'lost in the crash', 'say', 16, 0, 9),
                 ('{B}', 5, 'no such room!', 'bob', 'refused', 'say', 17, 1, 10);"
        ))
        .unwrap();
}

fn unlimited() -> HubConfig {
    HubConfig {
        rate: 0.0,
        ..HubConfig::default()
    }
}

/// (id, text, origin, origin id) of each message of `room`, as clients see them.
fn shown(hub: &Hub, room: &str) -> Vec<(u64, String, Option<String>, u64)> {
    let page: Vec<ChatMessage> = hub.history(room, None, None, 100).unwrap();
    page.into_iter()
        .map(|m| (m.id, m.text, m.origin.map(String::from), m.origin_id))
        .collect()
}

fn seqs(log: &[LogMessage]) -> Vec<(u64, &str)> {
    log.iter().map(|m| (m.seq, m.text.as_str())).collect()
}

#[tokio::test]
async fn a_data_dir_of_the_previous_version_moves_into_the_one_log() {
    let dir = tempfile::tempdir().unwrap();
    old_data_dir(dir.path());
    let mut store = Store::open_in(dir.path()).unwrap();
    let report = store.import_relay_store(dir.path()).unwrap();
    let expected = RelayImport {
        keyed: 4,
        legacy: 1,
        added: 1,
        present: 0,
        skipped: 1,
    };
    assert_eq!(report, Some(expected));
    // Retired, not deleted.
    assert!(!dir.path().join("relay.sqlite3").exists());
    assert!(dir.path().join("relay.sqlite3.migrated").exists());
    // The origin tag and the sequences came along.
    assert_eq!(store.origin("a").unwrap(), A);
    let heads = store.log_heads().unwrap();
    assert_eq!(heads, BTreeMap::from([(A.into(), 2), (B.into(), 4)]));
    let a_log = store.log_after(A, 0, 10).unwrap();
    assert_eq!(seqs(&a_log), [(1, "one"), (2, "in dev")]);
    let b_log = store.log_after(B, 0, 10).unwrap();
    assert_eq!(
        seqs(&b_log),
        [
            (1, "relayed before origin ids"),
            (2, "two"),
            (3, "committed before the crash"),
            (4, "lost in the crash")
        ]
    );
    assert_eq!(b_log[1].kind, MessageKind::Me);
    assert_eq!(b_log[1].origin_id, 7);
    drop(store);

    // Clients see the same ids and origins; the message the crash kept
    // from the hub is there once, with the next id.
    let (hub, writer) = Hub::open(dir.path(), unlimited()).unwrap();
    assert!(hub.set_origin(A.into()));
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        shown(&hub, "lobby"),
        [
            (1, "before clustering".into(), None, 0),
            (2, "relayed before origin ids".into(), None, 0),
            (3, "one".into(), some(A), 3),
            (4, "two".into(), some(B), 7),
            (5, "committed before the crash".into(), some(B), 8),
            (6, "lost in the crash".into(), some(B), 9),
        ]
    );
    assert_eq!(shown(&hub, "dev"), [(1, "in dev".into(), some(A), 1)]);
    assert_eq!(hub.rooms()[1].topic, "hello");

    // A new message here continues a's numbering; one of b's relayed again
    // dies in the store.
    assert_eq!(*hub.local_seq().borrow(), 2);
    let (ann, _inbox) = hub.connect(Some("ann")).unwrap();
    ann.join("lobby", None).await.unwrap();
    ann.say("lobby", "new".into(), MessageKind::Say)
        .await
        .unwrap();
    hub.apply_remote(b_log[1].clone()).await.unwrap();
    hub.sync_writes().await.unwrap();
    assert_eq!(*hub.local_seq().borrow(), 3);
    let log = Store::open_in(dir.path()).unwrap();
    assert_eq!(seqs(&log.log_after(A, 2, 10).unwrap()), [(3, "new")]);
    assert_eq!(log.count("lobby").unwrap(), 7);
    drop((ann, hub));
    writer.join();

    // Importing the same relay store again changes nothing.
    std::fs::rename(
        dir.path().join("relay.sqlite3.migrated"),
        dir.path().join("relay.sqlite3"),
    )
    .unwrap();
    let mut store = Store::open_in(dir.path()).unwrap();
    let again = store.import_relay_store(dir.path()).unwrap().unwrap();
    assert_eq!((again.present, again.skipped, again.added), (6, 1, 0));
    assert_eq!(store.count("lobby").unwrap(), 7);
    assert_eq!(store.import_relay_store(dir.path()).unwrap(), None);
}

/// If the relay store cannot be renamed after the import commits, it stays
/// where it was, the hub does not start, and the next start finds every
/// message imported already.
#[test]
fn the_relay_store_stays_until_its_import_has_committed() {
    let dir = tempfile::tempdir().unwrap();
    old_data_dir(dir.path());
    let blocker = dir.path().join("relay.sqlite3.migrated");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("in the way"), b"").unwrap();
    match Hub::open(dir.path(), unlimited()) {
        Err(StoreError::Retire { path, .. }) => assert_eq!(path, dir.path().join("relay.sqlite3")),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("the hub started with the relay store in place"),
    }
    assert!(dir.path().join("relay.sqlite3").exists());
    std::fs::remove_dir_all(&blocker).unwrap();
    let mut store = Store::open_in(dir.path()).unwrap();
    let report = store.import_relay_store(dir.path()).unwrap().unwrap();
    assert_eq!((report.present, report.added), (6, 0));
    assert_eq!(store.count("lobby").unwrap(), 6);
}

/// The oldest stores: a history without origin columns and a relay store
/// without origin ids. Their rows are matched by content and get origins
/// and sequences in the log; clients still see them without origin.
#[test]
fn stores_from_before_origin_ids_move_over_too() {
    let dir = tempfile::tempdir().unwrap();
    let chat = open_old(&dir.path().join("chat.sqlite3"));
    chat.execute_batch(OLD_CHAT_SCHEMA).unwrap();
    chat.execute_batch(
        "INSERT INTO rooms VALUES ('r', '', 1);
         INSERT INTO messages VALUES ('r', 1, 'ann', 'mine', 5, 'say'), ('r', 2, 'bob', 'old', 5, 'say');",
    )
    .unwrap();
    let relay = open_old(&dir.path().join("relay.sqlite3"));
    relay.execute_batch(OLD_RELAY_SCHEMA).unwrap();
    relay
        .execute_batch(&format!(
            "INSERT INTO relay_meta VALUES ('origin_tag', '0000abcd');
             INSERT INTO relay_messages VALUES ('{A}', 1, 'r', 'ann', 'mine', 'say', 5, 1),
                 ('{B}', 1, 'r', 'bob', 'old', 'say', 5, 1);"
        ))
        .unwrap();
    drop((chat, relay));
    let (hub, _writer) = Hub::open(dir.path(), unlimited()).unwrap();
    assert_eq!(
        shown(&hub, "r"),
        [(1, "mine".into(), None, 0), (2, "old".into(), None, 0)]
    );
    let log = Store::open_in(dir.path()).unwrap();
    assert_eq!(log.origin("a").unwrap(), A);
    assert_eq!(seqs(&log.log_after(B, 0, 10).unwrap()), [(1, "old")]);
    assert_eq!(log.log_after(B, 0, 10).unwrap()[0].origin_id, 0);
    assert_eq!(seqs(&log.log_after(A, 0, 10).unwrap()), [(1, "mine")]);
}

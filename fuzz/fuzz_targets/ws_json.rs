//! WebSocket JSON client messages: any text either fails to parse or gives a
//! message that survives serialise-then-parse unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netkit::chat::protocol::{ClientMsg, valid_nick, valid_room};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = valid_room(text);
    let _ = valid_nick(text);
    if let Ok(msg) = serde_json::from_str::<ClientMsg>(text) {
        let again = serde_json::to_string(&msg).unwrap();
        assert_eq!(serde_json::from_str::<ClientMsg>(&again).unwrap(), msg);
    }
});

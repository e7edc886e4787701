//! Gossip and relay packets: plain decode, opening with a key, and the relay
//! packet decoder take any datagram without panicking; whatever decodes
//! survives encode-then-decode.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netkit::cluster::relay::RelayPacket;
use netkit::cluster::wire::{self, Packet, Sealer};

/// One sealer for the whole run (deriving the key is slow on purpose).
fn sealer() -> &'static Sealer {
    static S: OnceLock<Sealer> = OnceLock::new();
    S.get_or_init(|| Sealer::from_passphrase("fuzz"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Packet::App(frame)) = wire::decode(data) {
        let mut out = Vec::new();
        wire::frame_app(&frame, &mut out);
        assert_eq!(wire::decode(&out).unwrap(), Packet::App(frame));
    }
    if let Ok(plain) = sealer().open(data) {
        let _ = wire::decode(&plain);
    }
    let mut sealed = Vec::new();
    sealer().seal(data, [7; 24], &mut sealed);
    assert_eq!(sealer().open(&sealed).unwrap(), data);
    if let Some(p) = RelayPacket::decode(data) {
        assert_eq!(RelayPacket::decode(&p.encode()), Some(p));
    }
});

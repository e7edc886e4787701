//! Tests of the frames and the preamble: round trips, limits and malformed input.

use super::*;
use proptest::prelude::*;

fn roundtrip_s(f: SenderFrame) {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    let total = b.len();
    // Every strict prefix asks for more bytes.
    for cut in 0..total {
        let mut part = BytesMut::from(&b[..cut]);
        assert_eq!(SenderFrame::decode(&mut part).unwrap(), None, "cut {cut}");
    }
    assert_eq!(SenderFrame::decode(&mut b).unwrap(), Some(f));
    assert!(b.is_empty());
}

fn roundtrip_r(f: ReceiverFrame) {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    assert_eq!(ReceiverFrame::decode(&mut b).unwrap(), Some(f));
    assert!(b.is_empty());
}

#[test]
fn sender_frames_roundtrip() {
    roundtrip_s(SenderFrame::Offer(Offer {
        path: "dir/ünïcødé file.txt".into(),
        kind: EntryKind::File,
        size: Some(12345),
        mode: 0o644,
        mtime: Some((1_700_000_000, 123)),
    }));
    roundtrip_s(SenderFrame::Offer(Offer {
        path: "d".into(),
        kind: EntryKind::Dir,
        size: None,
        mode: 0o755,
        mtime: None,
    }));
    roundtrip_s(SenderFrame::Start { offset: 77 });
    roundtrip_s(SenderFrame::Same);
    roundtrip_s(SenderFrame::Data(Bytes::from_static(b"hello")));
    roundtrip_s(SenderFrame::Data(Bytes::new()));
    roundtrip_s(SenderFrame::Done { hash: [7; 32] });
    roundtrip_s(SenderFrame::Bye);
    roundtrip_s(SenderFrame::Room {
        room: "general".into(),
        ticket: "1f.1700000000000.general.abcd".into(),
    });
    roundtrip_s(SenderFrame::Error {
        reason: "disk on fire".into(),
    });
}

#[test]
fn receiver_frames_roundtrip() {
    roundtrip_r(ReceiverFrame::Accept {
        offset: 5,
        prefix_hash: [1; 32],
    });
    roundtrip_r(ReceiverFrame::Check { hash: [2; 32] });
    roundtrip_r(ReceiverFrame::Reject {
        reason: "no".into(),
    });
    roundtrip_r(ReceiverFrame::Stored {
        name: "a (1).txt".into(),
        size: 9,
    });
    roundtrip_r(ReceiverFrame::Skipped { name: "a".into() });
    roundtrip_r(ReceiverFrame::Failed {
        reason: "hash".into(),
    });
    roundtrip_r(ReceiverFrame::Error {
        reason: "bye".into(),
    });
}

#[test]
fn oversized_frames_are_rejected_from_the_header() {
    let mut b = BytesMut::from(&[tag::OFFER, 0, 1, 0, 1][..]);
    assert!(matches!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::Oversized { .. })
    ));
    let mut b = BytesMut::from(&[tag::DATA, 0, 0x10, 0, 1][..]);
    assert!(matches!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::Oversized { .. })
    ));
    // Exactly at the limit is fine (only the header is present: needs more).
    let mut b = BytesMut::from(&[tag::DATA, 0, 0x10, 0, 0][..]);
    assert_eq!(SenderFrame::decode(&mut b).unwrap(), None);
    assert_eq!(bytes_needed(&b), MAX_DATA_FRAME);
}

#[test]
fn bad_frames() {
    let mut b = BytesMut::from(&[0x99, 0, 0, 0, 0][..]);
    assert_eq!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::UnknownType(0x99))
    );
    // A receiver frame type is unknown to the sender-frame decoder.
    let mut b = BytesMut::from(&[tag::ACCEPT, 0, 0, 0, 0][..]);
    assert!(SenderFrame::decode(&mut b).is_err());
    // Trailing bytes.
    let mut b = BytesMut::from(&[tag::BYE, 0, 0, 0, 1, 0][..]);
    assert!(matches!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::Malformed { .. })
    ));
    // Short payload.
    let mut b = BytesMut::from(&[tag::START, 0, 0, 0, 2, 0, 0][..]);
    assert!(matches!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::Malformed { .. })
    ));
    // Invalid UTF-8 in a path.
    let mut b = BytesMut::new();
    b.put_u8(tag::ERROR);
    b.put_u32(4);
    b.put_u16(2);
    b.put_slice(&[0xff, 0xfe]);
    assert!(matches!(
        SenderFrame::decode(&mut b),
        Err(ProtoError::Malformed { .. })
    ));
}

#[test]
fn preamble() {
    let p = Preamble::OURS.encode();
    assert_eq!(Preamble::decode(&p).unwrap(), Preamble::OURS);
    Preamble::OURS.check_compatible().unwrap();
    let mut other = p;
    other[9] = 2;
    assert!(matches!(
        Preamble::decode(&other).unwrap().check_compatible(),
        Err(ProtoError::Version { peer: 2, ours: 1 })
    ));
    let mut auth = p;
    auth[10] = 1;
    assert_eq!(
        Preamble::decode(&auth).unwrap().check_compatible(),
        Err(ProtoError::Auth(1))
    );
    let http = *b"GET / HTTP/1";
    let e = Preamble::decode(&http).unwrap_err();
    assert!(
        e.to_string().contains("not a netkit transfer endpoint"),
        "{e}"
    );
}

#[test]
fn reasons_are_clipped() {
    let long = "é".repeat(2000);
    let c = clip_reason(&long);
    assert!(c.len() <= MAX_REASON);
    assert!(long.starts_with(c));
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The worked example of docs/transfer-protocol.md, byte for byte.
#[test]
fn worked_example_matches_the_docs() {
    let enc_s = |f: SenderFrame| {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        hex(&b)
    };
    let enc_r = |f: ReceiverFrame| {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        hex(&b)
    };
    assert_eq!(
        hex(&Preamble::OURS.encode()),
        "4e 45 54 4b 49 54 58 46 00 01 00 00"
    );
    assert_eq!(
        enc_s(SenderFrame::Offer(Offer {
            path: "docs/hi.txt".into(),
            kind: EntryKind::File,
            size: Some(3),
            mode: 0o644,
            mtime: Some((1_700_000_000, 0)),
        })),
        "01 00 00 00 27 00 03 00 00 00 00 00 00 00 03 00 00 01 a4 00 00 00 00 65 53 f1 00 00 00 00 00 00 0b 64 6f 63 73 2f 68 69 2e 74 78 74"
    );
    assert_eq!(
        enc_r(ReceiverFrame::Accept {
            offset: 0,
            prefix_hash: [0; 32]
        }),
        format!("41 00 00 00 28 00 00 00 00 00 00 00 00{}", " 00".repeat(32))
    );
    assert_eq!(
        enc_s(SenderFrame::Start { offset: 0 }),
        "02 00 00 00 08 00 00 00 00 00 00 00 00"
    );
    assert_eq!(
        enc_s(SenderFrame::Data(Bytes::from_static(b"hi\n"))),
        "04 00 00 00 03 68 69 0a"
    );
    assert_eq!(
        blake3::hash(b"hi\n").to_hex().as_str(),
        "0b8b60248fad7ac6dfac221b7e01a8b91c772421a15b387dd1fb2d6a94aee438"
    );
    assert_eq!(
        enc_s(SenderFrame::Done {
            hash: *blake3::hash(b"hi\n").as_bytes()
        }),
        "05 00 00 00 20 0b 8b 60 24 8f ad 7a c6 df ac 22 1b 7e 01 a8 b9 1c 77 24 21 a1 5b 38 7d d1 fb 2d 6a 94 ae e4 38"
    );
    assert_eq!(
        enc_r(ReceiverFrame::Stored {
            name: "docs/hi.txt".into(),
            size: 3
        }),
        "44 00 00 00 15 00 00 00 00 00 00 00 03 00 0b 64 6f 63 73 2f 68 69 2e 74 78 74"
    );
    assert_eq!(enc_s(SenderFrame::Bye), "06 00 00 00 00");
}

proptest! {
    #[test]
    fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut b = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = SenderFrame::decode(&mut b) {}
        let mut b = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = ReceiverFrame::decode(&mut b) {}
    }

    #[test]
    fn offers_roundtrip(path in "\\PC{0,64}", size in proptest::option::of(any::<u64>()),
                        mode in any::<u32>(), secs in any::<i64>(), nanos in 0u32..1_000_000_000,
                        has_mtime in any::<bool>(), dir in any::<bool>()) {
        let f = SenderFrame::Offer(Offer {
            path,
            kind: if dir { EntryKind::Dir } else { EntryKind::File },
            size,
            mode,
            mtime: has_mtime.then_some((secs, nanos)),
        });
        let mut b = BytesMut::new();
        f.encode(&mut b);
        prop_assert_eq!(SenderFrame::decode(&mut b).unwrap(), Some(f));
    }

    #[test]
    fn split_stream_decodes_the_same(cuts in proptest::collection::vec(1usize..40, 1..20)) {
        // A stream of frames fed in arbitrary pieces decodes to the same frames.
        let frames = vec![
            SenderFrame::Start { offset: 3 },
            SenderFrame::Data(Bytes::from_static(b"0123456789abcdef")),
            SenderFrame::Done { hash: [9; 32] },
            SenderFrame::Bye,
        ];
        let mut wire = BytesMut::new();
        for f in &frames { f.encode(&mut wire); }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let n = cuts[i % cuts.len()].min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            i += 1;
            while let Some(f) = SenderFrame::decode(&mut buf).unwrap() { got.push(f); }
        }
        prop_assert_eq!(got, frames);
    }
}

//! Transfer frames: any bytes fed to both frame decoders (and the preamble)
//! must give a frame, "need more", or an error — never a panic, never a frame
//! that does not survive encode-then-decode unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netkit::transfer::proto::{PREAMBLE_LEN, Preamble, ReceiverFrame, SenderFrame};

/// Decodes frames of type `$frame` from `$data` until it fails or needs
/// more; each must encode to exactly the bytes that decode to it again.
macro_rules! round_trips {
    ($frame:ty, $data:expr) => {
        let mut buf = BytesMut::from($data);
        while let Ok(Some(f)) = <$frame>::decode(&mut buf) {
            let mut again = BytesMut::new();
            f.encode(&mut again);
            assert_eq!(<$frame>::decode(&mut again).unwrap(), Some(f));
            assert!(again.is_empty(), "encode wrote more than one frame");
        }
    };
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = <&[u8; PREAMBLE_LEN]>::try_from(data.get(..PREAMBLE_LEN).unwrap_or(&[])) {
        if let Ok(pre) = Preamble::decode(p) {
            let _ = pre.check_compatible();
            assert_eq!(Preamble::decode(&pre.encode()).ok(), Some(pre));
        }
    }
    round_trips!(SenderFrame, data);
    round_trips!(ReceiverFrame, data);
});

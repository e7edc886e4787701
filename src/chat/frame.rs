//! The one WebSocket frame the hub builds itself: a message's JSON as a
//! finished, unmasked text frame, made once and sent as-is to every WebSocket
//! recipient. Apart from [`super::ws`] so that the hub does not depend on it.

use bytes::Bytes;

/// `payload` as one final, unmasked WebSocket text frame (RFC 6455 §5.2).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let n = payload.len();
    let mut out = Vec::with_capacity(n + 10);
    out.push(0x81); // FIN, text
    if n < 126 {
        out.push(n as u8);
    } else if let Ok(n16) = u16::try_from(n) {
        out.push(126);
        out.extend_from_slice(&n16.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Length of the header of a frame made by [`text_frame`].
pub fn frame_header_len(frame: &[u8]) -> usize {
    match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    #[test]
    fn text_frames_match_tungstenite() {
        for n in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; n];
            let ours = text_frame(&payload);
            let mut theirs = Vec::new();
            Frame::message(payload.clone(), OpCode::Data(Data::Text), true)
                .format(&mut theirs)
                .unwrap();
            assert_eq!(&ours[..], &theirs[..], "length {n}");
            assert_eq!(&ours[frame_header_len(&ours)..], &payload[..]);
        }
    }
}

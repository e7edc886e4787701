//! The line chat's parser: `read_line_limited` never holds more than its
//! limit and never loses a byte between lines, and `parse_line` takes any
//! text without panicking.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netkit::chat::line::{LineRead, parse_line, read_line_limited};

/// The line limit under test: small, so long lines are common in the corpus.
const MAX: usize = 64;

/// One runtime for the whole run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // A tiny read buffer, so lines straddle reads.
        let mut rd = tokio::io::BufReader::with_capacity(7, data);
        let mut buf = Vec::new();
        let mut lines = 0;
        loop {
            match read_line_limited(&mut rd, &mut buf, MAX).await.unwrap() {
                LineRead::Eof => break,
                LineRead::TooLong => assert!(buf.is_empty()),
                LineRead::Line => {
                    assert!(buf.len() <= MAX && !buf.contains(&b'\n'));
                    let text = String::from_utf8_lossy(&buf);
                    let _ = parse_line(&text, None);
                    let _ = parse_line(&text, Some("lobby"));
                }
            }
            lines += 1;
            assert!(lines <= data.len() + 1, "more lines than bytes");
        }
    });
});

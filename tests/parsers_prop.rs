//! Property tests for the issue-2 parsers: arbitrary input never panics, and
//! the answers do not depend on how the input is cut into reads.

use std::time::Duration;

use netkit::net::addr::{Network, split};
use netkit::service::{Control, Service};
use proptest::prelude::*;

const NETS: [&str; 9] = [
    "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6", "ip", "ip4", "ip6",
];

proptest! {
    #[test]
    fn split_never_panics(net in 0usize..9, s in ".{0,80}") {
        let n: Network = NETS[net].parse().unwrap();
        let _ = split(n, &s);
    }

    #[test]
    fn split_accepts_what_it_formats(a in any::<u32>(), port in any::<u16>()) {
        let ip = std::net::Ipv4Addr::from(a);
        let hp = split("tcp".parse().unwrap(), &format!("{ip}:{port}")).unwrap();
        prop_assert_eq!(hp.host, ip.to_string());
        prop_assert_eq!(hp.port, Some(port));
    }

    #[test]
    fn parse_helpers_never_panic(s in ".{0,40}") {
        let _ = netkit::cli::parse_duration(&s);
        let _ = netkit::cli::parse_size(&s);
        let _ = s.parse::<netkit::cli::Listen>();
        let _ = s.parse::<netkit::net::conns::TcpState>();
    }

    #[test]
    fn rand_answers_one_line_per_request(lines in proptest::collection::vec("[^\n]{0,30}", 0..40)) {
        let mut out = Vec::new();
        let mut answered = 0;
        for l in &lines {
            match Service::Rand.on_line(l.as_bytes(), &mut out) {
                Control::Continue => answered += 1,
                Control::Close => break,
            }
        }
        prop_assert_eq!(out.iter().filter(|b| **b == b'\n').count(), answered);
    }
}

/// The line server over a real socket: however a stream of lines is split
/// into writes, every line gets exactly one answer.
#[test]
fn chunking_does_not_change_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let config = netkit::tcp::server::Config {
            max_line: 64,
            ..Default::default()
        };
        tokio::spawn(netkit::tcp::server::run(
            listener,
            config,
            Default::default(),
            shutdown.clone(),
        ));
        let input: Vec<u8> = (0..300)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        for chunk in [1usize, 2, 3, 7, 64, 1000] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            for piece in input.chunks(chunk) {
                c.write_all(piece).await.unwrap();
            }
            c.write_all(b"STOP\n").await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                out.iter().filter(|b| **b == b'\n').count(),
                300,
                "chunk size {chunk}"
            );
        }
        shutdown.cancel();
    });
}

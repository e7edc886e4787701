//! netkit: a network toolkit — TCP and UDP services and clients, address
//! resolution, the TCP connection table, file transfer, a chat hub and gossip
//! membership — composed by `netkit serve` into one server.
//!
//! # Layout
//!
//! - [`shutdown`]: signal handling and the cancellation/tracking helpers every server uses.
//! - [`net`]: address resolution ([`net::addr`]) and the TCP connection table ([`net::conns`]).
//! - [`service`]: the services (rand, echo, daytime, discard) the TCP and UDP servers share, sans-IO.
//! - [`tcp`]: the concurrent line server ([`tcp::server`]) and the nc-like client ([`tcp::client`]).
//! - [`udp`]: the datagram server ([`udp::server`]) and the retransmitting client ([`udp::client`]).
//! - [`transfer`]: verified, resumable file transfer — frames ([`transfer::proto`]), untrusted names ([`transfer::names`]), the two ends ([`transfer::send`], [`transfer::recv`]) over a framed connection and the receiver's disk side, and the outcome of each entry ([`transfer::report`]).
//! - [`chat`]: the chat hub ([`chat::hub`]), its SQLite history ([`chat::store`]), wire types ([`chat::protocol`]), WebSocket and TCP line adapters ([`chat::ws`], [`chat::line`]) and `netkit chat` ([`chat::client`]).
//! - [`http`]: the HTTP front door: web app, `/ws`, JSON API, `/metrics`;
//!   `netkit get`, the download client of room files; and the fetch of a
//!   room file from another node of the cluster ([`http::files_fetch`]).
//! - [`cluster`]: gossip membership with foca — sans-IO node ([`cluster::node`]), tokio driver ([`cluster::membership`]), packet format and sealing ([`cluster::wire`]), the chat relay between nodes ([`cluster::relay`]), presence across nodes ([`cluster::relay::presence`]), the `/api/cluster` report ([`cluster::report`]) and `netkit members` ([`cluster::members`]).
//! - [`tls`]: one TLS acceptor (reloading certificate, handshake timeout) and client configuration (roots, CA, pin) for every door.
//! - [`serve`]: composes the services for `netkit serve`.
//! - [`ready`]: the `--ready-json` line that tells scripts and tests the bound addresses.
//! - [`cli`]: small parsers shared by the command line (listen addresses, durations, sizes).
#![warn(missing_docs)]

pub mod chat;
pub mod cli;
pub mod cluster;
pub mod http;
pub mod net;
pub mod ready;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod tcp;
pub mod tls;
pub mod transfer;
pub mod udp;

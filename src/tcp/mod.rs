//! TCP: a concurrent line server, its services, and an nc-like client.

pub mod client;
pub mod server;
pub mod service;

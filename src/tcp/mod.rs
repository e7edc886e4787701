//! TCP: a concurrent line server (running a [`crate::service`]) and an nc-like client.

pub mod client;
pub mod server;

//! Network basics: the shared accept step, per-door TLS and per-address limits,
//! address resolution and the TCP connection table.

pub mod accept;
pub mod addr;
pub mod conns;
pub mod door;
pub mod limit;

//! Network basics: address resolution and the TCP connection table.

pub mod addr;
pub mod conns;

//! Network basics: the shared accept step, address resolution and the TCP connection table.

pub mod accept;
pub mod addr;
pub mod conns;

//! Test support for the Pilot workspace: the deterministic network simulator and transfer
//! drivers built on it, and the NAT lab of real daemons in network namespaces (`natlab`).
//! The scenario tests live in `tests/tests/`, the transport benchmark in `tests/benches/`.

pub mod natlab;
pub mod nodesim;
pub mod sim;
pub mod transfer;

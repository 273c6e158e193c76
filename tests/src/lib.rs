//! Test support for the Pilot workspace: the deterministic network simulator and transfer
//! drivers built on it. The scenario tests live in `tests/tests/`, the transport benchmark in
//! `tests/benches/`.

pub mod nodesim;
pub mod sim;
pub mod transfer;

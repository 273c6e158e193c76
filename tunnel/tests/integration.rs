//! The protocol core's integration tests: each file of this directory is one module of this single test
//! binary, so the shared helpers are built once and the crate links one test executable.
//! Run one area with a name filter, e.g. `cargo test --test integration -- crypto::`.

mod common;

mod crypto;
mod identity;
mod ipc_wire;
mod rekey_v1;
mod roundtrip;
mod stream_wire;

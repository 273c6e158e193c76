//! pilot-beacon's integration tests: each file of this directory is one module of this single test
//! binary, so the shared helpers are built once and the crate links one test executable.
//! Run one area with a name filter, e.g. `cargo test --test integration -- config_file::`.

mod config_file;
mod logs;
mod registry_failover;
mod token_check;
mod udp;

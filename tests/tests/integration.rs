//! The workspace's multi-process, simulator and package tests: each file of this directory is one module of this single test
//! binary, so the shared helpers are built once and the crate links one test executable.
//! Run one area with a name filter, e.g. `cargo test --test integration -- node_sim::`.

mod nat_lab;
mod node_sim;
mod packages;
mod pilotctl_e2e;
mod readme_commands;
mod stream_prop;
mod stream_sim;

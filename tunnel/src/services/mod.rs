//! Codecs of the built-in services that run over Pilot streams (v1 wire §8): the data
//! exchange frames (port 1001), the event stream frames (port 1002) and the nameserver's
//! line protocol (port 53). Sans-IO like the rest of the crate: the daemon's servers and the
//! clients in `pilot-driver` read and write the bytes, these modules only parse and build
//! them. Every parser takes bytes from a peer and never panics on them.

pub mod dataexchange;
pub mod eventstream;
pub mod nameserver;

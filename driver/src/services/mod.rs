//! Clients of the built-in services every daemon runs (v1 wire §8), over a [`crate::PilotStream`]
//! or any other `AsyncRead + AsyncWrite`: data exchange (port 1001), the event stream
//! (port 1002) and the nameserver (port 53). Their wire codecs are sans-IO, in
//! [`tunnel::services`]; the servers are in the daemon.

pub mod dataexchange;
pub mod eventstream;
pub mod nameserver;

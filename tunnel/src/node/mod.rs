//! The node core, sans-IO: the peer table ([`tunnels`]), the SYN limiter ([`synlimit`]) and,
//! above them, [`Node`], which joins the peer table to the connection table.
//!
//! Nothing here opens a socket or reads a clock: time and randomness come in from the caller.

pub mod synlimit;
pub mod tunnels;

//! The inside: the TUN side of the daemon, where the kernel hands packets to Pilot.

pub mod datapath;
pub mod firewall;
pub mod iface;
pub mod resolver;

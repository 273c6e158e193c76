//! Zero-copy wire formats: the Pilot packet header and the tunnel frames around it.
//!
//! Each format has a view over a byte buffer (`new_checked` for input from the network) and,
//! where useful, a `Repr` with `parse`/`emit`. Parsers never panic on any input.

pub mod beacon;
pub mod frame;
pub mod header;

pub use frame::{Frame, FrameError, FrameKind};
pub use header::{Flags, HeaderError, Packet, PacketRepr, Protocol, HEADER_LEN};

//! The Pilot registry. Built so far: its wire protocol ([`proto`]: frame codec, typed v1
//! request catalogue, challenge strings) and the name rules ([`names`]: hostnames, tags,
//! network names, default hostname). The server itself (state, storage, authentication, rate
//! limits) is not built yet; see the open issues.

pub mod names;
pub mod proto;

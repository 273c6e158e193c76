//! The Pilot registry. Built so far: the wire protocol ([`proto`]): frame codec, typed request
//! catalogue and v1 challenge strings. The server (state, storage, authentication, rate
//! limits) is not built yet; see the open issues.

pub mod proto;

//! Placeholder: this crate has no code yet. Its scope is described in the
//! workspace README and in the open issues.

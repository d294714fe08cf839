//! The choice of a target for a client.
pub mod hash;

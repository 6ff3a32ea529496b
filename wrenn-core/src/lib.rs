//! Wrenn's core: domain types, the traits the implementation crates fill in,
//! and the capsule lifecycle logic.
//!
//! This crate performs no syscalls, spawns no processes and opens no sockets,
//! so everything in it can be read and tested in isolation.
#![forbid(unsafe_code)]

/// Port envd listens on inside every capsule.
pub const ENVD_PORT: u16 = 49983;

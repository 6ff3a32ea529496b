//! envd: the agent that runs inside every capsule and gives the host processes and
//! files over HTTP and Connect RPC, wire-compatible with E2B's envd so the official
//! `e2b` SDK works against it unmodified.
//!
//! The protocol modules ([`proto`], [`connect`]) are shared with the host-side client;
//! the guest daemon lives behind the `server` feature.

pub mod connect;
pub mod proto;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "client")]
pub mod dial;

/// The envd version reported to SDKs: the highest E2B version gate whose features
/// are all implemented here (metadata xattrs, entry info in watch events,
/// network-mount watch guard included).
pub const ENVD_VERSION: &str = "0.6.4";

/// Default port inside a capsule.
pub const DEFAULT_PORT: u16 = 49983;

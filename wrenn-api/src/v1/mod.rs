//! The Wrenn REST API, `/v1/…`.

pub mod account;
pub mod admin;
pub mod builds;
pub mod capsules;
pub mod channels;
pub mod files;
pub mod hosts;
pub mod snapshots;
pub mod stats;
pub mod ws;

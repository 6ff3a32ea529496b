//! The host agent's gRPC protocol (`proto/agent.proto`, one RPC per operation of
//! [`wrenn_core::host::HostAgent`]): [`serve`] puts any host agent on the network, and
//! [`RemoteAgent`] is a `HostAgent` that calls one there. The control plane uses the
//! client; `wrenn agent` serves its `LocalAgent`. Neither side links the other's stack.

mod client;
mod convert;
mod server;
mod tls;
mod tunnel;

/// The generated messages, client and server.
#[allow(clippy::all, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("wrenn.agent.v1");
}

pub use client::{ConnectError, RemoteAgent, Timeouts};
pub use convert::ERROR_KIND;
pub use server::{serve, AgentService, ServeError};
pub use tls::serve_tls;

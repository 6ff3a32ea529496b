//! Generates the host agent's gRPC messages, client and server from
//! `proto/agent.proto`, compiled by protox (no system `protoc`).

const PROTO: &str = "proto/agent.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_build::configure()
        // Tunnel bytes are passed on without copies.
        .bytes([
            ".wrenn.agent.v1.TunnelFrame",
            ".wrenn.agent.v1.TemplateChunk",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}

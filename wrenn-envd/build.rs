//! Generates envd's wire messages from `proto/*.proto`: prost types for the binary
//! codec and pbjson serde impls for protobuf JSON (Connect's JSON codec). The files
//! are compiled by protox, so no system `protoc` is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &["proto/process.proto", "proto/filesystem.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let descriptor_path = out.join("envd_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    prost_build::Config::new()
        .bytes(["."])
        .extern_path(".google.protobuf.Timestamp", "crate::proto::Timestamp")
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        .extern_path(".google.protobuf.Timestamp", "crate::proto::Timestamp")
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}

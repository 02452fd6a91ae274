//! Generates the envelope types at build time.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate so a fresh machine needs no system
//! protobuf compiler; an explicit `PROTOC` in the environment still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // Payloads can be large: `Bytes` lets the sink slice them without copying.
    config.bytes([".hookpipe.envelope.v1.Envelope.payload"]);
    // The BigQuery row's descriptor travels with every Storage Write connection.
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    config.file_descriptor_set_path(&descriptors);
    config.compile_protos(
        &[
            "proto/hookpipe/envelope/v1/envelope.proto",
            "proto/hookpipe/bigquery/v1/row.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

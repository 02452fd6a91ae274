//! The envelope schema shared by ingest-gateway and bq-sink, generated from
//! `proto/hookpipe/envelope/v1/envelope.proto` at build time.

/// Version 1 of the envelope package. A breaking change would be a new `v2` module next to it.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/hookpipe.envelope.v1.rs"));
}

/// The row appended through the BigQuery Storage Write API.
pub mod bigquery {
    include!(concat!(env!("OUT_DIR"), "/hookpipe.bigquery.v1.rs"));
}

/// The compiled descriptors of every message here (a `FileDescriptorSet`), so the sink can send
/// the row's descriptor as its writer schema.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

pub use prost::Message;
pub use v1::{DeadLetter, Envelope, Parked};

//! The envelope schema shared by ingest-gateway and bq-sink, generated from
//! `proto/hookpipe/envelope/v1/envelope.proto` at build time.

/// Version 1 of the envelope package. A breaking change would be a new `v2` module next to it.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/hookpipe.envelope.v1.rs"));
}

pub use prost::Message;
pub use v1::{DeadLetter, Envelope, Parked};

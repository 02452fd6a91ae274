//! ingest-gateway: the stateless HTTP front of the pipeline. It checks the stream and the
//! sender's auth, wraps each call in a protobuf envelope and answers 202 only once Kafka has
//! acknowledged it.

pub mod auth;
pub mod config;
pub mod console;
pub mod envelope;
pub mod error;
pub mod http;
pub mod metrics;
pub mod publisher;
pub mod server;
pub mod snippets;
pub mod streams;
pub mod topic_check;

#[cfg(test)]
mod http_tests;

//! bq-sink: the Kafka consumer group that turns envelopes into rows of each stream's BigQuery
//! table, in micro-batches, committing offsets only after rows are written.

pub mod audit;
pub mod batch;
pub mod config;
pub mod consumer;
pub mod decide;
pub mod dedup;
pub mod group;
pub mod metrics;
pub mod offsets;
pub mod parking;
pub mod pipeline;
pub mod replay;
pub mod row;
pub mod shelf;
pub mod warehouse;
pub mod writer;

//! bq-sink: the Kafka consumer group that turns envelopes into rows of each stream's BigQuery
//! table, in micro-batches, committing offsets only after rows are written.

pub mod batch;
pub mod bigquery;
pub mod config;
pub mod deadletter;
pub mod dedup;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod replay;
pub mod row;
pub mod stall;

//! bq-sink

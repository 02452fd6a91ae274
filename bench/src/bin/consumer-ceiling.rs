//! The sink's ceiling: a plain consumer that only reads and decodes the same messages (with a
//! fresh group, from the start of the topic), and stops after `--count`. Prints one JSON line
//! with the CPU time it used.

use std::time::{Duration, Instant};

use clap::Parser;
use hookpipe_bench::cpu_time;
use hookpipe_proto::{Envelope, Message as _};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    count: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("ceiling-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("partition.assignment.strategy", "range")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&args.topic]).expect("subscribe");
    let cpu_start = cpu_time();
    let start = Instant::now();
    let (mut read, mut bytes) = (0u64, 0u64);
    while read < args.count {
        match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Ok(Ok(message)) => {
                let value = message.payload().unwrap_or(&[]);
                let envelope = Envelope::decode(value).expect("an envelope");
                bytes += envelope.payload.len() as u64;
                read += 1;
            }
            Ok(Err(e)) => eprintln!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    let cpu = cpu_time().saturating_sub(cpu_start);
    println!(
        "{}",
        serde_json::json!({
            "messages": read,
            "payload_bytes": bytes,
            "seconds": start.elapsed().as_secs_f64(),
            "cpu_seconds": cpu.as_secs_f64(),
            "cpu_ms_per_1000": cpu.as_secs_f64() * 1e6 / read.max(1) as f64,
        })
    );
}

//! `scripts/soak`: the soak from the command line (see `hookpipe_tests::soak`). Prints the
//! summary and exits 1 unless nothing acknowledged was lost or duplicated.

use std::time::Duration;

use clap::Parser;
use hookpipe_tests::soak::{self, Config};

/// Webhooks at a steady rate through the real pipeline while servers are killed and restarted;
/// then every acknowledged webhook must be in BigQuery exactly once.
#[derive(Parser, Debug)]
struct Args {
    /// The short form (3,000 hits, one fault of each kind) that scripts/test runs.
    #[arg(long)]
    quick: bool,
    /// Webhooks to send (default 50,000; 3,000 with --quick).
    #[arg(long)]
    hits: Option<u64>,
    /// Webhooks per second.
    #[arg(long)]
    rate: Option<u32>,
    #[arg(long)]
    sink_kills: Option<u32>,
    #[arg(long)]
    gateway_kills: Option<u32>,
    #[arg(long)]
    broker_restarts: Option<u32>,
    #[arg(long)]
    broker_pauses: Option<u32>,
    #[arg(long)]
    emulator_restarts: Option<u32>,
    /// Seconds a broker pause lasts (the soak's sink has a 3 s session timeout).
    #[arg(long)]
    pause_for: Option<u64>,
    /// Every n-th webhook without an Idempotency-Key (0: none).
    #[arg(long)]
    keyless_every: Option<u64>,
    /// Seconds a killed server stays down.
    #[arg(long)]
    down_for: Option<u64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut config = if args.quick {
        Config::quick()
    } else {
        Config::full()
    };
    config.hits = args.hits.unwrap_or(config.hits);
    config.rate = args.rate.unwrap_or(config.rate);
    config.sink_kills = args.sink_kills.unwrap_or(config.sink_kills);
    config.gateway_kills = args.gateway_kills.unwrap_or(config.gateway_kills);
    config.broker_restarts = args.broker_restarts.unwrap_or(config.broker_restarts);
    config.broker_pauses = args.broker_pauses.unwrap_or(config.broker_pauses);
    config.emulator_restarts = args.emulator_restarts.unwrap_or(config.emulator_restarts);
    config.pause_for = args.pause_for.map_or(config.pause_for, Duration::from_secs);
    config.keyless_every = args.keyless_every.unwrap_or(config.keyless_every);
    config.down_for = args.down_for.map_or(config.down_for, Duration::from_secs);
    eprintln!("{config:?}");
    let summary = soak::run(&config).await;
    println!("{summary}");
    if !summary.passed() {
        std::process::exit(1);
    }
}

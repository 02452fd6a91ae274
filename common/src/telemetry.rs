//! Logging set-up shared by both binaries: `HOOKPIPE_LOG` (an env-filter directive, default
//! `info`) and `HOOKPIPE_LOG_FORMAT` (`text` or `json`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_env("HOOKPIPE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let json = std::env::var("HOOKPIPE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

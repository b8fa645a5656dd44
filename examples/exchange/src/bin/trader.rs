//! `exchange-trader`: load the exchange like real clients and check that nothing was
//! lost or doubled. See `exchange-trader --help`.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use exchange::trader::TraderConfig;

/// Simulated traders: each registers, logs in, follows its WebSocket feed
/// (resuming from its last sequence number after any disconnect) and places limit
/// orders with an Idempotency-Key, retrying failures with backoff. At the end it
/// checks the trade service's books and the feeds and prints a tally: orders lost,
/// duplicated, notifications missed (all must be 0), failed requests, latency.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The user service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7001")]
    user_url: String,
    /// The trade service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7002")]
    trade_url: String,
    /// The notification service's base URL (http://; the feed is at /ws).
    #[arg(long, default_value = "http://127.0.0.1:7003")]
    notify_url: String,
    /// Number of simulated traders.
    #[arg(long, default_value_t = 8)]
    traders: usize,
    /// Orders per second, all traders together.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long to place orders, e.g. 30s or 2m. SIGINT or SIGTERM stops earlier;
    /// the books are checked either way.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Markets to trade, comma-separated (must exist on the trade service).
    #[arg(long, default_value = "BTC-USD,ETH-USD", value_delimiter = ',')]
    markets: Vec<String>,
    /// Attempts per request, the first included.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// Output format of the tally.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Print a progress line to stderr every second (default: with text output).
    #[arg(long)]
    progress: bool,
    /// Exit with status 1 unless nothing was lost or doubled.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.traders == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        anyhow::bail!("--traders and --rate must be positive");
    }
    if args.markets.is_empty() {
        anyhow::bail!("--markets must name at least one market");
    }
    let cfg = TraderConfig {
        user_url: args.user_url.trim_end_matches('/').to_string(),
        trade_url: args.trade_url.trim_end_matches('/').to_string(),
        notify_url: args.notify_url.trim_end_matches('/').to_string(),
        traders: args.traders,
        rate: args.rate,
        duration: args.duration,
        markets: args.markets,
        max_attempts: args.max_attempts.max(1),
        progress: args.progress || matches!(args.output, Output::Text),
        ..TraderConfig::default()
    };
    let duration = args.duration;
    let stop = async move {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = exchange::service::terminated() => eprintln!("stopping the load; checking the books"),
        }
    };
    let tally = exchange::trader::run_until(cfg, stop).await?;
    match args.output {
        Output::Text => print!("{}", tally.render()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&tally)?),
    }
    if args.check && !tally.is_clean() {
        eprintln!("something was lost or doubled");
        std::process::exit(1);
    }
    Ok(())
}

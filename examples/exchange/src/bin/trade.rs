//! `exchange-trade`: limit orders and matching. See `exchange-trade --help`.

use clap::Parser;
use exchange::service::{Common, CommonArgs, init_logs, serve};
use exchange::services::trade::{TradeMetrics, TradeState, router};
use exchange::store::Store;

/// The exchange's trade service: POST/GET /orders, GET/DELETE /orders/{id},
/// GET /trades, GET /book/{market}. Send an Idempotency-Key header with each
/// placement so that a retried request never creates a second order.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Markets traded, comma-separated.
    #[arg(
        long,
        env = "EXCHANGE_MARKETS",
        default_value = "BTC-USD,ETH-USD",
        value_delimiter = ','
    )]
    markets: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs();
    args.common.check()?;
    let tokens = args.common.tokens(3600)?;
    let store = Store::open(&args.common.database_url).await?;
    let metrics = TradeMetrics::default();
    let common = Common::new("trade", &args.common, |r| metrics.register(r));
    let markets = args
        .markets
        .iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    let state = TradeState {
        store,
        tokens,
        markets,
        metrics,
    };
    let app = common.router(router(std::sync::Arc::new(state)));
    common.set_ready();
    serve(common, &args.common, app, async {}).await
}

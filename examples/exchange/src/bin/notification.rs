//! `exchange-notification`: the WebSocket feed. See `exchange-notification --help`.

use std::time::Duration;

use clap::Parser;
use exchange::service::{Common, CommonArgs, init_logs, serve};
use exchange::services::notification::{NotifyMetrics, NotifyState, router};
use exchange::store::Store;

/// The exchange's notification service: GET /ws?since=SEQ (WebSocket, token in
/// Authorization or ?token=) streams the user's events in sequence order; GET
/// /events?since=SEQ returns them as JSON. On SIGTERM clients are told to reconnect
/// (close 1012).
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// After SIGTERM, how long to wait for WebSocket clients to leave.
    #[arg(long, env = "DRAIN_TIMEOUT_SECONDS", default_value_t = 10.0)]
    drain_timeout_seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs();
    args.common.check()?;
    let drain_timeout = Duration::try_from_secs_f64(args.drain_timeout_seconds)
        .map_err(|_| anyhow::anyhow!("DRAIN_TIMEOUT_SECONDS must be a non-negative number"))?;
    let tokens = args.common.tokens(3600)?;
    let store = Store::open(&args.common.database_url).await?;
    let metrics = NotifyMetrics::default();
    let common = Common::new("notification", &args.common, |r| metrics.register(r));
    let state = NotifyState::new(store, tokens, metrics);
    state.spawn_poller();
    let app = common.router(router(state.clone()));
    common.set_ready();
    serve(common, &args.common, app, async move {
        state.drain(drain_timeout).await
    })
    .await
}

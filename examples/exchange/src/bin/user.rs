//! `exchange-user`: accounts and access tokens. See `exchange-user --help`.

use clap::Parser;
use exchange::service::{Common, CommonArgs, init_logs, serve};
use exchange::services::user::{UserState, router};
use exchange::store::Store;

/// The exchange's user service: POST /register, POST /login, GET /users/me.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Make sure this account exists at start (for smoke tests: a login round trip
    /// against a new version before it takes traffic).
    #[arg(long, env = "SMOKE_USER", requires = "smoke_password")]
    smoke_user: Option<String>,
    #[arg(long, env = "SMOKE_PASSWORD", hide_env_values = true)]
    smoke_password: Option<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, env = "TOKEN_TTL_SECONDS", default_value_t = 3600)]
    token_ttl_seconds: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs();
    args.common.check()?;
    let tokens = args.common.tokens(args.token_ttl_seconds)?;
    let store = Store::open(&args.common.database_url).await?;
    if let (Some(user), Some(password)) = (&args.smoke_user, &args.smoke_password) {
        let hash = exchange::auth::hash_password(password)?;
        match store.create_user(user, &hash).await {
            Ok(_) | Err(exchange::store::StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let common = Common::new("user", &args.common, |_| {});
    let app = common.router(router(std::sync::Arc::new(UserState { store, tokens })));
    common.set_ready();
    serve(common, &args.common, app, async {}).await
}

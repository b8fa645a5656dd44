//! `baton smoke`: what a cluster's smoke Job runs. The same HTTP checks `baton up` runs
//! against a blue-green preview instance, against a Service by name; the tests come as
//! JSON data in one argument, so nothing of them is ever shell text.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use baton_spec::SmokeTest;
use clap::Args;

#[derive(Args, Debug)]
pub struct SmokeArgs {
    /// Where to send the checks: `http://HOST[:PORT]` (the operator passes the preview
    /// Service, `http://NAME.NAMESPACE.svc`).
    #[arg(long, value_name = "URL")]
    url: String,
    /// The checks, as a spec's `smoke` list in JSON, e.g. `[{"path": "/readyz"}]`.
    #[arg(long, value_name = "JSON")]
    tests: String,
    /// How long each check may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Exit status 0 when every check passed, 1 with the first failure otherwise.
pub async fn run(args: SmokeArgs) -> Result<()> {
    let tests: Vec<SmokeTest> =
        serde_json::from_str(&args.tests).context("--tests: not a JSON list of smoke tests")?;
    let Some(authority) = args.url.strip_prefix("http://") else {
        bail!("--url: {:?} must start with http://", args.url);
    };
    let authority = authority.trim_end_matches('/');
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("--url: cannot resolve {with_port}"))?
        .next()
        .with_context(|| format!("--url: {with_port} has no address"))?;
    match baton_analysis::run_smoke(addr, &tests, args.timeout).await {
        Ok(passed) => {
            println!("{passed}");
            Ok(())
        }
        Err(failed) => bail!("smoke test failed: {failed}"),
    }
}

//! `baton demo`: a whole story in the terminal, on the exchange or the hello example.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use baton::demo;
use clap::{Args, ValueEnum};

use super::{Output, print_as};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Which example to roll out.
    #[arg(long, value_enum, default_value = "exchange")]
    example: Example,
    /// Load: orders per second (exchange, default 150) or requests per second
    /// (hello, default 400).
    #[arg(long)]
    rate: Option<u32>,
    /// Simulated traders (exchange).
    #[arg(long, default_value_t = 8)]
    traders: usize,
    /// Concurrent keep-alive clients (hello).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The hello binary (default: `hello` beside this executable).
    #[arg(long, value_name = "PATH")]
    hello: Option<PathBuf>,
    /// Directory holding the exchange's binaries (default: beside this executable).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Working directory for the demo's state (default: a new temporary one).
    #[arg(long = "workdir", value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Serve the proxy's metrics here (hello; default: a free port).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Gate the error rate with PromQL on this Prometheus (hello; it must scrape
    /// --metrics-listen) instead of the proxy's own counters.
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

/// The example `baton demo` rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Example {
    /// A mock crypto exchange: user, trade and notification services and a trader.
    Exchange,
    /// A tiny HTTP service.
    Hello,
}

/// Fails when the rollouts themselves lost or broke something, so a script (or CI)
/// can run the demo as a test.
pub async fn run(args: DemoArgs) -> Result<()> {
    if args.rate == Some(0) || args.concurrency == 0 || args.traders == 0 {
        bail!("--rate, --traders and --concurrency must be at least 1");
    }
    match args.example {
        Example::Exchange => exchange(args).await,
        Example::Hello => hello(args).await,
    }
}

async fn exchange(args: DemoArgs) -> Result<()> {
    let json = args.output.structured();
    let s = demo::exchange::run(demo::exchange::ExchangeDemoOptions {
        dir: args.workdir,
        bin_dir: args.bin_dir,
        traders: args.traders,
        rate: args.rate.unwrap_or(150),
        narrate_to_stderr: json,
    })
    .await?;
    if json {
        print_as(args.output, &serde_json::to_value(&s)?)?;
    } else {
        print!("{}", demo::exchange::render_summary(&s));
    }
    if !s.is_clean() {
        bail!(
            "the rollouts lost or doubled something, or failed requests themselves (see the summary)"
        );
    }
    Ok(())
}

async fn hello(args: DemoArgs) -> Result<()> {
    let json = args.output.structured();
    let s = demo::run(demo::DemoOptions {
        dir: args.workdir,
        hello: args.hello,
        rate: args.rate.unwrap_or(400),
        concurrency: args.concurrency,
        narrate_to_stderr: json,
        metrics_listen: args.metrics_listen,
        prometheus: args.prometheus,
    })
    .await?;
    if json {
        return print_as(args.output, &serde_json::to_value(&s)?);
    }
    print!("{}", demo::render_summary(&s));
    if s.failed_not_v3 > 0 {
        bail!(
            "{} request(s) failed because of the rollouts themselves",
            s.failed_not_v3
        );
    }
    Ok(())
}

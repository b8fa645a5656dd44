//! `baton proxy`: the data-plane process that `baton up` and `restart-proxy` start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use baton::logs::LogFormat;
use clap::{Args, ValueEnum};

#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[arg(long, value_name = "PATH")]
    control_socket: PathBuf,
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Serve this file's text on /metrics after the proxy's own (`baton up` writes its
    /// rollout metrics there).
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Request bodies above this many bytes get 413.
    #[arg(long, default_value_t = 10 << 20)]
    max_body_bytes: usize,
    /// Seconds an instance may take to answer before the attempt counts as failed.
    #[arg(long, default_value_t = 60)]
    request_timeout: u64,
    /// Hot restart: take the listening sockets, table and counters over from the
    /// proxy running on --control-socket, which then drains and exits.
    #[arg(long)]
    takeover: bool,
    /// Data-plane threads (0: one per usable CPU). Set it in the environment of
    /// `baton up` to size the proxy it starts.
    #[arg(long, env = "BATON_PROXY_WORKERS", default_value_t = 0)]
    workers: usize,
    /// `auto` binds data-plane thread i to the i-th CPU this process may use (as
    /// nginx's `worker_cpu_affinity auto`): steadier tail latency where the proxy
    /// has CPUs to itself; `off` lets the kernel place them. Set it in the
    /// environment of `baton up` for the proxy it starts.
    #[arg(long, env = "BATON_PROXY_CPU_AFFINITY", value_enum, default_value_t = CpuAffinityArg::Off)]
    cpu_affinity: CpuAffinityArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CpuAffinityArg {
    Off,
    Auto,
}

/// Serves until told to stop on the control socket (or drained by a takeover).
pub async fn run(format: Option<LogFormat>, args: ProxyArgs) -> Result<()> {
    baton::logs::init(format.unwrap_or(LogFormat::Text));
    baton_proxy::run(baton_proxy::Config {
        control_socket: args.control_socket,
        metrics_listen: args.metrics_listen,
        metrics_textfile: args.metrics_textfile,
        max_body_bytes: args.max_body_bytes,
        drain_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(args.request_timeout),
        takeover: args.takeover,
        workers: args.workers,
        cpu_affinity: match args.cpu_affinity {
            CpuAffinityArg::Off => baton_proxy::CpuAffinity::Off,
            CpuAffinityArg::Auto => baton_proxy::CpuAffinity::Auto,
        },
    })
    .await?;
    Ok(())
}

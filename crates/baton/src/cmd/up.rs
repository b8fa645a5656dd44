//! `baton up`: the controller in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use baton::api::{ApiCall, ApiRequest};
use baton::controller::{self, UpOptions};
use baton::paths::Paths;
use baton::trail::Seal;
use clap::Args;

use super::parse_spec;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Rollouts to apply at start; without it, the stored ones resume.
    #[arg(short = 'f', long = "filename", value_name = "SPEC")]
    file: Option<PathBuf>,
    /// Address of the control API (the CLI finds it in the state directory).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    api_listen: SocketAddr,
    /// Serve Prometheus metrics of the proxy (per-revision requests and latency)
    /// at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Runs until the controller ends, Ctrl-C or SIGTERM; a signal stops only the
/// controller, so the proxy and instances keep serving.
pub async fn run(
    paths: &Paths,
    seal: Seal,
    format: Option<baton::logs::LogFormat>,
    args: UpArgs,
) -> Result<()> {
    let format = format.unwrap_or(baton::logs::LogFormat::Text);
    baton::logs::init(format);
    let json = format == baton::logs::LogFormat::Json;
    let specs = match &args.file {
        Some(f) => parse_spec(f)?,
        None => Vec::new(),
    };
    if specs.is_empty() && !paths.exists() {
        bail!(
            "nothing to run: give a spec with -f (no state in {} to resume)",
            paths.root.display()
        );
    }
    let h = controller::start(UpOptions {
        paths: paths.clone(),
        specs,
        api_listen: args.api_listen,
        metrics_listen: args.metrics_listen,
        tick: Duration::from_millis(100),
        echo: true,
        audit: seal,
        log_format: Some(format),
    })
    .await?;
    let banner = [
        format!(
            "baton up: control API on http://{} (token in {}){}",
            h.api_addr,
            paths.token().display(),
            args.metrics_listen
                .map(|m| format!(", metrics on http://{m}/metrics"))
                .unwrap_or_default()
        ),
        format!(
            "  dashboard on http://{}/ui/ (log in with the token, or `baton dashboard` for a one-time link)",
            h.api_addr
        ),
        "  watch with `baton status --watch`; Ctrl-C stops the controller only, `baton down` stops everything".to_string(),
    ];
    say(json, &banner.join("\n"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let tx = h.tx.clone();
    let mut join = h.join;
    tokio::select! {
        r = &mut join => return r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    let _ = tx
        .send(ApiRequest {
            call: ApiCall::Shutdown { down: false },
            actor: format!("os:{}", baton::api::local_user()),
            reply,
        })
        .await;
    let _ = rx.await;
    let _ = join.await;
    say(
        json,
        "controller stopped; the proxy and instances keep serving (`baton down` stops them)",
    );
    Ok(())
}

/// What `baton up` tells its user: plain lines, or log events where every line of
/// output must be JSON.
fn say(json: bool, text: &str) {
    if json {
        for line in text.lines() {
            tracing::info!("{}", line.trim_start());
        }
    } else {
        println!("{text}");
    }
}

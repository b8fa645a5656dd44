//! `baton demo`: the whole story in one command, on this machine.
//!
//! Start v1 of the example service, roll out v2 on a canary under load, then roll out
//! a broken v3 and watch the analysis roll it back on its own. Prints a summary with
//! the numbers that matter: requests sent, failed, and how long v3's bad answers
//! lasted before it had no traffic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::api::ApiCall;
use crate::controller::{self, Handle, UpOptions};
use crate::load::{Load, LoadReport};
use crate::paths::Paths;
use crate::{now_ms, view};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub hello: Option<PathBuf>,
    /// Requests per second of the built-in load.
    pub rate: u32,
    pub concurrency: usize,
    /// Tell the story on stderr (for `--output json`).
    pub narrate_to_stderr: bool,
    /// Where the proxy serves `/metrics` (default: a free port).
    pub metrics_listen: Option<SocketAddr>,
    /// Gate on this Prometheus (which must scrape `metrics_listen`) instead of the
    /// proxy's own counters.
    pub prometheus: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoSummary {
    pub requests: u64,
    pub failed: u64,
    /// Failures answered by anything but the broken v3: a rollout must cause none.
    pub failed_not_v3: u64,
    pub v3_bad_answers: u64,
    pub v3_answers: u64,
    /// From v3's first bad answer to the proxy confirming v3 has 0 % of traffic.
    pub rollback_ms: Option<u64>,
    pub v2_rollout_seconds: f64,
    pub rollback_reason: String,
    pub load: LoadReport,
}

const NAME: &str = "hello";

/// With `--output json` the narrative goes to stderr so stdout holds only the JSON.
pub(crate) static NARRATE_TO_STDERR: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

macro_rules! say {
    ($($arg:tt)*) => {
        if $crate::demo::NARRATE_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*);
        } else {
            println!($($arg)*);
        }
    };
}

pub mod exchange;

fn spec(
    hello: &str,
    listen: SocketAddr,
    version: &str,
    extra_env: &str,
    prometheus: Option<&str>,
) -> String {
    let errors = match prometheus {
        None => "metric: { builtin: error_rate }".to_string(),
        Some(url) => format!(
            "metric: {{ prometheus: {{ address: \"{url}\", query: 'sum(rate(http_requests_total{{service=\"{{{{service}}}}\",version=\"{{{{revision}}}}\",code=\"5xx\"}}[5s])) / sum(rate(http_requests_total{{service=\"{{{{service}}}}\",version=\"{{{{revision}}}}\"}}[5s]))' }} }}"
        ),
    };
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: {NAME} }}
spec:
  replicas: 2
  run:
    command: ["{hello}", "--port", "{{port}}"]
    env: {{ APP_VERSION: {version}{extra_env} }}
  probes:
    readiness: {{ httpGet: {{ path: /readyz }}, periodSeconds: 0.25, failureThreshold: 2 }}
    liveness: {{ httpGet: {{ path: /healthz }}, periodSeconds: 1, failureThreshold: 3 }}
  minReadySeconds: 1
  shutdown: {{ preStopSeconds: 0.5, drainTimeoutSeconds: 5 }}
  traffic: {{ listen: "{listen}" }}
  strategy:
    canary:
      steps:
        - setWeight: 10
        - pause: {{ duration: 3s }}
        - analysis: {{ gates: [errors, p99] }}
        - setWeight: 30
        - pause: {{ duration: 3s }}
        - setWeight: 60
        - pause: {{ duration: 3s }}
        - analysis: {{ gates: [errors, p99] }}
  analysis:
    gates:
      - name: errors
        {errors}
        successCondition: "result <= 0.01"
        interval: 1s
        minRequests: 20
      - name: p99
        metric: {{ builtin: latency_p99 }}
        successCondition: "result < 0.5"
        interval: 1s
        minRequests: 20
  rollback: {{ onFailure: true }}
"#
    )
}

/// A free loopback address, from the same memory of handed-out ports as the
/// instances' (the demo's listeners and its instances share one controller process).
fn free_addr() -> Result<SocketAddr> {
    let port = baton_local::process::free_port()?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn find_hello(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot locate the baton executable")?
            .with_file_name("hello"),
    };
    if !path.exists() {
        bail!(
            "the example service is not built ({} is missing): run `cargo build --release` first, or pass --hello PATH",
            path.display()
        );
    }
    Ok(path.canonicalize()?)
}

struct Narrator {
    started: Instant,
    last: String,
    load_last: (Instant, u64),
    /// Printed before each progress line (the rollout's name, when there are several).
    label: String,
}

impl Narrator {
    fn heading(&self, text: &str) {
        say!(
            "\n[{:>6.1}s] ── {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// One line when something visible changed.
    fn progress(&mut self, v: &Value, load: Option<&Load>) {
        let weights: Vec<String> = v["revisions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{} {}% ({}/{} ready)",
                    r["appVersion"].as_str().unwrap_or("?"),
                    r["weight"],
                    r["readyReplicas"],
                    r["desiredReplicas"]
                )
            })
            .collect();
        let step = match v["step"].as_object() {
            Some(s) => {
                let i = s["index"].as_u64().unwrap_or(0) as usize;
                let total = s["total"].as_u64().unwrap_or(0) as usize;
                let name = s["steps"].get(i).and_then(Value::as_str).unwrap_or("done");
                if v["canaryRevision"].is_null() {
                    String::new()
                } else {
                    format!(" step {}/{total} {name} |", (i + 1).min(total))
                }
            }
            None => String::new(),
        };
        let line = format!(
            "{}{:<11}{step} {}",
            self.label,
            v["phase"].as_str().unwrap_or(""),
            weights.join(", ")
        );
        let elapsed = self.load_last.0.elapsed().as_secs_f64();
        let load_text = match load {
            Some(l) if elapsed >= 1.0 || line != self.last => {
                let r = l.report();
                let rate = (r.sent - self.load_last.1) as f64 / elapsed.max(0.001);
                self.load_last = (Instant::now(), r.sent);
                format!(
                    " | load {rate:.0} req/s, sent {}, failed {}",
                    r.sent, r.failed
                )
            }
            _ => String::new(),
        };
        if line != self.last || !load_text.is_empty() {
            say!(
                "[{:>6.1}s]   {line}{load_text}",
                self.started.elapsed().as_secs_f64()
            );
            self.last = line;
        }
    }
}

async fn status(h: &Handle, name: &str) -> Result<Value> {
    let (code, v) = h.call(ApiCall::Get(name.into())).await;
    if !code.is_success() {
        bail!("status: {}", v["error"]);
    }
    Ok(v)
}

async fn wait_for(
    h: &Handle,
    name: &str,
    n: &mut Narrator,
    load: Option<&Load>,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let v = status(h, name).await?;
        n.progress(&v, load);
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "gave up waiting for {what} after {limit:?}:\n{}",
                view::render(&v)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn version_of(v: &Value, field: &str) -> Option<String> {
    let name = v[field].as_str()?;
    v["revisions"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["appVersion"].as_str().map(str::to_string))
}

fn weight_of(v: &Value, version: &str) -> u64 {
    v["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["appVersion"] == version)
        .and_then(|r| r["weight"].as_u64())
        .unwrap_or(0)
}

pub async fn run(opts: DemoOptions) -> Result<DemoSummary> {
    NARRATE_TO_STDERR.store(opts.narrate_to_stderr, std::sync::atomic::Ordering::Relaxed);
    let hello = find_hello(opts.hello)?;
    let hello = hello.display().to_string();
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("baton-demo-{}", std::process::id())),
    };
    let paths = Paths::new(dir.join(".baton"));
    for f in [seal(&paths).head, seal(&paths).key_file]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(f);
    }
    if paths.root.exists() {
        std::fs::remove_dir_all(&paths.root)
            .with_context(|| format!("cannot clear {}", paths.root.display()))?;
    }
    let listen = free_addr()?;
    let metrics = match opts.metrics_listen {
        Some(m) => m,
        None => free_addr()?,
    };
    let prometheus = opts.prometheus.clone();
    let mut n = Narrator {
        started: Instant::now(),
        last: String::new(),
        load_last: (Instant::now(), 0),
        label: String::new(),
    };
    say!(
        "Baton demo: a canary of `hello` on this machine, state in {}",
        paths.root.display()
    );
    say!("  traffic:  http://{listen}/      metrics: http://{metrics}/metrics");

    n.heading("1. start v1 (2 instances behind the built-in proxy)");
    let v1 = baton_spec::parse(&spec(&hello, listen, "v1", "", prometheus.as_deref()))?;
    let h = start_controller(&paths, v1, Some(metrics)).await?;
    let result = until_stopped(story(
        &h,
        &mut n,
        &hello,
        listen,
        opts.rate,
        opts.concurrency,
        prometheus.as_deref(),
    ))
    .await;

    n.heading("cleaning up: stopping the proxy and every instance");
    let (_, v) = h.call(ApiCall::Shutdown { down: true }).await;
    say!("  {}", v["result"].as_str().unwrap_or(""));
    let _ = h.join.await;
    say!("  logs kept in {}", paths.root.display());
    if result.is_ok() {
        show_audit(&paths)?;
    }
    result
}

/// Runs the demo's story until it ends or the demo is stopped (Ctrl-C, SIGTERM): a
/// stopped demo still cleans up, since its proxy and instances outlive the controller
/// by design and would otherwise be left running.
async fn until_stopped<T>(story: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = story => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (Ctrl-C)"),
        _ = term.recv() => bail!("stopped (SIGTERM)"),
    }
}

/// Starts the demo's controller and says where its API and dashboard are.
async fn start_controller(
    paths: &Paths,
    specs: Vec<baton_spec::Rollout>,
    metrics_listen: Option<SocketAddr>,
) -> Result<Handle> {
    let h = controller::start(UpOptions {
        paths: paths.clone(),
        specs,
        // Not port 0: the kernel may hand out again a port the demo has just picked
        // (and released) for one of its services' listeners, which the proxy binds
        // later. The same memory of handed-out ports keeps them apart.
        api_listen: free_addr()?,
        metrics_listen,
        tick: Duration::from_millis(50),
        echo: false,
        audit: seal(paths),
        log_format: None,
    })
    .await?;
    say!(
        "  control API on {} (token in {})",
        h.api_addr,
        paths.token().display()
    );
    if let Some(code) = h
        .board
        .one_time_code("admin", crate::board::Role::Admin, now_ms())
    {
        say!(
            "  watch it in a browser: {}",
            crate::dashboard::login_link(h.api_addr, &code)
        );
    }
    Ok(h)
}

/// The demo's audit trail (routine instance and gate-pass entries left out) and the
/// verification of its hash chain.
fn show_audit(paths: &Paths) -> Result<()> {
    let seal = seal(paths);
    let log = seal.writer(paths, false)?;
    let entries = log.list(&baton_audit::Filter::default())?;
    say!(
        "\n── audit trail ({} entries; `baton audit --dir {}` lists them all)",
        entries.len(),
        paths.root.display()
    );
    for e in entries.iter().filter(|e| {
        !matches!(e.action.as_str(), "instance" | "phase")
            && (e.action != "gate" || e.reason.contains("does not meet"))
    }) {
        say!(
            "  #{:<4} {} {:<14} {:<9} {}",
            e.seq,
            view::clock(e.at),
            view::printable(&e.actor),
            view::printable(&e.action),
            view::printable(&e.reason)
        );
    }
    let head = baton_audit::Head::read(&seal.head_path(paths)?)?;
    match log.verify(head.as_ref())? {
        v if v.problem.is_none() => say!(
            "  hash chain and MACs verified: {} entries intact ({} signed), up to the recorded head",
            v.entries,
            v.signed
        ),
        v => bail!(
            "the demo's audit trail does not verify: {}",
            v.problem.map(|p| p.to_string()).unwrap_or_default()
        ),
    }
    Ok(())
}

/// The demo's head and key: beside its state directory (which each run clears, with
/// them), not in the user's state home.
fn seal(paths: &Paths) -> crate::trail::Seal {
    let dir = paths.root.parent().unwrap_or(&paths.root);
    crate::trail::Seal {
        head: Some(dir.join("audit.head")),
        key_file: Some(dir.join("audit.key")),
    }
}

async fn story(
    h: &Handle,
    n: &mut Narrator,
    hello: &str,
    listen: SocketAddr,
    rate: u32,
    concurrency: usize,
    prometheus: Option<&str>,
) -> Result<DemoSummary> {
    wait_for(
        h,
        NAME,
        n,
        None,
        Duration::from_secs(60),
        "v1 to be healthy",
        |v| v["phase"] == "Healthy",
    )
    .await?;

    n.heading(&format!(
        "2. load: {concurrency} keep-alive clients, {rate} req/s in all"
    ));
    let load = Load::start(listen, concurrency, rate);
    tokio::time::sleep(Duration::from_secs(1)).await;

    n.heading("3. apply v2: canary 10% → 30% → 60% → 100%, gated on error rate and p99");
    let t2 = Instant::now();
    let (code, v) = h
        .call(ApiCall::Apply(spec(hello, listen, "v2", "", prometheus)))
        .await;
    if !code.is_success() {
        bail!("apply v2: {}", v["error"]);
    }
    wait_for(
        h,
        NAME,
        n,
        Some(&load),
        Duration::from_secs(120),
        "v2 to become stable",
        |v| v["phase"] == "Healthy" && version_of(v, "stableRevision").as_deref() == Some("v2"),
    )
    .await?;
    let v2_seconds = t2.elapsed().as_secs_f64();
    let after_v2 = load.report();
    say!(
        "  v2 is stable after {v2_seconds:.1}s; {} requests so far, {} failed",
        after_v2.sent,
        after_v2.failed
    );

    n.heading("4. apply v3, which fails half of its requests: the analysis must roll it back");
    let (code, v) = h
        .call(ApiCall::Apply(spec(
            hello,
            listen,
            "v3",
            ", FAIL_RATE: \"0.5\"",
            prometheus,
        )))
        .await;
    if !code.is_success() {
        bail!("apply v3: {}", v["error"]);
    }
    let v = wait_for(
        h,
        NAME,
        n,
        Some(&load),
        Duration::from_secs(60),
        "v3 to be rolled back",
        |v| {
            v["phase"] == "Degraded"
                && weight_of(v, "v3") == 0
                && v["routerAcked"].as_u64() >= v["routeVersion"].as_u64()
        },
    )
    .await?;
    let rolled_back_at = now_ms();
    let reason = v["message"].as_str().unwrap_or("").to_string();
    say!("  rolled back: {reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.stop().await;

    let v3 = report.by_version.get("v3").cloned().unwrap_or_default();
    let summary = DemoSummary {
        requests: report.sent,
        failed: report.failed,
        failed_not_v3: report.failures_not_from("v3").len() as u64,
        v3_bad_answers: v3.failed,
        v3_answers: v3.ok + v3.failed,
        rollback_ms: v3
            .first_failure_ms
            .map(|f| rolled_back_at.saturating_sub(f)),
        v2_rollout_seconds: v2_seconds,
        rollback_reason: reason,
        load: report,
    };

    n.heading("history");
    let (_, hist) = h.call(ApiCall::History(NAME.into())).await;
    let table = view::render_history(&hist);
    say!(
        "{}",
        table
            .split("\nlatest events")
            .next()
            .unwrap_or("")
            .trim_end()
    );
    Ok(summary)
}

/// The summary as the terminal shows it.
pub fn render_summary(s: &DemoSummary) -> String {
    let rollback = s
        .rollback_ms
        .map(|ms| format!("{:.2} s", ms as f64 / 1000.0))
        .unwrap_or_else(|| "n/a (v3 gave no bad answer)".into());
    format!(
        "\n── summary\n  requests sent:                      {}\n  failed:                             {}\n    of which v3's own bad answers:    {}\n    caused by the rollouts themselves: {}\n  v3 answers before rollback:         {} ({} bad)\n  v1 → v2 canary took:                {:.1} s\n  v3 first bad answer → 0 % weight:   {rollback}\n  rollback reason:                    {}\n",
        s.requests,
        s.failed,
        s.v3_bad_answers,
        s.failed_not_v3,
        s.v3_answers,
        s.v3_bad_answers,
        s.v2_rollout_seconds,
        s.rollback_reason
    )
}

//! `baton demo` on the example exchange: start the user, trade and notification
//! services, put a trader load on them, roll trade and notification to good versions
//! and user through blue-green, then roll out broken versions of trade and
//! notification and let the analysis roll them back. The trader then checks the
//! books: orders lost, duplicated, notifications missed — all must be 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::{Narrator, free_addr, show_audit, until_stopped, version_of, wait_for, weight_of};
use crate::api::ApiCall;
use crate::controller::Handle;
use crate::now_ms;
use crate::paths::Paths;

#[derive(Debug, Clone)]
pub struct ExchangeDemoOptions {
    pub dir: Option<PathBuf>,
    /// Where the exchange's binaries are (default: beside this executable).
    pub bin_dir: Option<PathBuf>,
    pub traders: usize,
    /// Orders per second, all traders together.
    pub rate: u32,
    pub narrate_to_stderr: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutOutcome {
    pub service: String,
    pub from: String,
    pub to: String,
    /// `promoted` or `rolled back`.
    pub outcome: String,
    pub seconds: f64,
    pub reason: String,
    /// For a rollback: from the version first having traffic to the proxy confirming
    /// it has none (polled every 20 ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSummary {
    pub orders_sent: u64,
    pub orders_accepted: u64,
    pub orders_lost: u64,
    pub duplicate_orders: u64,
    pub fills_expected: u64,
    pub fills_missed: u64,
    pub notifications_expected: u64,
    pub notifications_missed: u64,
    pub notifications_duplicated: u64,
    pub failed_requests: u64,
    /// Failed requests answered by a broken v3 before its rollback.
    pub failed_by_broken_versions: u64,
    /// Every other failed request: the rollouts themselves must cause none.
    pub failed_by_rollouts: u64,
    pub ws_reconnects: u64,
    pub ws_close_codes: Value,
    /// From trade v3's first bad answer seen by a trader to the proxy confirming it
    /// has 0 % (none when shielding kept every bad answer from the traders).
    pub trade_rollback_ms: Option<u64>,
    pub rollouts: Vec<RolloutOutcome>,
    /// The trader's own report, in full.
    pub trader: Value,
}

const SECRET: &str = "demo-exchange-secret-0123456789abcdef";

struct Ports {
    user: SocketAddr,
    preview: SocketAddr,
    trade: SocketAddr,
    notify: SocketAddr,
}

fn env_block(version: &str, db: &Path, extra: &str) -> String {
    format!(
        "{{ APP_VERSION: {version}, BIND: 127.0.0.1, EXCHANGE_DATABASE_URL: \"sqlite:{}\", EXCHANGE_JWT_SECRET: {SECRET}{extra} }}",
        db.display()
    )
}

const COMMON: &str = r#"  probes:
    readiness: { httpGet: { path: /readyz }, periodSeconds: 0.25, failureThreshold: 2 }
    liveness: { httpGet: { path: /healthz }, periodSeconds: 1, failureThreshold: 3 }
  minReadySeconds: 1
  shutdown: { preStopSeconds: 0.5, drainTimeoutSeconds: 5 }
"#;

/// The shipped `examples/exchange/baton/trade.yaml` doubles from 2 %; the demo starts
/// at 5 % so that each step sees enough orders within seconds. Its latency gate is the
/// statistical judge rather than a fixed allowance: over one-second windows of ~120
/// canary requests a p99 is the second-slowest request, and on a busy machine a
/// healthy canary's p99 came out anywhere from 0.6× to 2.2× stable's (twelve windows
/// over eight runs; a CI run rolled a healthy v2 back on two such windows in a row).
/// The judge fails only a shift or a tail worse at 99 % confidence, by over 10 %.
fn trade_spec(bin: &Path, p: &Ports, db: &Path, version: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: trade }}
spec:
  replicas: 2
  run:
    command: ["{}", "--port", "{{port}}"]
    env: {}
{COMMON}  traffic: {{ listen: "{}", shieldCanary: true }}
  strategy:
    canary:
      steps:
        - setWeight: 5
        - analysis: {{ gates: [errors] }}
        - setWeight: 10
        - analysis: {{ gates: [errors] }}
        - setWeight: 20
        - analysis: {{ gates: [errors] }}
        - setWeight: 40
        - analysis: {{ gates: [errors, p99-vs-stable, budget] }}
        - setWeight: 80
        - analysis: {{ gates: [errors] }}
  analysis:
    gates:
      - name: errors
        metric: {{ builtin: error_rate }}
        successCondition: "result <= 0.01"
        interval: 1s
        minRequests: 20
      - name: p99-vs-stable
        metric: {{ builtin: latency_p99 }}
        statistical: {{ confidence: 0.99, tolerance: 0.1 }}
        interval: 1s
        minRequests: 100
        failureLimit: 1
      - name: budget
        metric: {{ builtin: error_rate }}
        burnRate: {{ slo: 0.99, windows: [{{ long: 30s, short: 3s, factor: 5 }}] }}
        interval: 1s
  rollback: {{ onFailure: true }}
"#,
        bin.join("exchange-trade").display(),
        env_block(version, db, extra),
        p.trade
    )
}

fn notification_spec(bin: &Path, p: &Ports, db: &Path, version: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: notification }}
spec:
  replicas: 2
  run:
    command: ["{}", "--port", "{{port}}"]
    env: {}
{COMMON}  traffic: {{ listen: "{}", shieldCanary: true }}
  strategy:
    canary:
      steps:
        - setWeight: 50
        - pause: {{ duration: 2s }}
        - analysis: {{ gates: [api] }}
  analysis:
    gates:
      - name: api
        metric:
          smoke:
            - path: /readyz
            - {{ path: /events, expectStatus: 401 }}
            - {{ path: /events, expectStatus: 401 }}
            - {{ path: /events, expectStatus: 401 }}
  rollback: {{ onFailure: true }}
"#,
        bin.join("exchange-notification").display(),
        env_block(
            version,
            db,
            &format!(", DRAIN_TIMEOUT_SECONDS: \"4\"{extra}")
        ),
        p.notify
    )
}

fn user_spec(bin: &Path, p: &Ports, db: &Path, version: &str) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: user }}
spec:
  replicas: 1
  run:
    command: ["{}", "--port", "{{port}}"]
    env: {}
{COMMON}  traffic: {{ listen: "{}" }}
  strategy:
    blueGreen:
      previewListen: "{}"
      autoPromote: true
      smoke:
        - path: /readyz
        - method: POST
          path: /login
          headers: {{ Content-Type: application/json }}
          body: '{{"username": "smoke-test", "password": "smoke-test-password"}}'
          expectBodyContains: '"token"'
      retainPrevious: 1h
"#,
        bin.join("exchange-user").display(),
        env_block(
            version,
            db,
            ", SMOKE_USER: smoke-test, SMOKE_PASSWORD: smoke-test-password"
        ),
        p.user,
        p.preview
    )
}

fn find_bins(given: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d,
        None => std::env::current_exe()
            .context("cannot locate the baton executable")?
            .parent()
            .map(Path::to_path_buf)
            .context("the baton executable has no directory")?,
    };
    for bin in [
        "exchange-user",
        "exchange-trade",
        "exchange-notification",
        "exchange-trader",
    ] {
        if !dir.join(bin).exists() {
            bail!(
                "the example exchange is not built ({} is missing): run `cargo build --release --workspace --bins` first, or pass --bin-dir DIR",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir.canonicalize()?)
}

async fn apply(h: &Handle, spec: String, what: &str) -> Result<()> {
    let (code, v) = h.call(ApiCall::Apply(spec)).await;
    if !code.is_success() {
        bail!("apply {what}: {}", v["error"]);
    }
    Ok(())
}

/// Rolls `service` to `to` and waits until it is stable (`expect_promoted`) or rolled
/// back; returns the outcome and the moment the proxy confirmed it.
async fn roll(
    h: &Handle,
    n: &mut Narrator,
    service: &str,
    from: &str,
    to: &str,
    spec: String,
    expect_promoted: bool,
) -> Result<(RolloutOutcome, i64)> {
    n.label = format!("{service:<13}");
    let started = Instant::now();
    apply(h, spec, &format!("{service} {to}")).await?;
    let to_owned = to.to_string();
    // When the new version was first seen with traffic (status is polled every 20 ms).
    let first_traffic = std::cell::Cell::new(None::<i64>);
    let v = if expect_promoted {
        let v = wait_for(
            h,
            service,
            n,
            None,
            Duration::from_secs(180),
            &format!("{service} {to} to become stable"),
            |v| {
                (v["phase"] == "Healthy"
                    && version_of(v, "stableRevision").as_deref() == Some(to_owned.as_str()))
                    || rolled_back(v, &to_owned)
            },
        )
        .await?;
        // A rollback is final: say why now rather than wait out the deadline.
        if rolled_back(&v, to) {
            bail!(
                "{service} {to} was rolled back, expected it to be promoted: {}",
                v["message"].as_str().unwrap_or("no reason given")
            );
        }
        v
    } else {
        wait_for(
            h,
            service,
            n,
            None,
            Duration::from_secs(120),
            &format!("{service} {to} to be rolled back"),
            |v| {
                if weight_of(v, &to_owned) > 0 && first_traffic.get().is_none() {
                    first_traffic.set(Some(now_ms() as i64));
                }
                rolled_back(v, &to_owned) && v["routerAcked"].as_u64() >= v["routeVersion"].as_u64()
            },
        )
        .await?
    };
    let at = now_ms() as i64;
    let exposed_ms = first_traffic.get().map(|t| (at - t).max(0) as u64);
    let outcome = RolloutOutcome {
        service: service.into(),
        from: from.into(),
        to: to.into(),
        outcome: if expect_promoted {
            "promoted".into()
        } else {
            "rolled back".into()
        },
        seconds: started.elapsed().as_secs_f64(),
        reason: v["message"].as_str().unwrap_or("").to_string(),
        exposed_ms,
    };
    say!(
        "  {service} {to} {} after {:.1}s{}",
        outcome.outcome,
        outcome.seconds,
        if expect_promoted {
            String::new()
        } else {
            format!(": {}", outcome.reason)
        }
    );
    Ok((outcome, at))
}

/// `version` has been rolled out, then rolled back: its traffic is gone and the rollout
/// is `Degraded`.
fn rolled_back(v: &Value, version: &str) -> bool {
    let known = v["revisions"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| r["appVersion"] == version));
    known && v["phase"] == "Degraded" && weight_of(v, version) == 0
}

pub async fn run(opts: ExchangeDemoOptions) -> Result<ExchangeSummary> {
    super::NARRATE_TO_STDERR.store(opts.narrate_to_stderr, std::sync::atomic::Ordering::Relaxed);
    let bin = find_bins(opts.bin_dir.clone())?;
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("baton-exchange-demo-{}", std::process::id())),
    };
    let paths = Paths::new(dir.join(".baton"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = dir.join("exchange.db");
    let ports = Ports {
        user: free_addr()?,
        preview: free_addr()?,
        trade: free_addr()?,
        notify: free_addr()?,
    };
    let mut n = Narrator {
        started: Instant::now(),
        last: String::new(),
        load_last: (Instant::now(), 0),
        label: String::new(),
    };
    say!(
        "Baton demo: the example exchange on this machine, state in {}",
        dir.display()
    );
    say!(
        "  user http://{}  trade http://{}  notification http://{} (WebSocket /ws)",
        ports.user,
        ports.trade,
        ports.notify
    );

    n.heading("1. start v1 of user (blue-green), trade (canary) and notification (canary)");
    let mut specs = baton_spec::parse(&user_spec(&bin, &ports, &db, "v1"))?;
    specs.extend(baton_spec::parse(&trade_spec(&bin, &ports, &db, "v1", ""))?);
    specs.extend(baton_spec::parse(&notification_spec(
        &bin, &ports, &db, "v1", "",
    ))?);
    let h = super::start_controller(&paths, specs, None).await?;
    let result = until_stopped(story(&h, &mut n, &bin, &ports, &db, &opts)).await;

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

async fn story(
    h: &Handle,
    n: &mut Narrator,
    bin: &Path,
    p: &Ports,
    db: &Path,
    opts: &ExchangeDemoOptions,
) -> Result<ExchangeSummary> {
    for service in ["user", "trade", "notification"] {
        n.label = format!("{service:<13}");
        wait_for(
            h,
            service,
            n,
            None,
            Duration::from_secs(60),
            &format!("{service} v1 to be healthy"),
            |v| v["phase"] == "Healthy",
        )
        .await?;
    }

    n.heading(&format!(
        "2. trader load: {} traders, {} orders/s, each following its WebSocket feed",
        opts.traders, opts.rate
    ));
    let mut trader = tokio::process::Command::new(bin.join("exchange-trader"))
        .args(["--user-url", &format!("http://{}", p.user)])
        .args(["--trade-url", &format!("http://{}", p.trade)])
        .args(["--notify-url", &format!("http://{}", p.notify)])
        .args(["--traders", &opts.traders.to_string()])
        .args(["--rate", &opts.rate.to_string()])
        .args(["--duration", "1h", "--output", "json", "--progress"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if opts.narrate_to_stderr {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .kill_on_drop(true)
        .spawn()
        .context("cannot start exchange-trader")?;
    let pid = trader.id().context("the trader exited at once")?;
    let mut stdout = trader.stdout.take().context("no trader stdout")?;
    let output = tokio::spawn(async move {
        let mut buf = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut buf)
            .await
            .map(|_| buf)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rollouts = Vec::new();
    n.heading("3. trade v1 → v2: canary 5 % → 10 % → 20 % → 40 % → 80 % → 100 %, gated on errors, p99 vs stable (statistically) and the error budget");
    rollouts.push(
        roll(
            h,
            n,
            "trade",
            "v1",
            "v2",
            trade_spec(bin, p, db, "v2", ""),
            true,
        )
        .await?
        .0,
    );

    n.heading("4. notification v1 → v2: canary 50 %, smoke-tested; old feeds closed with 1012 and resumed");
    rollouts.push(
        roll(
            h,
            n,
            "notification",
            "v1",
            "v2",
            notification_spec(bin, p, db, "v2", ""),
            true,
        )
        .await?
        .0,
    );

    n.heading(
        "5. user v1 → v2: blue-green, smoke tests (readiness, login round trip) on the preview",
    );
    rollouts.push(
        roll(h, n, "user", "v1", "v2", user_spec(bin, p, db, "v2"), true)
            .await?
            .0,
    );

    n.heading("6. trade v3, which fails half of its requests: the analysis must roll it back");
    let (outcome, trade_back_at) = roll(
        h,
        n,
        "trade",
        "v2",
        "v3",
        trade_spec(bin, p, db, "v3", ", FAULT_ERROR_RATE: \"0.5\""),
        false,
    )
    .await?;
    rollouts.push(outcome);

    n.heading(
        "7. notification v3, whose API fails every request: its smoke gate must roll it back",
    );
    rollouts.push(
        roll(
            h,
            n,
            "notification",
            "v2",
            "v3",
            notification_spec(bin, p, db, "v3", ", FAULT_ERROR_RATE: \"1\""),
            false,
        )
        .await?
        .0,
    );

    n.heading("8. stop the load; the trader checks the books and its feeds");
    tokio::time::sleep(Duration::from_secs(2)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .context("cannot signal the trader")?;
    let status = tokio::time::timeout(Duration::from_secs(120), trader.wait())
        .await
        .context("the trader did not finish its checks within 120 s")??;
    let out = output.await??;
    if !status.success() {
        bail!("the trader failed ({status}): {out}");
    }
    let tally: Value = serde_json::from_str(&out)
        .with_context(|| format!("the trader's report is not JSON: {out}"))?;

    let failures = tally["failures"].as_array().cloned().unwrap_or_default();
    let broken = |f: &Value| f["version"] == "v3";
    let failed_by_broken_versions = failures.iter().filter(|f| broken(f)).count() as u64;
    let failed = tally["failedRequests"].as_u64().unwrap_or(0);
    let first_bad_trade = failures
        .iter()
        .filter(|f| broken(f) && f["op"] == "place order")
        .filter_map(|f| f["atMs"].as_i64())
        .min();
    let u = |k: &str| tally[k].as_u64().unwrap_or(0);
    Ok(ExchangeSummary {
        orders_sent: u("ordersSent"),
        orders_accepted: u("ordersAccepted"),
        orders_lost: u("ordersLost"),
        duplicate_orders: u("duplicateOrders"),
        fills_expected: u("fillsExpected"),
        fills_missed: u("fillsMissed"),
        notifications_expected: u("notificationsExpected"),
        notifications_missed: u("notificationsMissed"),
        notifications_duplicated: u("notificationsDuplicated"),
        failed_requests: failed,
        failed_by_broken_versions,
        failed_by_rollouts: failed.saturating_sub(failed_by_broken_versions),
        ws_reconnects: u("wsReconnects"),
        ws_close_codes: tally["wsCloseCodes"].clone(),
        trade_rollback_ms: first_bad_trade.map(|f| trade_back_at.saturating_sub(f).max(0) as u64),
        rollouts,
        trader: tally,
    })
}

impl ExchangeSummary {
    /// Nothing lost, nothing doubled, no failure but the broken versions' own.
    pub fn is_clean(&self) -> bool {
        self.orders_lost == 0
            && self.duplicate_orders == 0
            && self.fills_missed == 0
            && self.notifications_missed == 0
            && self.notifications_duplicated == 0
            && self.failed_by_rollouts == 0
    }
}

/// The summary as the terminal shows it.
pub fn render_summary(s: &ExchangeSummary) -> String {
    let rollback = s
        .trade_rollback_ms
        .map(|ms| format!("{:.2} s", ms as f64 / 1000.0))
        .unwrap_or_else(|| "n/a (no trader saw a bad answer: the proxy shielded them)".into());
    let codes = s
        .ws_close_codes
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "none".into());
    let mut out = format!(
        "\n── summary\n  orders placed (accepted):           {} ({})\n  orders lost:                        {}   (must be 0)\n  duplicate orders:                   {}   (must be 0)\n  fills delivered on the feeds:       {} of {}\n  notifications missed:               {}   (must be 0; duplicated: {})\n  failed requests:                    {}\n    answered by the broken v3s:       {}\n    caused by the rollouts themselves: {}\n  feed reconnects:                    {} (close codes: {codes})\n  trade v3 first bad answer → 0 %:    {rollback}\n  rollouts:\n",
        s.orders_sent,
        s.orders_accepted,
        s.orders_lost,
        s.duplicate_orders,
        s.fills_expected - s.fills_missed,
        s.fills_expected,
        s.notifications_missed,
        s.notifications_duplicated,
        s.failed_requests,
        s.failed_by_broken_versions,
        s.failed_by_rollouts,
        s.ws_reconnects,
    );
    for r in &s.rollouts {
        out.push_str(&format!(
            "    {:<13} {} → {}  {:<11} in {:>5.1} s{}\n",
            r.service,
            r.from,
            r.to,
            r.outcome,
            r.seconds,
            if r.outcome == "rolled back" {
                let exposed = r
                    .exposed_ms
                    .map(|ms| format!("had traffic for {:.2} s; ", ms as f64 / 1000.0))
                    .unwrap_or_default();
                format!("  ({exposed}{})", r.reason)
            } else {
                String::new()
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str, revisions: &[(&str, u64)]) -> Value {
        let revisions: Vec<Value> = revisions
            .iter()
            .map(|(v, w)| serde_json::json!({ "appVersion": v, "weight": w }))
            .collect();
        serde_json::json!({ "phase": phase, "revisions": revisions })
    }

    #[test]
    fn only_a_degraded_rollout_with_the_version_out_of_traffic_is_rolled_back() {
        assert!(rolled_back(
            &status("Degraded", &[("v1", 100), ("v2", 0)]),
            "v2"
        ));
        // Not yet applied: the previous rollback's Degraded is not this version's.
        assert!(!rolled_back(&status("Degraded", &[("v1", 100)]), "v2"));
        // Still carrying traffic, or healthy: not rolled back.
        assert!(!rolled_back(
            &status("Degraded", &[("v1", 60), ("v2", 40)]),
            "v2"
        ));
        assert!(!rolled_back(
            &status("Progressing", &[("v1", 100), ("v2", 0)]),
            "v2"
        ));
    }
}

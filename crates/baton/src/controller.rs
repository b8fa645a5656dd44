//! `baton up`: the controller loop on one machine.
//!
//! Every tick: answer API calls, step the engine of each rollout (status persisted
//! before anything is acted on), let the platform start and stop instances, and push
//! the routing table to the proxy when it changed. The proxy and the instances are
//! separate processes that outlive the controller; a new controller adopts them.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_analysis::{Measurer, run_smoke};
use baton_audit::{AuditLog, NewEntry};
use baton_engine::{Action, Command, Measurement, Observations, Status, step, undo_target};
use baton_local::{Desired, Platform, PlatformEvent, RevisionWant, Store};
use baton_proxy::{
    ControlError, ProxyClient, RevisionRoute, RoutingTable, ServiceRoute, StatsSnapshot,
};
use baton_spec::{NotificationEvent, Rollout, StrategyRef};
use hyper::StatusCode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::api::{self, ApiCall, ApiRequest, CommandKind, Identities, Reply, local_user};
use crate::board::Board;
use crate::notify::{Delivery, Notice, Notifier};
use crate::paths::{Paths, new_token};
use crate::{now_ms, view};

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub paths: Paths,
    /// Rollouts to apply at start (from `-f`); stored ones resume either way.
    pub specs: Vec<Rollout>,
    pub api_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub tick: Duration,
    /// Print each event to stdout as it happens.
    pub echo: bool,
    /// Where the audit trail's head is mirrored after every entry, so truncating the
    /// database is detectable (default: `audit.head` in the state directory).
    pub audit_head: Option<std::path::PathBuf>,
}

/// A running controller.
pub struct Handle {
    pub api_addr: SocketAddr,
    /// What the dashboard shows, and its logins (the demo makes a one-time link).
    pub board: Arc<Board>,
    pub tx: mpsc::Sender<ApiRequest>,
    pub join: JoinHandle<Result<()>>,
}

impl Handle {
    /// Sends one call to the controller and waits for its answer.
    pub async fn call(&self, call: ApiCall) -> Reply {
        let (reply, rx) = oneshot::channel();
        let actor = format!("os:{}", local_user());
        if self
            .tx
            .send(ApiRequest { call, actor, reply })
            .await
            .is_err()
        {
            return api::error(StatusCode::SERVICE_UNAVAILABLE, "controller stopped");
        }
        rx.await
            .unwrap_or_else(|_| api::error(StatusCode::SERVICE_UNAVAILABLE, "controller stopped"))
    }
}

struct RolloutState {
    spec: Rollout,
    /// SHA-256 of the spec's JSON, recorded with every audit entry.
    digest: String,
    status: Status,
    /// The engine's route version that the router has confirmed.
    acked: u64,
    measurements: Vec<Measurement>,
    smoke: Option<(String, bool, String)>,
    commands: Vec<(Command, String, oneshot::Sender<Reply>)>,
}

fn spec_digest(spec: &Rollout) -> String {
    baton_audit::digest(&serde_json::to_vec(spec).unwrap_or_default())
}

/// The audit action a controller event stands for.
fn action_of(reason: &str, message: &str) -> &'static str {
    match reason {
        "Applied" => "apply",
        "NewRevision" | "Superseded" | "Abandoned" => "revision",
        "StepCompleted" => "step",
        "TrafficShifted" => "traffic",
        "GatePassed" | "GateFailed" | "GateError" => "gate",
        "SmokeStarted" | "SmokePassed" => "smoke",
        "Promote" | "PromoteFull" | "Promoted" | "Switch" => "promote",
        "Aborted" if message.contains("aborted by user") => "abort",
        "Aborted" | "FailedPaused" => "rollback",
        "Abort" => "abort",
        "Retry" => "retry",
        "Undo" => "undo",
        "Phase" => "phase",
        "Notification" => "notify",
        "Resumed" | "ControllerStarted" | "ControllerStopped" | "RoutingRefused"
        | "ProxyReplaced" => "config",
        "Down" => "down",
        _ => "instance",
    }
}

/// How often the proxy is asked whether it lives when there is nothing to push: a
/// crashed proxy costs at most this long, plus a start, of refused connections.
const PROXY_CHECK_MS: u64 = 1000;

struct Controller {
    paths: Paths,
    opts: UpOptions,
    store: Store,
    platform: Platform,
    proxy: ProxyClient,
    proxy_child: Option<Child>,
    rollouts: BTreeMap<String, RolloutState>,
    measurer: Measurer,
    table_version: u64,
    last_services: Option<Vec<ServiceRoute>>,
    last_routed: HashSet<SocketAddr>,
    push_retry_at: u64,
    /// When the proxy was last asked whether it is alive, on a tick with nothing to push.
    proxy_checked_at: u64,
    smoke_tx: mpsc::UnboundedSender<(String, String, bool, String)>,
    smoke_rx: mpsc::UnboundedReceiver<(String, String, bool, String)>,
    audit: AuditLog,
    notifier: Notifier,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    measure_tx: mpsc::UnboundedSender<(String, Measurement)>,
    measure_rx: mpsc::UnboundedReceiver<(String, Measurement)>,
    board: Arc<Board>,
    /// When the dashboard next gets the status, and a traffic sample.
    next_publish: u64,
    next_sample: u64,
}

/// Starts a controller: adopts or starts the proxy, adopts recorded instances, applies
/// `opts.specs`, serves the API. Fails before changing anything if the specs cannot be
/// applied or another controller owns the directory.
pub async fn start(opts: UpOptions) -> Result<Handle> {
    let paths = opts.paths.clone();
    paths.create()?;
    claim_directory(&paths)?;
    let store = Store::open(&paths.db())
        .with_context(|| format!("cannot open {}", paths.db().display()))?;
    let proxy = ProxyClient::new(paths.proxy_socket());
    let (proxy_child, proxy_version, routed) =
        ensure_proxy(&paths, &proxy, opts.metrics_listen).await?;
    let stored_version: u64 = store
        .meta("route_version")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (platform, adopted) = Platform::adopt(paths.logs(), &store, &routed)?;
    let (smoke_tx, smoke_rx) = mpsc::unbounded_channel();
    let head = opts
        .audit_head
        .clone()
        .unwrap_or_else(|| paths.root.join("audit.head"));
    let audit = AuditLog::open(&paths.db(), Some(head)).context("cannot open the audit trail")?;
    let (delivery_tx, deliveries) = mpsc::unbounded_channel();
    let (measure_tx, measure_rx) = mpsc::unbounded_channel();
    let mut c = Controller {
        paths: paths.clone(),
        opts: opts.clone(),
        store,
        platform,
        proxy,
        proxy_child,
        rollouts: BTreeMap::new(),
        measurer: Measurer::default(),
        table_version: stored_version.max(proxy_version),
        last_services: None,
        last_routed: routed,
        push_retry_at: 0,
        proxy_checked_at: 0,
        smoke_tx,
        smoke_rx,
        audit,
        notifier: Notifier::new(delivery_tx),
        deliveries,
        measure_tx,
        measure_rx,
        board: Arc::new(Board::default()),
        next_publish: 0,
        next_sample: 0,
    };
    let me = format!("os:{}", local_user());
    c.record(
        &me,
        "",
        "ControllerStarted",
        &format!(
            "controller started (pid {}, state {}, metrics {})",
            std::process::id(),
            paths.root.display(),
            opts.metrics_listen
                .map_or("off".to_string(), |m| m.to_string())
        ),
    );
    for (name, spec, status) in c.store.rollouts::<Rollout, Status>()? {
        c.say(
            &name,
            "Resumed",
            &format!("resuming: {} ({})", status.phase.as_str(), status.message),
        );
        c.rollouts.insert(
            name,
            RolloutState {
                digest: spec_digest(&spec),
                spec,
                status,
                acked: 0,
                measurements: Vec::new(),
                smoke: None,
                commands: Vec::new(),
            },
        );
    }
    c.platform_events(adopted);
    if !opts.specs.is_empty() {
        let (code, body) = c.apply(opts.specs.clone(), &me);
        if !code.is_success() {
            bail!(
                "{}",
                body["error"].as_str().unwrap_or("cannot apply the spec")
            );
        }
    }

    let listener = TcpListener::bind(opts.api_listen)
        .await
        .with_context(|| format!("cannot serve the control API on {}", opts.api_listen))?;
    let api_addr = listener.local_addr()?;
    match std::fs::read_to_string(paths.token()) {
        Ok(t) if !t.trim().is_empty() => {}
        _ => write_private(&paths.token(), &new_token()?)?,
    }
    let ids = Identities::load(&paths);
    std::fs::write(paths.api_addr(), api_addr.to_string())?;
    let (tx, rx) = mpsc::channel(64);
    let board = c.board.clone();
    let server = tokio::spawn(api::serve(listener, ids, tx.clone(), board.clone()));
    let join = tokio::spawn(async move {
        let r = c.run(rx).await;
        server.abort();
        r
    });
    Ok(Handle {
        api_addr,
        board,
        tx,
        join,
    })
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// One controller per directory: refuse to start beside a live one.
fn claim_directory(paths: &Paths) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(paths.controller_pid())
        && let Some((pid, start)) = text.trim().split_once(':')
        && let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>())
        && pid != std::process::id()
        && baton_local::process::alive(pid, start)
    {
        bail!(
            "another controller (pid {pid}) is running for {}; stop it first or use another --dir",
            paths.root.display()
        );
    }
    let me = std::process::id();
    let start = baton_local::process::start_time(me).unwrap_or(0);
    std::fs::write(paths.controller_pid(), format!("{me}:{start}"))?;
    // A dead controller's address would send clients to nobody until ours is written.
    let _ = std::fs::remove_file(paths.api_addr());
    Ok(())
}

/// Finds the running proxy, or starts one as a detached process. Returns its child
/// handle (when started here), its table version and the addresses it routes to.
async fn ensure_proxy(
    paths: &Paths,
    proxy: &ProxyClient,
    metrics: Option<SocketAddr>,
) -> Result<(Option<Child>, u64, HashSet<SocketAddr>)> {
    if let Ok((_, version)) = proxy.ping().await {
        let table = proxy.table().await?;
        return Ok((None, version, baton_proxy::routed(&table.services)));
    }
    let exe =
        std::env::current_exe().context("cannot find the baton executable to start the proxy")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.proxy_log())
        .with_context(|| format!("cannot open {}", paths.proxy_log().display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("proxy")
        .arg("--control-socket")
        .arg(paths.proxy_socket());
    if let Some(m) = metrics {
        cmd.arg("--metrics-listen").arg(m.to_string());
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the proxy process")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if proxy.ping().await.is_ok() {
            return Ok((Some(child), 0, HashSet::new()));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the proxy did not come up within 10 s; see {}",
                paths.proxy_log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wants_for(spec: &Rollout, status: &Status) -> BTreeMap<String, RevisionWant> {
    status
        .desired
        .iter()
        .filter_map(|(rev, n)| {
            let r = status.revision(rev)?;
            Some((
                rev.clone(),
                RevisionWant {
                    replicas: *n,
                    run: r.run.clone(),
                    probes: spec.spec.probes.clone(),
                    shutdown: spec.spec.shutdown.clone(),
                    min_ready_ms: spec.spec.min_ready_seconds * 1000,
                },
            ))
        })
        .collect()
}

impl Controller {
    /// An event of Baton's own making.
    fn say(&self, rollout: &str, reason: &str, message: &str) {
        self.record("baton", rollout, reason, message);
    }

    /// Appends to the audit trail and, unless it is routine, prints it.
    fn record(&self, actor: &str, rollout: &str, reason: &str, message: &str) {
        let now = now_ms();
        let (revision, digest) = match self.rollouts.get(rollout) {
            Some(r) => (
                r.status.canary.clone().or_else(|| r.status.stable.clone()),
                Some(r.digest.clone()),
            ),
            None => (None, None),
        };
        let entry = NewEntry {
            actor: actor.to_string(),
            action: action_of(reason, message).to_string(),
            rollout: rollout.to_string(),
            revision,
            spec_digest: digest,
            reason: message.to_string(),
        };
        self.board.audit_written(rollout);
        if let Err(e) = self.audit.append(entry, now) {
            eprintln!("warning: cannot append to the audit trail: {e}");
        }
        if self.opts.echo && reason != "GatePassed" {
            let who = if actor == "baton" {
                String::new()
            } else {
                format!(" [{actor}]")
            };
            println!("{} {rollout:<12} {message}{who}", view::clock(now));
        }
    }

    fn platform_events(&self, events: Vec<PlatformEvent>) {
        for e in events {
            self.say(&e.rollout, e.reason, &e.message);
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ApiRequest>) -> Result<()> {
        loop {
            let mut stop = None;
            while let Ok(req) = rx.try_recv() {
                if let Some(s) = self.api(req) {
                    stop = Some(s);
                }
            }
            if let Some((down, reply)) = stop {
                return self.shutdown(down, reply).await;
            }
            self.tick().await?;
            tokio::select! {
                _ = tokio::time::sleep(self.opts.tick) => {}
                Some(req) = rx.recv() => {
                    if let Some((down, reply)) = self.api(req) {
                        return self.shutdown(down, reply).await;
                    }
                }
            }
        }
    }

    async fn tick(&mut self) -> Result<()> {
        while let Ok((rollout, m)) = self.measure_rx.try_recv() {
            self.take_measurement(&rollout, m);
        }
        while let Ok(d) = self.deliveries.try_recv() {
            self.say(&d.rollout, "Notification", &d.message);
        }
        while let Ok((rollout, rev, passed, detail)) = self.smoke_rx.try_recv() {
            if let Some(r) = self.rollouts.get_mut(&rollout) {
                r.smoke = Some((rev, passed, detail));
            }
        }
        let now = now_ms();
        let mut stats: Option<StatsSnapshot> = None;
        let names: Vec<String> = self.rollouts.keys().cloned().collect();
        for name in names {
            let Some(r) = self.rollouts.get_mut(&name) else {
                continue;
            };
            let commands = std::mem::take(&mut r.commands);
            let obs = Observations {
                revisions: self
                    .platform
                    .observe(&name, r.spec.spec.min_ready_seconds * 1000, now),
                router_acked: r.acked,
                measurements: std::mem::take(&mut r.measurements),
                smoke: r.smoke.take(),
                commands: commands.iter().map(|(c, _, _)| *c).collect(),
            };
            let out = step(&r.spec, &r.status, &obs, now);
            if out.status != r.status {
                // Persist before acting, so a crash never acts on an unrecorded decision.
                self.store.save_rollout(&name, &r.spec, &out.status, now)?;
            }
            let was_paused = r.status.phase == baton_engine::Phase::Paused;
            r.status = out.status;
            let spec = r.spec.clone();
            let paused = (!was_paused && r.status.phase == baton_engine::Phase::Paused)
                .then(|| r.status.message.clone());
            for ((cmd, actor, reply), result) in commands.into_iter().zip(out.command_results) {
                let reason = match cmd {
                    Command::Promote => "Promote",
                    Command::PromoteFull => "PromoteFull",
                    Command::Abort => "Abort",
                    Command::Retry => "Retry",
                };
                let answer = match result {
                    Ok(msg) => {
                        self.record(&actor, &name, reason, &format!("{}: {msg}", cmd.as_str()));
                        (StatusCode::OK, json!({ "result": msg }))
                    }
                    Err(msg) => api::error(StatusCode::CONFLICT, msg),
                };
                let _ = reply.send(answer);
            }
            if let Some(why) = paused {
                self.notify(&name, NotificationEvent::Paused, &why);
            }
            for action in out.actions {
                match action {
                    Action::Event { reason, message } => {
                        let event = match reason.as_str() {
                            "NewRevision" if message.starts_with("rolling out") => {
                                Some(NotificationEvent::Started)
                            }
                            "StepCompleted" => Some(NotificationEvent::StepPassed),
                            "Promoted" => Some(NotificationEvent::Promoted),
                            "Aborted" if message.contains("aborted by user") => {
                                Some(NotificationEvent::Aborted)
                            }
                            "Aborted" => Some(NotificationEvent::RolledBack),
                            _ => None,
                        };
                        self.say(&name, &reason, &message);
                        if let Some(e) = event {
                            self.notify(&name, e, &message);
                        }
                    }
                    Action::Measure {
                        gate,
                        revision,
                        epoch,
                    } => {
                        let Some(g) = spec.spec.analysis.gates.iter().find(|g| g.name == gate)
                        else {
                            continue;
                        };
                        let stable = self
                            .rollouts
                            .get(&name)
                            .and_then(|r| r.status.stable.clone());
                        if !matches!(
                            g.metric,
                            baton_spec::MetricSource::Builtin(_)
                                | baton_spec::MetricSource::Scorecard(_)
                        ) {
                            // External providers do I/O that may take seconds: off the loop.
                            let vars = baton_analysis::Vars {
                                service: name.clone(),
                                revision: revision.clone(),
                                stable,
                                address: self.platform.backends(&name, &revision).first().copied(),
                            };
                            let (g, tx) = (g.clone(), self.measure_tx.clone());
                            let rollout = name.clone();
                            tokio::spawn(async move {
                                let m = baton_analysis::measure(&g, &vars, now_ms()).await;
                                let _ = tx.send((rollout, m));
                            });
                            continue;
                        }
                        if stats.is_none() {
                            stats = self.proxy.stats().await.ok();
                        }
                        let Some(snap) = &stats else { continue };
                        let of = |rev: &str| {
                            snap.get(&name)
                                .and_then(|m| m.get(rev))
                                .cloned()
                                .unwrap_or_default()
                        };
                        let current = of(&revision);
                        let stable_now = stable.as_deref().map(of);
                        let m = self.measurer.measure(
                            &name,
                            g,
                            &revision,
                            epoch,
                            &current,
                            stable_now.as_ref(),
                            now,
                        );
                        self.take_measurement(&name, m);
                    }
                    Action::RunSmoke { revision } => self.start_smoke(&name, &spec, &revision),
                }
            }
        }
        let desired: Desired = self
            .rollouts
            .iter()
            .map(|(n, r)| (n.clone(), wants_for(&r.spec, &r.status)))
            .collect();
        let events = self.platform.reconcile(&desired, &self.store, now)?;
        self.platform_events(events);
        self.sync_routes(now).await;
        self.publish(now, stats).await;
        if let Some(c) = &mut self.proxy_child {
            let _ = c.try_wait();
        }
        Ok(())
    }

    /// Feeds the dashboard: status at most five times a second, traffic once a second.
    async fn publish(&mut self, now: u64, stats: Option<StatsSnapshot>) {
        if now >= self.next_publish {
            self.next_publish = now + 200;
            let list: Vec<_> = self.rollouts.keys().map(|n| self.view(n)).collect();
            self.board.publish(serde_json::Value::Array(list));
        }
        if now >= self.next_sample {
            self.next_sample = now + 1000;
            let stats = match stats {
                Some(s) => Some(s),
                None => self.proxy.stats().await.ok(),
            };
            if let Some(s) = stats {
                self.board.sample(now, s);
            }
        }
    }

    /// Logs a measurement's verdict and hands it to the engine's next step.
    fn take_measurement(&mut self, name: &str, m: Measurement) {
        let what = format!("gate {}: {}", m.gate, m.detail);
        match m.verdict {
            baton_engine::Verdict::Fail => self.say(name, "GateFailed", &what),
            baton_engine::Verdict::Pass => self.say(name, "GatePassed", &what),
            baton_engine::Verdict::Error => self.say(name, "GateError", &what),
            baton_engine::Verdict::Inconclusive => {}
        }
        if let Some(r) = self.rollouts.get_mut(name) {
            r.measurements.push(m);
        }
    }

    /// Tells the rollout's webhooks; delivery happens in the background.
    fn notify(&self, name: &str, event: NotificationEvent, reason: &str) {
        let Some(r) = self.rollouts.get(name) else {
            return;
        };
        if r.spec.spec.notifications.is_empty() {
            return;
        }
        let revision = r.status.canary.clone().or_else(|| r.status.stable.clone());
        let app_version = revision
            .as_deref()
            .and_then(|rev| r.status.revision(rev))
            .and_then(|rev| rev.run.app_version().map(str::to_string));
        let notice = Notice {
            rollout: name.to_string(),
            event: event.as_str(),
            revision,
            app_version,
            phase: r.status.phase.as_str().to_string(),
            reason: reason.to_string(),
            at: now_ms(),
        };
        self.notifier
            .notify(&r.spec.spec.notifications, event, notice);
    }

    fn start_smoke(&self, name: &str, spec: &Rollout, revision: &str) {
        let StrategyRef::BlueGreen(bg) = spec.spec.strategy.kind() else {
            return;
        };
        let target = bg
            .preview_listen
            .as_ref()
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .or_else(|| self.platform.backends(name, revision).first().copied());
        let tests = bg.smoke.clone();
        let tx = self.smoke_tx.clone();
        let (name, revision) = (name.to_string(), revision.to_string());
        tokio::spawn(async move {
            let result = match target {
                Some(addr) => run_smoke(addr, &tests, Duration::from_secs(5)).await,
                None => Err("no ready instance to test".into()),
            };
            let (passed, detail) = match result {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            let _ = tx.send((name, revision, passed, detail));
        });
    }

    fn services(&self) -> (Vec<ServiceRoute>, BTreeMap<String, u64>) {
        let mut versions = BTreeMap::new();
        let services = self
            .rollouts
            .iter()
            .map(|(name, r)| {
                versions.insert(name.clone(), r.status.route_version);
                let bg = match r.spec.spec.strategy.kind() {
                    StrategyRef::BlueGreen(bg) => bg.preview_listen.clone(),
                    _ => None,
                };
                let mut revisions: Vec<RevisionRoute> = r
                    .status
                    .weights
                    .iter()
                    .map(|(rev, w)| RevisionRoute {
                        name: rev.clone(),
                        weight: *w,
                        backends: self.platform.backends(name, rev),
                    })
                    .collect();
                // The preview, and a live canary still at 0 %, are listed with no
                // weight: the preview listener and the canary header reach them,
                // weighted traffic and retries never do.
                let live_canary = r.status.canary.clone().filter(|_| !r.status.aborted);
                for extra in [&r.status.preview, &live_canary].into_iter().flatten() {
                    if !r.status.weights.contains_key(extra)
                        && !revisions.iter().any(|x| &x.name == extra)
                    {
                        revisions.push(RevisionRoute {
                            name: extra.clone(),
                            weight: 0,
                            backends: self.platform.backends(name, extra),
                        });
                    }
                }
                let traffic = &r.spec.spec.traffic;
                ServiceRoute {
                    name: name.clone(),
                    listen: traffic.listen.clone(),
                    preview_listen: bg,
                    preview: r.status.preview.clone(),
                    stable: r.status.stable.clone(),
                    canary: live_canary,
                    sticky_header: traffic.stickiness.as_ref().and_then(|s| s.header.clone()),
                    sticky_cookie: traffic.stickiness.as_ref().and_then(|s| s.cookie.clone()),
                    canary_header: traffic
                        .canary_header
                        .as_ref()
                        .map(|h| (h.name.clone(), h.value.clone())),
                    shield_canary: traffic.shield_canary,
                    // Just before the instance would be killed: it may close with 1012
                    // itself when it gets SIGTERM, after preStop.
                    tls: traffic
                        .tls
                        .as_ref()
                        .map(|t| (t.cert_file.clone(), t.key_file.clone())),
                    mirror_percent: traffic.mirror_percent,
                    drain_ms: Some(
                        ((r.spec.spec.shutdown.pre_stop_seconds
                            + r.spec.spec.shutdown.drain_timeout_seconds)
                            * 1000.0
                            - 500.0)
                            .max(0.0) as u64,
                    ),
                    revisions,
                }
            })
            .collect();
        (services, versions)
    }

    /// Pushes the routing table when it changed; on the proxy's acknowledgement, the
    /// engine may move on and instances that left routing may stop.
    async fn sync_routes(&mut self, now: u64) {
        let (services, versions) = self.services();
        if self.last_services.as_ref() == Some(&services) {
            for (name, v) in versions {
                if let Some(r) = self.rollouts.get_mut(&name) {
                    r.acked = v;
                }
            }
            self.platform.routes_confirmed(&self.last_routed);
            // Nothing to push, so nothing else would notice a proxy that died: while
            // traffic is steady (a Healthy rollout, a long pause) it must be checked.
            if now >= self.proxy_checked_at + PROXY_CHECK_MS {
                self.proxy_checked_at = now;
                // Only a socket nobody accepts on is a dead proxy: a slow answer is
                // a busy one, and a second proxy would fight it for the ports.
                if let Err(e @ ControlError::Connect { .. }) = self.proxy.ping().await {
                    self.replace_proxy(now, e).await;
                }
            }
            return;
        }
        if now < self.push_retry_at {
            return;
        }
        let table = RoutingTable {
            version: self.table_version + 1,
            services: services.clone(),
        };
        match self.proxy.set_table(&table).await {
            Ok(v) => {
                self.table_version = v;
                let _ = self.store.set_meta("route_version", &v.to_string());
                self.last_routed = baton_proxy::routed(&services);
                self.announce_traffic(&services, v);
                self.last_services = Some(services);
                for (name, v) in versions {
                    if let Some(r) = self.rollouts.get_mut(&name) {
                        r.acked = v;
                    }
                }
                self.platform.routes_confirmed(&self.last_routed);
            }
            Err(ControlError::Refused { error, .. }) => {
                self.push_retry_at = now + 2000;
                for name in self.rollouts.keys() {
                    self.say(
                        name,
                        "RoutingRefused",
                        &format!("the proxy refused the routing table: {error}"),
                    );
                }
            }
            Err(e) => self.replace_proxy(now, e).await,
        }
    }

    /// The proxy did not answer: start a new one (or adopt one that came up meanwhile)
    /// and push it the whole table on the next tick.
    async fn replace_proxy(&mut self, now: u64, e: ControlError) {
        self.push_retry_at = now + 500;
        eprintln!("warning: {e}; starting a new proxy");
        match ensure_proxy(&self.paths, &self.proxy, self.opts.metrics_listen).await {
            Ok((child, v, _)) => {
                if let Some(child) = child {
                    // Reap the one that died, if it was ours.
                    if let Some(mut old) = self.proxy_child.replace(child) {
                        let _ = old.try_wait();
                    }
                    for name in self.rollouts.keys() {
                        self.say(
                            name,
                            "ProxyReplaced",
                            &format!("the proxy did not answer ({e}); started a new one"),
                        );
                    }
                }
                self.table_version = self.table_version.max(v);
                self.last_services = None;
            }
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }

    /// Tells of each rollout whose split changed in a table the proxy just confirmed.
    fn announce_traffic(&self, services: &[ServiceRoute], version: u64) {
        let split = |s: &ServiceRoute| {
            let mut w: Vec<(String, u32)> = s
                .revisions
                .iter()
                .filter(|r| r.weight > 0)
                .map(|r| (r.name.clone(), r.weight))
                .collect();
            w.sort();
            (w, s.preview.clone())
        };
        for svc in services {
            let before = self
                .last_services
                .as_ref()
                .and_then(|l| l.iter().find(|o| o.name == svc.name))
                .map(split);
            let now = split(svc);
            if before.as_ref() == Some(&now) {
                continue;
            }
            let Some(r) = self.rollouts.get(&svc.name) else {
                continue;
            };
            let mut parts: Vec<String> = now
                .0
                .iter()
                .map(|(rev, w)| format!("{} {w} %", r.status.label(rev)))
                .collect();
            if let Some(p) = &now.1 {
                parts.push(format!("preview {}", r.status.label(p)));
            }
            self.say(
                &svc.name,
                "TrafficShifted",
                &format!(
                    "traffic now {} (confirmed by the proxy, table {version})",
                    parts.join(", ")
                ),
            );
        }
    }

    /// Handles one API call; returns `Some` when the controller must stop.
    fn api(&mut self, req: ApiRequest) -> Option<(bool, oneshot::Sender<Reply>)> {
        let ApiRequest { call, actor, reply } = req;
        let answer = match call {
            ApiCall::List => {
                let list: Vec<_> = self.rollouts.keys().map(|n| self.view(n)).collect();
                (StatusCode::OK, json!({ "rollouts": list }))
            }
            ApiCall::Get(name) => match self.rollouts.contains_key(&name) {
                true => (StatusCode::OK, self.view(&name)),
                false => self.unknown(&name),
            },
            ApiCall::History(name) => match self.rollouts.get(&name) {
                Some(r) => {
                    let filter = baton_audit::Filter {
                        rollout: Some(name.clone()),
                        limit: Some(500),
                        ..Default::default()
                    };
                    let events = self.audit.list(&filter).unwrap_or_default();
                    (StatusCode::OK, view::history(&name, &r.status, &events))
                }
                None => self.unknown(&name),
            },
            ApiCall::Diff { name, from, to } => self.diff(&name, from, to),
            ApiCall::Apply(text) => match baton_spec::parse(&text) {
                Ok(specs) => self.apply(specs, &actor),
                Err(e) => (
                    StatusCode::BAD_REQUEST,
                    json!({ "error": e.to_string(), "errors": e.0 }),
                ),
            },
            ApiCall::Command { name, kind } => {
                let Some(r) = self.rollouts.get_mut(&name) else {
                    let _ = reply.send(self.unknown(&name));
                    return None;
                };
                let cmd = match kind {
                    CommandKind::Promote => Command::Promote,
                    CommandKind::PromoteFull => Command::PromoteFull,
                    CommandKind::Abort => Command::Abort,
                    CommandKind::Retry => Command::Retry,
                    CommandKind::Undo => {
                        let _ = reply.send(self.undo(&name, &actor));
                        return None;
                    }
                };
                // Answered once the engine has acted on it, in the next step.
                r.commands.push((cmd, actor, reply));
                return None;
            }
            ApiCall::Shutdown { down } => {
                let what = if down {
                    "down: stopping the proxy, every instance and the controller"
                } else {
                    "controller stopping; proxy and instances keep serving"
                };
                self.record(&actor, "", "ControllerStopped", what);
                return Some((down, reply));
            }
        };
        let _ = reply.send(answer);
        None
    }

    fn unknown(&self, name: &str) -> Reply {
        let known: Vec<&str> = self.rollouts.keys().map(String::as_str).collect();
        api::error(
            StatusCode::NOT_FOUND,
            format!("no rollout named {name:?} (known: {})", known.join(", ")),
        )
    }

    fn view(&self, name: &str) -> serde_json::Value {
        match self.rollouts.get(name) {
            Some(r) => view::rollout(name, &r.spec, &r.status, r.acked, &self.platform),
            None => json!(null),
        }
    }

    /// Records new or changed specs; the engine picks them up on the next step.
    fn apply(&mut self, specs: Vec<Rollout>, actor: &str) -> Reply {
        // Listeners must not clash with other rollouts already running.
        for s in &specs {
            for (name, r) in &self.rollouts {
                if *name == s.metadata.name {
                    continue;
                }
                let theirs = listen_addrs(&r.spec);
                for a in listen_addrs(s) {
                    if theirs.contains(&a) {
                        return api::error(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "spec.traffic.listen: {a} of rollout {} is already used by rollout {name}",
                                s.metadata.name
                            ),
                        );
                    }
                }
            }
        }
        let now = now_ms();
        let mut changed = Vec::new();
        let mut unchanged = Vec::new();
        for spec in specs {
            let name = spec.metadata.name.clone();
            let status = match self.rollouts.get(&name) {
                Some(r) if r.spec == spec => {
                    unchanged.push(name);
                    continue;
                }
                Some(r) => r.status.clone(),
                None => Status::default(),
            };
            let revision = spec.spec.run.revision_hash();
            let saved = self
                .store
                .save_rollout(&name, &spec, &status, now)
                .and_then(|()| self.store.save_revision_spec(&name, &revision, &spec));
            if let Err(e) = saved {
                return api::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot record {name}: {e}"),
                );
            }
            let version = spec.spec.run.app_version().unwrap_or("").to_string();
            let digest = spec_digest(&spec);
            match self.rollouts.get_mut(&name) {
                Some(r) => {
                    r.spec = spec;
                    r.digest = digest;
                }
                None => {
                    self.rollouts.insert(
                        name.clone(),
                        RolloutState {
                            digest,
                            spec,
                            status,
                            acked: 0,
                            measurements: Vec::new(),
                            smoke: None,
                            commands: Vec::new(),
                        },
                    );
                }
            }
            self.record(
                actor,
                &name,
                "Applied",
                &format!("spec applied (revision {revision} {version})"),
            );
            changed.push(name);
        }
        (
            StatusCode::OK,
            json!({ "applied": changed, "unchanged": unchanged }),
        )
    }

    /// Rolls back to the previous stable revision by re-applying its `run`, so the
    /// strategy decides how traffic moves back (a blue-green switch back is instant
    /// while the previous stack is retained).
    fn undo(&mut self, name: &str, actor: &str) -> Reply {
        let Some(r) = self.rollouts.get(name) else {
            return self.unknown(name);
        };
        let Some(target) = undo_target(&r.status) else {
            return api::error(
                StatusCode::CONFLICT,
                format!("{name} has no previous stable revision to go back to"),
            );
        };
        let mut spec = r.spec.clone();
        spec.spec.run = target.run.clone();
        let label = target.label();
        let reply = self.apply(vec![spec], actor);
        if reply.0.is_success() {
            self.record(
                actor,
                name,
                "Undo",
                &format!("undo: rolling back to {label}"),
            );
            (
                StatusCode::OK,
                json!({ "result": format!("rolling back to {label}") }),
            )
        } else {
            reply
        }
    }

    /// A unified diff of the specs that introduced two revisions.
    fn diff(&self, name: &str, from: u64, to: u64) -> Reply {
        let Some(r) = self.rollouts.get(name) else {
            return self.unknown(name);
        };
        let mut texts = Vec::new();
        for n in [from, to] {
            let Some(rev) = r.status.revisions.iter().find(|x| x.number == n) else {
                return api::error(
                    StatusCode::NOT_FOUND,
                    format!("{name} has no revision #{n}"),
                );
            };
            let spec: Option<Rollout> = self.store.revision_spec(name, &rev.name).unwrap_or(None);
            let Some(spec) = spec else {
                return api::error(
                    StatusCode::NOT_FOUND,
                    format!("the spec of {name} #{n} was not recorded"),
                );
            };
            texts.push(serde_saphyr::to_string(&spec).unwrap_or_default());
        }
        let diff = similar::TextDiff::from_lines(&texts[0], &texts[1])
            .unified_diff()
            .header(&format!("{name} #{from}"), &format!("{name} #{to}"))
            .to_string();
        (
            StatusCode::OK,
            json!({ "from": from, "to": to, "diff": diff }),
        )
    }

    async fn shutdown(mut self, down: bool, reply: oneshot::Sender<Reply>) -> Result<()> {
        let answer = if down {
            // Proxy first: it stops accepting and drains; then the instances.
            let _ = self.proxy.shutdown().await;
            if let Some(c) = &mut self.proxy_child {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    while matches!(c.try_wait(), Ok(None)) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
            }
            let n = self
                .platform
                .stop_all(&self.store, Duration::from_secs(10))
                .await?;
            for name in self.rollouts.keys() {
                self.say(name, "Down", "proxy and instances stopped");
            }
            json!({ "result": format!("stopped the proxy and {n} instance(s)") })
        } else {
            json!({ "result": "controller stopped; the proxy and instances keep serving" })
        };
        let _ = std::fs::remove_file(self.paths.controller_pid());
        let _ = reply.send((StatusCode::OK, answer));
        Ok(())
    }
}

fn listen_addrs(spec: &Rollout) -> Vec<String> {
    let mut v = vec![spec.spec.traffic.listen.clone()];
    if let StrategyRef::BlueGreen(bg) = spec.spec.strategy.kind()
        && let Some(p) = &bg.preview_listen
    {
        v.push(p.clone());
    }
    v
}

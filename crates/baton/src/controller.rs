//! `baton up`: the controller loop on one machine.
//!
//! Every tick: answer API calls, step the engine of each rollout (status persisted
//! before anything is acted on), let the platform start and stop instances, and push
//! the routing table to the proxy when it changed. The proxy and the instances are
//! separate processes that outlive the controller; a new controller adopts them.
#![warn(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_audit::{AuditLog, NewEntry};
use baton_driver::{Command, Delivery, Driver, Notifier, Record, Request, Target};
use baton_engine::{Status, undo_target};
use baton_local::machine::Machine;
use baton_local::router::{Note, ProxyRouter, service_route};
use baton_local::{Desired, Platform, PlatformEvent, RevisionWant, Store};
use baton_proxy::{ServiceRoute, StatsSnapshot};
use baton_spec::Rollout;
use hyper::StatusCode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::api::{self, ApiCall, ApiRequest, Identities, Reply, local_user};
use crate::board::Board;
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
    /// Passed on to the proxy this controller starts (else it logs as the
    /// environment's BATON_LOG_FORMAT says, as text by default).
    pub log_format: Option<crate::logs::LogFormat>,
    /// Where the audit trail's head and key are (default: outside the state
    /// directory, see `trail::Seal`).
    pub audit: crate::trail::Seal,
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
    record: Record,
    commands: Vec<(Command, String, oneshot::Sender<Reply>)>,
}

impl RolloutState {
    fn new(spec: Rollout, record: Record) -> RolloutState {
        RolloutState {
            digest: spec_digest(&spec),
            spec,
            record,
            commands: Vec::new(),
        }
    }
}

fn spec_digest(spec: &Rollout) -> String {
    baton_audit::digest(&serde_json::to_vec(spec).unwrap_or_default())
}

/// The audit action of the controller's own entries (the driver's events carry theirs).
fn action_of(reason: &str) -> &'static str {
    match reason {
        "Applied" => "apply",
        "TrafficShifted" => "traffic",
        "Undo" => "undo",
        "Notification" => "notify",
        "Resumed" | "ControllerStarted" | "ControllerStopped" | "RoutingRefused"
        | "RoutingRecovered" | "ProxyReplaced" => "config",
        "Down" => "down",
        "Refused" | "Denied" => "refused",
        _ => "instance",
    }
}

struct Controller {
    paths: Paths,
    opts: UpOptions,
    world: Machine,
    driver: Driver,
    router: ProxyRouter,
    board: Arc<Board>,
    rollouts: BTreeMap<String, RolloutState>,
    smoke_rx: mpsc::UnboundedReceiver<(String, String, bool, String)>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    /// When the dashboard next gets the status, and a traffic sample.
    next_publish: u64,
    next_sample: u64,
    /// The rollout metrics as last written for the proxy to serve.
    metrics_written: String,
    /// The last write of them failed (said once until one succeeds).
    metrics_failing: bool,
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
    // A database that cannot be written is found now, before anything is started or
    // announced, not at the first step.
    store
        .set_meta("controller_started_at", &now_ms().to_string())
        .with_context(|| format!("cannot write {}", paths.db().display()))?;
    // The API's port too: a controller that cannot serve it must not leave a proxy
    // behind.
    let listener = TcpListener::bind(opts.api_listen)
        .await
        .with_context(|| format!("cannot serve the control API on {}", opts.api_listen))?;
    let stored_version: u64 = store
        .meta("route_version")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let router = ProxyRouter::start(
        paths.proxy_socket(),
        paths.proxy_log(),
        opts.metrics_listen.map(|m| (m, paths.rollout_metrics())),
        opts.log_format
            .map(|f| vec!["--log-format".to_string(), f.as_str().to_string()])
            .unwrap_or_default(),
        stored_version,
    )
    .await?;
    let (platform, adopted) = Platform::adopt(paths.logs(), &store, router.routed())?;
    let board = Arc::new(Board::default());
    let (smoke_tx, smoke_rx) = mpsc::unbounded_channel();
    let audit: AuditLog = opts.audit.writer(&paths, true)?;
    let (delivery_tx, deliveries) = mpsc::unbounded_channel();
    let mut c = Controller {
        paths: paths.clone(),
        opts: opts.clone(),
        world: Machine {
            store,
            platform,
            proxy: router.client().clone(),
            audit,
            on_audit: {
                let board = board.clone();
                Arc::new(move |rollout: &str| board.audit_written(rollout))
            },
            echo: opts.echo,
            acked: BTreeMap::new(),
            stats: None,
            smoke_tx,
            smoke_done: BTreeMap::new(),
        },
        driver: Driver::new(Some(Arc::new(Notifier::new(delivery_tx)))),
        router,
        board,
        rollouts: BTreeMap::new(),
        smoke_rx,
        deliveries,
        next_publish: 0,
        next_sample: 0,
        metrics_written: String::new(),
        metrics_failing: false,
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
    // A status that cannot be read stops the start (naming the rollout), rather than
    // starting that rollout over.
    let stored = c
        .world
        .store
        .rollouts::<Rollout, Record>()
        .context("cannot resume the stored rollouts")?;
    for (name, spec, record) in stored {
        c.say(
            &name,
            "Resumed",
            &format!(
                "resuming: {} ({})",
                record.status.phase.as_str(),
                record.status.message
            ),
        );
        if c.router.serves(&name, &record.status) {
            c.world
                .acked
                .insert(name.clone(), record.status.route_version);
        }
        c.rollouts.insert(name, RolloutState::new(spec, record));
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
                    min_ready_ms: spec.spec.min_ready_seconds.saturating_mul(1000),
                    replace_before: status
                        .restart_at
                        .filter(|_| status.stable.as_ref() == Some(rev)),
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
        let (revision, digest) = match self.rollouts.get(rollout) {
            Some(r) => (r.record.current_revision(), Some(r.digest.clone())),
            None => (None, None),
        };
        if self.opts.echo {
            baton_local::machine::log_event(rollout, revision.as_deref(), reason, actor, message);
        }
        let entry = NewEntry {
            actor: actor.to_string(),
            action: action_of(reason).to_string(),
            rollout: rollout.to_string(),
            revision,
            spec_digest: digest,
            reason: message.to_string(),
        };
        self.world.append(entry);
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
        while let Ok(d) = self.deliveries.try_recv() {
            self.say(&d.rollout, "Notification", &d.message);
        }
        while let Ok((rollout, rev, passed, detail)) = self.smoke_rx.try_recv() {
            self.world.smoke_done.insert(rollout, (rev, passed, detail));
        }
        let now = now_ms();
        self.world.stats = None;
        let names: Vec<String> = self.rollouts.keys().cloned().collect();
        for name in names {
            let Some(r) = self.rollouts.get_mut(&name) else {
                continue;
            };
            let commands = std::mem::take(&mut r.commands);
            let (requests, replies): (Vec<Request>, Vec<_>) = commands
                .into_iter()
                .map(|(command, actor, reply)| (Request { command, actor }, reply))
                .unzip();
            let t = Target {
                key: &name,
                name: &name,
                spec: &r.spec,
                digest: &r.digest,
            };
            match self
                .driver
                .cycle(&mut self.world, &t, &r.record, requests, now)
                .await
            {
                Ok(out) => {
                    r.record = out.record;
                    for ((_, answer), reply) in out.answers.into_iter().zip(replies) {
                        let _ = reply.send(match answer {
                            Ok(msg) => (StatusCode::OK, json!({ "result": msg })),
                            Err(msg) => api::error(StatusCode::CONFLICT, msg),
                        });
                    }
                }
                Err(e) => {
                    // Baton's own failure (the state file): the next tick goes on from
                    // what was persisted, which a failure after the first write has
                    // moved on; the engine's decisions are never taken twice.
                    tracing::warn!(rollout = %name, "{e}");
                    if let Ok(stored) = self.world.store.rollouts::<Rollout, Record>()
                        && let Some((_, _, record)) =
                            stored.into_iter().find(|(n, _, _)| *n == name)
                    {
                        r.record = record;
                    }
                    for reply in replies {
                        let _ = reply.send(api::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not done: {e}"),
                        ));
                    }
                }
            }
        }
        // The platform and the router act for every rollout at once: one reconcile of
        // the instances and one table for the proxy, from the statuses just persisted.
        let desired: Desired = self
            .rollouts
            .iter()
            .map(|(n, r)| (n.clone(), wants_for(&r.spec, &r.record.status)))
            .collect();
        let reserved = self
            .rollouts
            .values()
            .flat_map(|r| baton_spec::addr::listeners(&r.spec))
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .chain(
                [Some(self.opts.api_listen), self.opts.metrics_listen]
                    .into_iter()
                    .flatten(),
            )
            .map(|a| a.port())
            .collect();
        self.world.platform.reserve_ports(reserved);
        let events = self
            .world
            .platform
            .reconcile(&desired, &self.world.store, now)?;
        self.platform_events(events);
        self.sync_routes(now).await;
        let stats = self.world.stats.take();
        self.publish(now, stats).await;
        self.write_metrics();
        self.router.reap();
        Ok(())
    }

    /// Hands the rollout metrics to the proxy's `/metrics` when they changed: written
    /// whole and renamed into place, so a scrape never reads half a file.
    fn write_metrics(&mut self) {
        if self.opts.metrics_listen.is_none() {
            return;
        }
        let text = self.driver.metrics.render();
        if text == self.metrics_written {
            return;
        }
        let path = self.paths.rollout_metrics();
        let tmp = path.with_extension("prom.tmp");
        // Baton's own failure (a full disk) is said once, never a rollout's, and tried
        // again at every tick until the file is current.
        match std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path)) {
            Ok(()) => {
                self.metrics_written = text;
                self.metrics_failing = false;
            }
            Err(e) if !self.metrics_failing => {
                self.metrics_failing = true;
                tracing::warn!("cannot write {}: {e}", path.display());
            }
            Err(_) => {}
        }
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
                None => self.world.proxy.stats().await.ok(),
            };
            if let Some(mut s) = stats {
                // The rollouts' own revisions only: the proxy keeps a revision's
                // counters two minutes past its last table, and a copy of them all
                // would grow with the deploy rate.
                s.retain(|name, revisions| {
                    let Some(r) = self.rollouts.get(name) else {
                        return false;
                    };
                    let known = &r.record.status.revisions;
                    revisions.retain(|rev, _| known.iter().any(|k| k.name == *rev));
                    true
                });
                self.board.sample(now, s);
            }
        }
    }

    /// Pushes one table for every rollout when it changed; once the proxy confirms
    /// it, the engine may move on and instances that left routing may stop.
    async fn sync_routes(&mut self, now: u64) {
        let mut versions = BTreeMap::new();
        let services: Vec<ServiceRoute> = self
            .rollouts
            .iter()
            .map(|(name, r)| {
                versions.insert(name.clone(), r.record.status.route_version);
                service_route(name, &r.spec, &r.record.status, |rev| {
                    self.world.platform.backends(name, rev)
                })
            })
            .collect();
        let synced = self.router.sync(services, now).await;
        if synced.confirmed {
            // A service the proxy refused is not confirmed: its rollout waits (and
            // keeps the instances the proxy still sends traffic to).
            versions.retain(|name, _| !synced.refused.contains_key(name));
            self.world.acked.extend(versions);
            self.world.platform.routes_confirmed(self.router.routed());
        }
        if let Some(v) = synced.version {
            let _ = self.world.store.set_meta("route_version", &v.to_string());
        }
        for note in synced.notes {
            self.note(note);
        }
    }

    /// Records what the router saw.
    fn note(&self, note: Note) {
        match note {
            Note::Shifted {
                service,
                split,
                preview,
                table,
            } => {
                let Some(r) = self.rollouts.get(&service) else {
                    return;
                };
                let label = |rev: &str| r.record.status.label(rev);
                let mut parts: Vec<String> = split
                    .iter()
                    .map(|(rev, w)| format!("{} {w} %", label(rev)))
                    .collect();
                if let Some(p) = &preview {
                    parts.push(format!("preview {}", label(p)));
                }
                self.say(
                    &service,
                    "TrafficShifted",
                    &format!(
                        "traffic now {} (confirmed by the proxy, table {table})",
                        parts.join(", ")
                    ),
                );
            }
            Note::Refused { service, error } => self.say(
                &service,
                "RoutingRefused",
                &format!(
                    "the proxy cannot serve this rollout's new route ({error}); it keeps \
                     serving the route it had, and the rollout waits until it can"
                ),
            ),
            Note::Recovered { service } => self.say(
                &service,
                "RoutingRecovered",
                "the proxy serves this rollout's route as asked again",
            ),
            Note::RefusedAll(error) => {
                for name in self.rollouts.keys() {
                    self.say(
                        name,
                        "RoutingRefused",
                        &format!("the proxy refused the routing table: {error}"),
                    );
                }
            }
            Note::Replaced(why) => {
                for name in self.rollouts.keys() {
                    self.say(
                        name,
                        "ProxyReplaced",
                        &format!("the proxy did not answer ({why}); started a new one"),
                    );
                }
            }
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
                    let events = self.world.audit.list(&filter).unwrap_or_default();
                    (
                        StatusCode::OK,
                        view::history(&name, &r.record.status, &events),
                    )
                }
                None => self.unknown(&name),
            },
            ApiCall::Diff { name, from, to } => self.diff(&name, from, to),
            ApiCall::Apply(text) => match baton_spec::parse(&text) {
                Ok(specs) => {
                    let answer = self.apply(specs, &actor);
                    if !answer.0.is_success() {
                        let why = answer.1["error"].as_str().unwrap_or("refused").to_string();
                        self.record(&actor, "", "Refused", &format!("apply refused: {why}"));
                    }
                    answer
                }
                Err(e) => {
                    self.record(&actor, "", "Refused", &format!("apply refused: {e}"));
                    (
                        StatusCode::BAD_REQUEST,
                        json!({ "error": e.to_string(), "errors": e.0 }),
                    )
                }
            },
            ApiCall::Denied(reason) => {
                self.record(&actor, "", "Denied", &reason);
                return None;
            }
            ApiCall::Command { name, kind } => {
                let Some(r) = self.rollouts.get_mut(&name) else {
                    let _ = reply.send(self.unknown(&name));
                    return None;
                };
                if kind == Command::Undo {
                    let _ = reply.send(self.undo(&name, &actor));
                    return None;
                }
                // Answered once the engine has acted on it, in the next step.
                r.commands.push((kind, actor, reply));
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
            Some(r) => view::rollout(
                name,
                &r.spec,
                &r.record.status,
                view::Routing {
                    acked: self.world.acked.get(name).copied().unwrap_or(0),
                    served: self.router.served(name),
                    refusal: self.router.refusal(name).map(str::to_string),
                },
                &self.world.platform,
            ),
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
                let theirs = baton_spec::addr::listeners(&r.spec);
                for a in baton_spec::addr::listeners(s) {
                    if let Some(b) = theirs.iter().find(|b| baton_spec::addr::clash(&a, b)) {
                        return api::error(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "spec.traffic.listen: {a} of rollout {} clashes with {b} of rollout {name}",
                                s.metadata.name
                            ),
                        );
                    }
                }
            }
        }
        let now = now_ms();
        let mut unchanged = Vec::new();
        let mut changed: Vec<(Rollout, Record, String)> = Vec::new();
        for spec in specs {
            let record = match self.rollouts.get(&spec.metadata.name) {
                Some(r) if r.spec == spec => {
                    unchanged.push(spec.metadata.name.clone());
                    continue;
                }
                Some(r) => r.record.clone(),
                None => Record::default(),
            };
            let revision = spec.spec.run.revision_hash();
            changed.push((spec, record, revision));
        }
        // One transaction for the whole file: every rollout changes, or none does.
        let rows: Vec<(&str, &Rollout, &Record, &str)> = changed
            .iter()
            .map(|(s, r, rev)| (s.metadata.name.as_str(), s, r, rev.as_str()))
            .collect();
        if let Err(e) = self.world.store.save_applied(&rows, now) {
            return api::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot record the apply, nothing changed: {e}"),
            );
        }
        let mut names = Vec::new();
        for (spec, record, revision) in changed {
            let name = spec.metadata.name.clone();
            let version = spec.spec.run.app_version().unwrap_or("").to_string();
            let digest = spec_digest(&spec);
            match self.rollouts.get_mut(&name) {
                Some(r) => {
                    r.spec = spec;
                    r.digest = digest;
                }
                None => {
                    self.rollouts
                        .insert(name.clone(), RolloutState::new(spec, record));
                }
            }
            self.record(
                actor,
                &name,
                "Applied",
                &format!("spec applied (revision {revision} {version})"),
            );
            names.push(name);
        }
        (
            StatusCode::OK,
            json!({ "applied": names, "unchanged": unchanged }),
        )
    }

    /// Rolls back to the previous stable revision by re-applying its `run`, so the
    /// strategy decides how traffic moves back (a blue-green switch back is instant
    /// while the previous stack is retained).
    fn undo(&mut self, name: &str, actor: &str) -> Reply {
        let Some(r) = self.rollouts.get(name) else {
            return self.unknown(name);
        };
        let Some(target) = undo_target(&r.record.status) else {
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
            let Some(rev) = r.record.status.revisions.iter().find(|x| x.number == n) else {
                return api::error(
                    StatusCode::NOT_FOUND,
                    format!("{name} has no revision #{n}"),
                );
            };
            let spec: Option<Rollout> = self
                .world
                .store
                .revision_spec(name, &rev.name)
                .unwrap_or(None);
            let Some(spec) = spec else {
                return api::error(
                    StatusCode::NOT_FOUND,
                    format!("the spec of {name} #{n} was not recorded"),
                );
            };
            texts.push(serde_saphyr::to_string(&spec).unwrap_or_default());
        }
        let diff = view::spec_diff(name, (from, &texts[0]), (to, &texts[1]));
        (
            StatusCode::OK,
            json!({ "from": from, "to": to, "diff": diff }),
        )
    }

    async fn shutdown(mut self, down: bool, reply: oneshot::Sender<Reply>) -> Result<()> {
        let answer = if down {
            // Proxy first: it stops accepting and drains; then the instances.
            self.router.stop().await;
            let n = self
                .world
                .platform
                .stop_all(&self.world.store, Duration::from_secs(10))
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

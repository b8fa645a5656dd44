//! The operator's reconcile loop: for each Rollout, observe (ReplicaSets, the
//! router, finished measurements, requests), let the pure engine step, persist the
//! decision in the Rollout's status, then act (ReplicaSets, Services, routes,
//! measurements, smoke Jobs, Events). A weight counts only once the router is seen
//! serving it; nothing is scaled down before.
#![warn(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;

use baton_driver::{
    Command, Counters, CycleError, DataPlane, Delivery, Driver, Event, Notifier, Port, Publish,
    Record, Request, SaveError, Smoke, StatusStore, Target, Traffic, Workloads,
};
use baton_engine::{Millis, Phase, RevisionObs, Status};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Deserialize;
use serde_json::json;

use crate::crd::{ClusterGateTemplate, GateTemplate, Rollout, RolloutStatus};
use crate::engine_spec::{cluster_errors, engine_spec, run_spec};
use crate::router::{Plan, Router, gateway::Gateway, istio::Istio, replicas, services};
use crate::{Error, audit, jobs, now_ms, workload};

pub const FINALIZER: &str = "baton.dev/cleanup";
/// A person's request: `{"id": "...", "command": "promote|promote-full|abort|retry", "by": "..."}`.
pub const REQUEST_ANNOTATION: &str = "baton.dev/request";
/// Set on a Deployment once its pods were handed over to a Rollout.
pub const TAKEN_OVER_ANNOTATION: &str = "baton.dev/taken-over-by";

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// The cycle, once for both platforms; it keeps measurement windows and results.
    driver: Driver,
    pub metrics: Metrics,
    /// The rollouts' ReplicaSets as a watch keeps them: reconciles read here instead of
    /// listing from the API server each time (what makes ten thousand rollouts cheap).
    replicasets: Mutex<Option<kube::runtime::reflector::Store<ReplicaSet>>>,
    /// The audit trails' key and where their heads are kept.
    pub audit: audit::Seal,
    /// The image and service accounts the Rollouts' Jobs may use.
    pub jobs: jobs::Settings,
    /// The admission webhook is registered: a request's `baton.dev/request-actor` is
    /// the authenticated user, recorded as `user:NAME` (else the request's `by`, as a
    /// `claim:NAME`).
    verified_actors: std::sync::atomic::AtomicBool,
}

/// The controller's own metrics, in Prometheus text form by `render`.
#[derive(Default)]
pub struct Metrics {
    reconciles: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
    durations: Mutex<Vec<f64>>,
}

impl Metrics {
    fn observe(&self, seconds: f64, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.reconciles.fetch_add(1, Relaxed);
        if !ok {
            self.failures.fetch_add(1, Relaxed);
        }
        let mut d = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() >= 100_000 {
            d.drain(..50_000);
        }
        d.push(seconds);
    }

    /// Reconcile latencies seen so far, sorted (for benchmarks).
    pub fn latencies(&self) -> Vec<f64> {
        let mut d = self
            .durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        d.sort_by(f64::total_cmp);
        d
    }

    /// The controller's own metrics in Prometheus text form. Hand-written: three
    /// series, and the quantiles come from `latencies`, which benchmarks read too.
    pub fn render(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let lat = self.latencies();
        let q = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p).round().max(0.0) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        format!(
            "# HELP baton_operator_reconciles_total Reconciles run.\n# TYPE baton_operator_reconciles_total counter\nbaton_operator_reconciles_total {}\n\
             # HELP baton_operator_reconcile_errors_total Reconciles that failed.\n# TYPE baton_operator_reconcile_errors_total counter\nbaton_operator_reconcile_errors_total {}\n\
             # HELP baton_operator_reconcile_seconds Reconcile latency quantiles.\n# TYPE baton_operator_reconcile_seconds summary\n\
             baton_operator_reconcile_seconds{{quantile=\"0.5\"}} {}\nbaton_operator_reconcile_seconds{{quantile=\"0.99\"}} {}\n",
            self.reconciles.load(Relaxed),
            self.failures.load(Relaxed),
            q(0.5),
            q(0.99)
        )
    }
}

impl Context {
    /// The rollout metrics of the rollouts this replica reconciles (the driver's).
    pub fn rollout_metrics(&self) -> String {
        self.driver.metrics.render()
    }

    /// Must be called within a tokio runtime: webhook deliveries report on a task.
    pub fn new(client: Client, instance: &str) -> Arc<Context> {
        Context::with_seal(client, instance, audit::Seal::default())
    }

    /// A context whose audit trails are signed and headed as `seal` says.
    pub fn with_seal(client: Client, instance: &str, seal: audit::Seal) -> Arc<Context> {
        Context::configured(client, instance, seal, jobs::Settings::default())
    }

    /// A context with the audit `seal` and the Jobs' `settings`.
    pub fn configured(
        client: Client,
        instance: &str,
        seal: audit::Seal,
        jobs: jobs::Settings,
    ) -> Arc<Context> {
        let (reports, mut delivered) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
        tokio::spawn(async move {
            // A delivery that needed retries or failed is worth the operator's log.
            while let Some(d) = delivered.recv().await {
                if d.ok {
                    tracing::info!(rollout = %d.rollout, "{}", d.message);
                } else {
                    tracing::warn!(rollout = %d.rollout, "{}", d.message);
                }
            }
        });
        Arc::new(Context {
            client,
            reporter: Reporter {
                controller: "baton-operator".into(),
                instance: Some(instance.into()),
            },
            driver: Driver::new(Some(Arc::new(Notifier::new(reports)))),
            metrics: Metrics::default(),
            replicasets: Mutex::new(None),
            audit: seal,
            jobs,
            verified_actors: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Trust `baton.dev/request-actor`: the admission webhook is registered with
    /// `failurePolicy: Fail`, so no write reaches a Rollout without it.
    pub fn trust_admission_webhook(&self) {
        self.verified_actors
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The request annotation's value: `command` is the shared vocabulary's wire name.
#[derive(Deserialize)]
struct AnnotatedRequest {
    id: String,
    command: String,
    #[serde(default)]
    by: String,
}

fn condition(
    kind: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: i64,
    prev: &[Condition],
) -> Condition {
    let status = if on { "True" } else { "False" }.to_string();
    let since = prev
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: kind.into(),
        status,
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}

async fn publish(ctx: &Context, ro: &Rollout, type_: EventType, reason: &str, note: &str) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &ro.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// Gates of the Rollout and of the templates it names.
async fn gates(ctx: &Context, ro: &Rollout, ns: &str) -> Result<Vec<baton_spec::Gate>, Error> {
    let mut gates = ro.spec.analysis.gates.clone();
    for t in &ro.spec.analysis.templates {
        let found = if t.cluster_scope {
            Api::<ClusterGateTemplate>::all(ctx.client.clone())
                .get(&t.name)
                .await
                .map(|g| g.spec.gates)
        } else {
            Api::<GateTemplate>::namespaced(ctx.client.clone(), ns)
                .get(&t.name)
                .await
                .map(|g| g.spec.gates)
        };
        match found {
            Ok(more) => gates.extend(
                more.into_iter()
                    .filter(|g| !ro.spec.analysis.gates.iter().any(|own| own.name == g.name)),
            ),
            Err(e) => return Err(Error::Spec(format!("gate template {:?}: {e}", t.name))),
        }
    }
    Ok(gates)
}

pub async fn reconcile(ro: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = reconcile_inner(&ro, &ctx).await;
    ctx.metrics
        .observe(started.elapsed().as_secs_f64(), r.is_ok());
    r
}

/// One reconcile: named steps, with the cycle itself in the driver.
async fn reconcile_inner(ro: &Rollout, ctx: &Arc<Context>) -> Result<Action, Error> {
    if ro.meta().deletion_timestamp.is_some() {
        return cleanup(ro, ctx).await;
    }
    let latest_rv = ensure_finalizer(ro, ctx).await?;
    let source = match Source::resolve(ro, ctx).await {
        Ok(s) => s,
        Err(Error::Spec(reason)) => return invalid_spec(ro, ctx, &reason, latest_rv).await,
        Err(e) => return Err(e),
    };
    let ro = &source.rollout;
    let ns = ro.namespace().unwrap_or_else(|| "default".into());
    let name = ro.name_any();
    let key = format!("{ns}/{name}");
    let prev_status: RolloutStatus = ro.status.clone().unwrap_or_default();
    let prev = match prev_status.engine.clone() {
        Some(v) => Record::decode(&key, v)?,
        None => Record::default(),
    };
    let verified = ctx
        .verified_actors
        .load(std::sync::atomic::Ordering::Relaxed);
    let (requests, request_id) = take_request(ro, &prev_status, verified);
    // What the audit trail records as the spec in force: the Rollout's own spec.
    let digest = baton_audit::digest(&serde_json::to_vec(&ro.spec)?);
    let t = Target {
        key: &key,
        name: &name,
        spec: &source.spec,
        digest: &digest,
    };
    let existing = observe_replicasets(ctx, &ns, &name, &prev.status, &source.current_rev).await?;
    let mut cluster = Cluster {
        ctx: ctx.clone(),
        ro,
        ns: ns.clone(),
        name: name.clone(),
        rs_api: Api::namespaced(ctx.client.clone(), &ns),
        existing,
        source: &source,
        status: prev_status.clone(),
        latest_rv,
        request_id,
        obs: BTreeMap::new(),
        restart_pods: Vec::new(),
    };
    let out = match ctx
        .driver
        .cycle(&mut cluster, &t, &prev, requests, now_ms())
        .await
    {
        Ok(out) => out,
        Err(CycleError::Conflict) => return Ok(Action::requeue(Duration::from_millis(100))),
        Err(CycleError::Platform(e)) => return Err(e),
    };
    for (req, answer) in &out.answers {
        let (kind, note) = match answer {
            Ok(m) => (
                EventType::Normal,
                format!("{m} (requested by {})", req.actor),
            ),
            Err(m) => (EventType::Warning, format!("request refused: {m}")),
        };
        publish(ctx, ro, kind, "Request", &note).await;
    }
    let st = &out.record.status;
    let stable_available = cluster.stable_available(st);
    finish_takeover(ctx, ro, &source, stable_available).await?;
    let busy = matches!(st.phase, Phase::Progressing | Phase::Paused)
        || !out.served
        || source.takeover.is_some();
    Ok(Action::requeue(if busy {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(30)
    }))
}

/// Leaves users on stable, then lets the Rollout go.
async fn cleanup(ro: &Rollout, ctx: &Context) -> Result<Action, Error> {
    let ns = ro.namespace().unwrap_or_else(|| "default".into());
    let name = ro.name_any();
    if let Some(c) = &ro.spec.strategy.canary {
        let plan = Plan {
            namespace: ns.clone(),
            stable_service: c.stable_service.clone(),
            canary_service: c.canary_service.clone(),
            canary_weight: 0,
            header: None,
            mirror: None,
        };
        if let Err(e) = Routes::of(c).apply(&ctx.client, &plan).await {
            tracing::warn!(rollout = %format!("{ns}/{name}"), error = %e, "cannot reset the route; removing the finalizer anyway");
        }
    }
    let finalizers: Vec<String> = ro
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    Api::<Rollout>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &name,
            &crate::patch_params(),
            &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
        )
        .await?;
    ctx.driver.forget(&format!("{ns}/{name}"));
    Ok(Action::await_change())
}

/// Adds the cleanup finalizer; answers the resourceVersion the next write must carry.
async fn ensure_finalizer(ro: &Rollout, ctx: &Context) -> Result<Option<String>, Error> {
    if ro.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(ro.resource_version());
    }
    let ns = ro.namespace().unwrap_or_else(|| "default".into());
    let mut finalizers = ro.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": ro.resource_version()}});
    let patched = Api::<Rollout>::namespaced(ctx.client.clone(), &ns)
        .patch(&ro.name_any(), &crate::patch_params(), &Patch::Merge(patch))
        .await?;
    Ok(patched.resource_version())
}

/// A Rollout the engine cannot run: say so in its status, once, and wait for a change
/// (retrying every second would only say it again).
async fn invalid_spec(
    ro: &Rollout,
    ctx: &Context,
    reason: &str,
    latest_rv: Option<String>,
) -> Result<Action, Error> {
    let prev = ro.status.clone().unwrap_or_default();
    let generation = ro.meta().generation.unwrap_or(0);
    let mut status = prev.clone();
    status.observed_generation = generation;
    status.message = format!("invalid spec: {reason}");
    status.conditions.retain(|c| c.type_ != "InvalidSpec");
    status.conditions.push(condition(
        "InvalidSpec",
        true,
        "InvalidSpec",
        reason,
        generation,
        &prev.conditions,
    ));
    if status != prev {
        let mut whole = ro.clone();
        whole.metadata.resource_version = latest_rv;
        whole.metadata.managed_fields = None;
        whole.status = Some(status);
        let ns = ro.namespace().unwrap_or_else(|| "default".into());
        Api::<Rollout>::namespaced(ctx.client.clone(), &ns)
            .replace_status(&ro.name_any(), &crate::post_params(), &whole)
            .await?;
        publish(ctx, ro, EventType::Warning, "InvalidSpec", reason).await;
    }
    Ok(Action::await_change())
}

/// What a Rollout runs: its template (or the Deployment's it takes over), as the
/// engine's platform-neutral spec.
struct Source {
    /// The Rollout, with the taken-over Deployment's selector when it has none.
    rollout: Rollout,
    template: PodTemplateSpec,
    takeover: Option<Deployment>,
    spec: baton_spec::Rollout,
    current_rev: String,
}

impl Source {
    async fn resolve(ro: &Rollout, ctx: &Context) -> Result<Source, Error> {
        let ns = ro.namespace().unwrap_or_else(|| "default".into());
        let (template, takeover) = match (&ro.spec.template, &ro.spec.workload_ref) {
            (Some(t), _) => (t.clone(), None),
            (None, Some(w)) => {
                if w.kind != "Deployment" {
                    return Err(Error::Spec(format!(
                        "spec.workloadRef.kind {:?}: only Deployment can be taken over",
                        w.kind
                    )));
                }
                let d = Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                    .get(&w.name)
                    .await?;
                let t = d
                    .spec
                    .as_ref()
                    .map(|s| s.template.clone())
                    .unwrap_or_default();
                (t, Some(d))
            }
            (None, None) => {
                return Err(Error::Spec(
                    "spec.template or spec.workloadRef: set one".into(),
                ));
            }
        };
        let mut rollout = ro.clone();
        if let Some(d) = &takeover
            && ro
                .spec
                .selector
                .match_labels
                .as_ref()
                .is_none_or(|m| m.is_empty())
        {
            // Without a selector of its own, a takeover uses the Deployment's.
            rollout.spec.selector = d
                .spec
                .as_ref()
                .map(|s| s.selector.clone())
                .unwrap_or_default();
        }
        let spec = engine_spec(&rollout, &template, gates(ctx, &rollout, &ns).await?);
        let mut errors = cluster_errors(&rollout, &spec);
        errors.extend(jobs::operator_problems(&rollout, &ctx.jobs));
        if !errors.is_empty() {
            let said: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.reason))
                .collect();
            return Err(Error::Spec(said.join("; ")));
        }
        let mut spec = spec;
        spec.expand_shorthands();
        let current_rev = run_spec(&template).revision_hash();
        Ok(Source {
            rollout,
            template,
            takeover,
            spec,
            current_rev,
        })
    }
}

/// A person's request from the annotation, once per id.
fn take_request(
    ro: &Rollout,
    prev: &RolloutStatus,
    verified: bool,
) -> (Vec<Request>, Option<String>) {
    let mut id = prev.last_request.clone();
    let Some(raw) = ro.annotations().get(REQUEST_ANNOTATION) else {
        return (Vec::new(), id);
    };
    match serde_json::from_str::<AnnotatedRequest>(raw) {
        Ok(req) if Some(&req.id) != prev.last_request.as_ref() => {
            id = Some(req.id);
            match Command::parse(&req.command).filter(|c| c.engine().is_some()) {
                Some(command) => (
                    vec![Request {
                        command,
                        // Anyone who may patch the Rollout can write any name in `by`:
                        // a claim, and recorded as one, unless the admission webhook
                        // stamped the authenticated user.
                        actor: crate::admission::actor(ro.annotations(), &req.by, verified),
                    }],
                    id,
                ),
                None => {
                    tracing::warn!(rollout = %ro.name_any(), command = %req.command, "ignoring an unknown command in {REQUEST_ANNOTATION}");
                    (Vec::new(), id)
                }
            }
        }
        Ok(_) => (Vec::new(), id),
        Err(e) => {
            tracing::warn!(rollout = %ro.name_any(), error = %e, "ignoring a malformed {REQUEST_ANNOTATION}");
            (Vec::new(), id)
        }
    }
}

/// The Rollout's ReplicaSets, from the watch cache when there is one.
async fn observe_replicasets(
    ctx: &Context,
    ns: &str,
    name: &str,
    prev: &Status,
    current_rev: &str,
) -> Result<BTreeMap<String, ReplicaSet>, Error> {
    let cache = ctx
        .replicasets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(match cache {
        // Every revision the engine knows, and the current one: lookups by name. Only
        // once the cache holds what exists, or the reconcile would create it again (the
        // controller drives the watch that fills it meanwhile).
        Some(store) => {
            store
                .wait_until_ready()
                .await
                .map_err(|_| Error::CacheGone)?;
            prev.revisions
                .iter()
                .map(|r| r.name.clone())
                .chain(std::iter::once(current_rev.to_string()))
                .filter_map(|rev| {
                    let key =
                        kube::runtime::reflector::ObjectRef::new(&workload::rs_name(name, &rev))
                            .within(ns);
                    store.get(&key).map(|rs| (rev, (*rs).clone()))
                })
                .collect()
        }
        None => workload::observe(&Api::namespaced(ctx.client.clone(), ns), name).await?,
    })
}

/// A taken-over Deployment goes to zero once the Rollout's stable pods are available.
async fn finish_takeover(
    ctx: &Context,
    ro: &Rollout,
    source: &Source,
    stable_available: bool,
) -> Result<(), Error> {
    let Some(d) = &source.takeover else {
        return Ok(());
    };
    if !stable_available || d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) == 0 {
        return Ok(());
    }
    let ns = ro.namespace().unwrap_or_else(|| "default".into());
    let patch = json!({"metadata": {"annotations": {TAKEN_OVER_ANNOTATION: ro.name_any()}}, "spec": {"replicas": 0}});
    Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&d.name_any(), &crate::patch_params(), &Patch::Merge(patch))
        .await?;
    publish(
        ctx,
        ro,
        EventType::Normal,
        "TakenOver",
        &format!(
            "Deployment {} scaled to 0: the Rollout's pods serve now",
            d.name_any()
        ),
    )
    .await;
    Ok(())
}

/// The router a canary's weights go to, picked once from its spec.
enum Routes {
    Gateway(Gateway),
    Istio(Istio),
    /// Services only, or no router: the share of pods is the share of traffic.
    None,
}

impl Routes {
    fn of(c: &crate::crd::Canary) -> Routes {
        match c.traffic_routing.as_ref() {
            Some(tr) => match (&tr.gateway_api, &tr.istio) {
                (Some(g), _) => Routes::Gateway(Gateway {
                    route: g.http_route.clone(),
                }),
                (None, Some(i)) => Routes::Istio(Istio {
                    virtual_service: i.virtual_service.clone(),
                }),
                _ => Routes::None,
            },
            None => Routes::None,
        }
    }

    async fn apply(&self, client: &Client, plan: &Plan) -> Result<bool, Error> {
        match self {
            Routes::Gateway(g) => g.apply(client, plan).await,
            Routes::Istio(i) => i.apply(client, plan).await,
            Routes::None => Ok(true),
        }
    }
}

/// The cluster, as the driver sees it for one Rollout.
struct Cluster<'a> {
    ctx: Arc<Context>,
    ro: &'a Rollout,
    ns: String,
    name: String,
    rs_api: Api<ReplicaSet>,
    existing: BTreeMap<String, ReplicaSet>,
    source: &'a Source,
    /// The status as last written (or read).
    status: RolloutStatus,
    latest_rv: Option<String>,
    request_id: Option<String>,
    /// What `observe` saw, for the conditions.
    obs: BTreeMap<String, RevisionObs>,
    /// The stable revision's pods, read while a restart runs.
    restart_pods: Vec<k8s_openapi::api::core::v1::Pod>,
}

impl Cluster<'_> {
    /// A restart's next step: one pod that predates it deleted (its ReplicaSet makes a
    /// new one), once the surge is ready and nothing else is terminating.
    async fn replace_one(&self, st: &Status) -> Result<(), Error> {
        let (Some(at), Some(stable)) = (st.restart_at, &st.stable) else {
            return Ok(());
        };
        let wanted = st.desired.get(stable).copied().unwrap_or(0);
        let Some(pod) = workload::next_to_replace(&self.restart_pods, at, wanted) else {
            return Ok(());
        };
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.ctx.client.clone(), &self.ns);
        match api.delete(&pod, &Default::default()).await {
            Ok(_) => {}
            // Gone already: the next cycle reads the pods again.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        publish(
            &self.ctx,
            self.ro,
            EventType::Normal,
            "Restarting",
            &format!("pod {pod} deleted for the restart; its ReplicaSet replaces it"),
        )
        .await;
        Ok(())
    }

    /// Without a router the canary runs only its share of pods.
    fn replica_ratio(&self) -> bool {
        self.ro
            .spec
            .strategy
            .canary
            .as_ref()
            .is_some_and(|c| c.traffic_routing.is_none())
    }

    fn stable_available(&self, st: &Status) -> bool {
        st.stable
            .as_ref()
            .and_then(|s| self.obs.get(s))
            .map_or(0, |o| o.available)
            >= self.source.spec.spec.replicas
    }

    fn status_of(&self, record: &Record) -> Result<RolloutStatus, Error> {
        let st = &record.status;
        let prev = &self.status;
        let generation = self.ro.meta().generation.unwrap_or(0);
        let version = |rev: &Option<String>| {
            rev.as_ref()
                .and_then(|r| st.revision(r))
                .and_then(|r| r.run.app_version().map(str::to_string))
        };
        let total: i32 = self
            .existing
            .values()
            .map(|rs| rs.status.as_ref().map_or(0, |s| s.replicas))
            .sum();
        let ready: i32 = self
            .existing
            .values()
            .map(|rs| {
                rs.status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0)
            })
            .sum();
        let stable_available = self.stable_available(st);
        let when = |on: bool| if on { st.message.as_str() } else { "" };
        let conditions = vec![
            condition(
                "Progressing",
                matches!(st.phase, Phase::Progressing | Phase::Paused),
                st.phase.as_str(),
                &st.message,
                generation,
                &prev.conditions,
            ),
            condition(
                "Available",
                stable_available,
                if stable_available {
                    "StableAvailable"
                } else {
                    "StableNotAvailable"
                },
                "",
                generation,
                &prev.conditions,
            ),
            condition(
                "Paused",
                st.phase == Phase::Paused,
                "Paused",
                when(st.phase == Phase::Paused),
                generation,
                &prev.conditions,
            ),
            condition(
                "Degraded",
                st.phase == Phase::Degraded,
                "Degraded",
                when(st.phase == Phase::Degraded),
                generation,
                &prev.conditions,
            ),
        ];
        Ok(RolloutStatus {
            phase: st.phase.as_str().into(),
            message: st.message.clone(),
            observed_generation: generation,
            stable_revision: st.stable.clone(),
            canary_revision: st.canary.clone(),
            stable_version: version(&st.stable),
            canary_version: version(&st.canary),
            canary_weight: st.canary.as_ref().map(|c| st.weight(c)).unwrap_or(0) as i32,
            replicas: total,
            ready_replicas: ready,
            selector: workload::selector_string(self.ro),
            route_acked: prev.route_acked,
            last_request: self.request_id.clone(),
            conditions,
            engine: Some(serde_json::to_value(record)?),
        })
    }
}

impl Port for Cluster<'_> {
    type Error = Error;
}

impl Workloads for Cluster<'_> {
    async fn observe(
        &mut self,
        t: &Target<'_>,
        prev: &Status,
        _: Millis,
    ) -> Result<BTreeMap<String, RevisionObs>, Error> {
        let mut revisions: BTreeMap<String, RevisionObs> = self
            .existing
            .iter()
            .map(|(rev, rs)| (rev.clone(), workload::obs_of(rs)))
            .collect();
        if self.replica_ratio()
            && let Some(c) = &prev.canary
        {
            // Without a router the canary runs only its share of pods: for the engine
            // it is "fully available" once that share is.
            let replicas = t.spec.spec.replicas;
            let target = replicas::canary_replicas(replicas, prev.canary_weight);
            if let Some(o) = revisions.get_mut(c)
                && o.available >= target
                && prev.weights.get(c).copied().unwrap_or(0) < 100
            {
                o.available = replicas;
                o.ready = o.ready.max(replicas);
            }
        }
        self.obs = self
            .existing
            .iter()
            .map(|(rev, rs)| (rev.clone(), workload::obs_of(rs)))
            .collect();
        if let (Some(at), Some(stable)) = (prev.restart_at, &prev.stable) {
            self.restart_pods =
                workload::pods(&self.ctx.client, &self.ns, &self.name, stable).await?;
            revisions.entry(stable.clone()).or_default().stale =
                workload::stale(&self.restart_pods, at);
        }
        Ok(revisions)
    }

    async fn apply(&mut self, t: &Target<'_>, st: &Status) -> Result<(), Error> {
        let mut desired = st.desired.clone();
        if self.replica_ratio()
            && let Some(c) = &st.canary
            && st.weight(c) < 100
            && !st.aborted
            && let Some(n) = desired.get_mut(c)
            && *n > 0
        {
            *n =
                replicas::canary_replicas(t.spec.spec.replicas, st.canary_weight.max(st.weight(c)));
        }
        let src = self.source;
        for what in workload::sync(
            &self.rs_api,
            self.ro,
            (&src.current_rev, &src.template),
            &desired,
            &self.existing,
        )
        .await?
        {
            tracing::info!(rollout = %t.key, "{what}");
        }
        self.replace_one(st).await
    }
}

impl Traffic for Cluster<'_> {
    fn confirmed(&mut self, _: &Target<'_>) -> u64 {
        self.status.route_acked
    }

    async fn route(&mut self, t: &Target<'_>, st: &Status) -> Result<bool, Error> {
        let client = self.ctx.client.clone();
        let ns = self.ns.clone();
        let mut served = true;
        let stable = st.stable.clone();
        if let Some(c) = &self.ro.spec.strategy.canary {
            // Without a router a canary's share is its share of pods: the stable Service
            // carries it only by selecting both revisions (never a weight nothing serves).
            let shared = matches!(Routes::of(c), Routes::None)
                && st
                    .canary
                    .as_ref()
                    .is_some_and(|cr| (1..100).contains(&st.weight(cr)));
            match (&c.stable_service, &stable) {
                (Some(svc), _) if shared => {
                    served &= services::spread(&client, &ns, svc, &self.name).await?;
                }
                (Some(svc), Some(s)) => {
                    served &= services::point(&client, &ns, svc, &self.name, s).await?
                }
                _ => {}
            }
            let canary_ready = st
                .canary
                .clone()
                .filter(|c| self.obs.get(c).is_some_and(|o| o.ready > 0));
            // Until the canary Service's endpoints have followed its selector, a weight
            // on it would reach the wrong pods or none: the route holds it at 0.
            let mut canary_follows = true;
            if let (Some(svc), Some(target)) = (&c.canary_service, canary_ready.or(stable.clone()))
            {
                canary_follows = services::point(&client, &ns, svc, &self.name, &target).await?;
                served &= canary_follows;
            }
            let canary_on = st.canary.is_some() && !st.aborted && canary_follows;
            let plan = Plan {
                namespace: ns.clone(),
                stable_service: c.stable_service.clone(),
                canary_service: c.canary_service.clone(),
                canary_weight: st
                    .canary
                    .as_ref()
                    .filter(|_| canary_follows)
                    .map(|c| st.weight(c))
                    .unwrap_or(0),
                header: c
                    .canary_header
                    .as_ref()
                    .filter(|_| canary_on)
                    .map(|h| (h.name.clone(), h.value.clone())),
                mirror: (c.mirror_percent > 0 && canary_on).then(|| crate::router::Mirror {
                    percent: c.mirror_percent,
                    methods: if c.mirror_methods.is_empty() {
                        baton_spec::SAFE_METHODS.map(String::from).to_vec()
                    } else {
                        c.mirror_methods.clone()
                    },
                }),
            };
            served &= match Routes::of(c) {
                Routes::None => match &st.canary {
                    // Replica ratio: the share is served once its pods are.
                    Some(cr) if plan.canary_weight > 0 && plan.canary_weight < 100 => {
                        let ready = self
                            .existing
                            .get(cr)
                            .map(|r| workload::obs_of(r).ready)
                            .unwrap_or(0);
                        ready >= replicas::canary_replicas(t.spec.spec.replicas, plan.canary_weight)
                    }
                    _ => true,
                },
                routes => routes.apply(&client, &plan).await?,
            };
        } else if let Some(bg) = &self.ro.spec.strategy.blue_green {
            let active = st
                .weights
                .iter()
                .max_by_key(|(_, w)| **w)
                .map(|(r, _)| r.clone());
            if let Some(a) = &active {
                served &= services::point(&client, &ns, &bg.active_service, &self.name, a).await?;
            }
            if let (Some(svc), Some(p)) = (&bg.preview_service, st.preview.clone().or(active)) {
                served &= services::point(&client, &ns, svc, &self.name, &p).await?;
            }
        }
        if served && st.route_version > self.status.route_acked {
            let patched = Api::<Rollout>::namespaced(client, &ns)
                .patch_status(
                    &self.name,
                    &crate::patch_params(),
                    &Patch::Merge(json!({"status": {"routeAcked": st.route_version}})),
                )
                .await?;
            self.status.route_acked = st.route_version;
            self.latest_rv = patched.resource_version();
        }
        Ok(served)
    }
}

impl StatusStore for Cluster<'_> {
    /// A whole replace, not a merge patch: the engine's maps must lose keys too. It
    /// carries the resourceVersion last read or written, so a concurrent change makes
    /// it 409 and the next reconcile starts from what is there. Kubernetes has no
    /// audit trail of Baton's: the events are its Events (see `Publish`).
    async fn save(
        &mut self,
        _: &Target<'_>,
        record: &Record,
        _: bool,
        _: &[Event],
    ) -> Result<(), SaveError<Error>> {
        let status = self.status_of(record).map_err(SaveError::Other)?;
        if status == self.status {
            return Ok(());
        }
        let mut whole = self.ro.clone();
        whole.metadata.resource_version = self.latest_rv.clone();
        whole.metadata.managed_fields = None;
        whole.status = Some(status.clone());
        let api = Api::<Rollout>::namespaced(self.ctx.client.clone(), &self.ns);
        match api
            .replace_status(&self.name, &crate::post_params(), &whole)
            .await
        {
            Ok(written) => {
                self.latest_rv = written.resource_version();
                self.status = status;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(SaveError::Conflict),
            Err(e) => Err(SaveError::Other(e.into())),
        }
    }
}

impl Smoke for Cluster<'_> {
    async fn start(&mut self, _: &Target<'_>, revision: &str) -> Result<(), Error> {
        jobs::start_smoke(
            &self.ctx.client,
            &self.ctx.jobs,
            self.ro,
            &self.ns,
            revision,
        )
        .await
    }

    async fn take(
        &mut self,
        _: &Target<'_>,
        prev: &Status,
    ) -> Result<Option<(String, bool, String)>, Error> {
        jobs::take_smoke(&self.ctx.client, self.ro, &self.ns, prev).await
    }
}

impl DataPlane for Cluster<'_> {
    async fn counters(&mut self, _: &Target<'_>, revisions: &[&str]) -> Counters {
        crate::requests::counters(self.ro, revisions).await
    }

    fn address(&self, _: &Target<'_>, _: &str) -> Option<SocketAddr> {
        None
    }

    fn commands(&self, _: &Target<'_>) -> Option<Arc<dyn baton_driver::CommandRunner>> {
        Some(Arc::new(jobs::JobRunner {
            client: self.ctx.client.clone(),
            ro: Arc::new(self.ro.clone()),
            ns: self.ns.clone(),
        }))
    }
}

/// An event becomes a Kubernetes Event and an entry of the Rollout's audit trail
/// (`audit.rs`), once the status that produced it is written.
impl Publish for Cluster<'_> {
    async fn emit(&mut self, t: &Target<'_>, e: &Event) {
        let kind = if e.kind.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(&self.ctx, self.ro, kind, e.kind.reason(), &e.message).await;
        let entry = baton_audit::NewEntry {
            actor: e.actor.clone(),
            action: e.kind.audit_action().to_string(),
            rollout: self.name.clone(),
            revision: e.revision.clone(),
            spec_digest: Some(t.digest.to_string()),
            reason: e.message.clone(),
        };
        let written = audit::append(
            &self.ctx.client,
            &self.ctx.audit,
            &self.ns,
            &self.name,
            entry,
            e.at,
        );
        if let Err(err) = written.await {
            // Told again from the outbox while it stays unwritten; never fails a cycle.
            tracing::warn!(rollout = %t.key, error = %err, "cannot append to the audit trail");
        }
    }
}

pub fn error_policy(ro: Arc<Rollout>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(rollout = %ro.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (rollouts, rss): (Api<Rollout>, Api<ReplicaSet>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx2 = ctx.clone();
    let (reader, writer) = kube::runtime::reflector::store::<ReplicaSet>();
    // One watch of the ReplicaSets both fills the cache reconciles read and triggers
    // them, each change in the cache before its trigger. With a watch of each, a
    // reconcile could run on a change its cache had not seen yet, find the Rollout
    // settled, and wait the idle requeue (30 s) for the next look.
    // With a backoff: without one a watcher retries a failing API server at once and
    // never yields its thread (found as a test runtime that could not shut down once its
    // fake API server was gone).
    let replicasets = kube::runtime::reflector(
        writer,
        watcher(
            rss,
            watcher::Config::default().labels(workload::ROLLOUT_LABEL),
        )
        .default_backoff(),
    )
    .touched_objects();
    *ctx.replicasets.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
    // A bounded number of reconciles at once: beyond the API server's parallelism more
    // only queue inside it, and a Rollout waits in the work queue instead.
    let controller = Controller::new(rollouts, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .owns_stream(replicasets)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx2)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    controller.await;
}

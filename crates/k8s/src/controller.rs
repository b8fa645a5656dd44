//! The operator's reconcile loop: for each Rollout, observe (ReplicaSets, the
//! router, finished measurements, requests), let the pure engine step, persist the
//! decision in the Rollout's status, then act (ReplicaSets, Services, routes,
//! measurements, smoke Jobs, Events). A weight counts only once the router is seen
//! serving it; nothing is scaled down before.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_engine::{Action as EngineAction, Command, Measurement, Observations, Phase, Status};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Deserialize;
use serde_json::json;

use crate::crd::{ClusterGateTemplate, GateTemplate, Rollout, RolloutStatus};
use crate::engine_spec::{engine_spec, run_spec};
use crate::router::{Plan, Router, gateway::Gateway, istio::Istio, replicas, services};
use crate::{Error, now_ms, workload};

pub const FINALIZER: &str = "baton.dev/cleanup";
/// A person's request: `{"id": "...", "command": "promote|promote-full|abort|retry", "by": "..."}`.
pub const REQUEST_ANNOTATION: &str = "baton.dev/request";
/// Set on a Deployment once its pods were handed over to a Rollout.
pub const TAKEN_OVER_ANNOTATION: &str = "baton.dev/taken-over-by";

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// Finished measurements and smoke results waiting for their rollout's next step.
    measurements: Mutex<HashMap<String, Vec<Measurement>>>,
    pub metrics: Metrics,
    /// The rollouts' ReplicaSets as a watch keeps them: reconciles read here instead of
    /// listing from the API server each time (what makes ten thousand rollouts cheap).
    replicasets: Mutex<Option<kube::runtime::reflector::Store<ReplicaSet>>>,
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
    pub fn new(client: Client, instance: &str) -> Arc<Context> {
        Arc::new(Context {
            client,
            reporter: Reporter {
                controller: "baton-operator".into(),
                instance: Some(instance.into()),
            },
            measurements: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            replicasets: Mutex::new(None),
        })
    }

    fn take_measurements(&self, key: &str) -> Vec<Measurement> {
        self.measurements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .unwrap_or_default()
    }

    fn push_measurement(&self, key: &str, m: Measurement) {
        self.measurements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .push(m);
    }
}

#[derive(Deserialize)]
struct Request {
    id: String,
    command: String,
    #[serde(default)]
    by: String,
}

fn command_of(s: &str) -> Option<Command> {
    match s {
        "promote" => Some(Command::Promote),
        "promote-full" => Some(Command::PromoteFull),
        "abort" => Some(Command::Abort),
        "retry" => Some(Command::Retry),
        _ => None,
    }
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
    let event = Event {
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

async fn reconcile_inner(ro: &Rollout, ctx: &Arc<Context>) -> Result<Action, Error> {
    let client = ctx.client.clone();
    let ns = ro.namespace().unwrap_or_else(|| "default".into());
    let name = ro.name_any();
    let key = format!("{ns}/{name}");
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), &ns);
    let prev_status: RolloutStatus = ro.status.clone().unwrap_or_default();
    let prev: Status = prev_status
        .engine
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();

    if ro.meta().deletion_timestamp.is_some() {
        // Leave users on stable before the Rollout goes.
        if let Some(c) = &ro.spec.strategy.canary {
            let plan = Plan {
                namespace: ns.clone(),
                stable_service: c.stable_service.clone(),
                canary_service: c.canary_service.clone(),
                canary_weight: 0,
                header: None,
            };
            if let Some(tr) = &c.traffic_routing {
                let r = match (&tr.gateway_api, &tr.istio) {
                    (Some(g), _) => Gateway {
                        route: g.http_route.clone(),
                    }
                    .apply(&client, &plan)
                    .await
                    .map(|_| ()),
                    (None, Some(i)) => Istio {
                        virtual_service: i.virtual_service.clone(),
                    }
                    .apply(&client, &plan)
                    .await
                    .map(|_| ()),
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(rollout = %key, error = %e, "cannot reset the route; removing the finalizer anyway");
                }
            }
        }
        let finalizers: Vec<String> = ro
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        rollouts
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
            )
            .await?;
        return Ok(Action::await_change());
    }
    let mut latest_rv = ro.resource_version();
    if !ro.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = ro.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": ro.resource_version()}});
        let patched = rollouts
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        latest_rv = patched.resource_version();
    }

    // The template: the Rollout's own, or the Deployment it takes over.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let (template, takeover) = match (&ro.spec.template, &ro.spec.workload_ref) {
        (Some(t), _) => (t.clone(), None),
        (None, Some(w)) => {
            if w.kind != "Deployment" {
                return Err(Error::Spec(format!(
                    "workloadRef.kind {:?}: only Deployment can be taken over",
                    w.kind
                )));
            }
            let d = deployments.get(&w.name).await?;
            let t = d
                .spec
                .as_ref()
                .map(|s| s.template.clone())
                .unwrap_or_default();
            (t, Some(d))
        }
        (None, None) => return Err(Error::Spec("set spec.template or spec.workloadRef".into())),
    };
    // Without a selector of its own, a takeover uses the Deployment's.
    let with_selector;
    let ro = match &takeover {
        Some(d)
            if ro
                .spec
                .selector
                .match_labels
                .as_ref()
                .is_none_or(|m| m.is_empty()) =>
        {
            let mut r = ro.clone();
            r.spec.selector = d
                .spec
                .as_ref()
                .map(|s| s.selector.clone())
                .unwrap_or_default();
            with_selector = r;
            &with_selector
        }
        _ => ro,
    };
    let spec = engine_spec(ro, &template, gates(ctx, ro, &ns).await?);
    let current_rev = run_spec(&template).revision_hash();

    // Observe.
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let cache = ctx
        .replicasets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let existing = match cache {
        // Every revision the engine knows, and the current one: lookups by name.
        Some(store) => prev
            .revisions
            .iter()
            .map(|r| r.name.clone())
            .chain(std::iter::once(run_spec(&template).revision_hash()))
            .filter_map(|rev| {
                let key = kube::runtime::reflector::ObjectRef::new(&workload::rs_name(&name, &rev))
                    .within(&ns);
                store.get(&key).map(|rs| (rev, (*rs).clone()))
            })
            .collect(),
        None => workload::observe(&rs_api, &name).await?,
    };
    let canary_routing = ro.spec.strategy.canary.as_ref();
    let replica_ratio = canary_routing.is_some_and(|c| c.traffic_routing.is_none());
    let mut revisions: BTreeMap<String, baton_engine::RevisionObs> = existing
        .iter()
        .map(|(rev, rs)| (rev.clone(), workload::obs_of(rs)))
        .collect();
    if replica_ratio && let Some(c) = &prev.canary {
        // Without a router the canary runs only its share of pods: for the engine it is
        // "fully available" once that share is.
        let target = replicas::canary_replicas(spec.spec.replicas, prev.canary_weight);
        if let Some(o) = revisions.get_mut(c)
            && o.available >= target
            && prev.weights.get(c).copied().unwrap_or(0) < 100
        {
            o.available = spec.spec.replicas;
            o.ready = o.ready.max(spec.spec.replicas);
        }
    }
    let mut commands = Vec::new();
    let mut request_id = prev_status.last_request.clone();
    let mut requester = String::new();
    if let Some(raw) = ro.annotations().get(REQUEST_ANNOTATION) {
        match serde_json::from_str::<Request>(raw) {
            Ok(req) if Some(&req.id) != prev_status.last_request.as_ref() => {
                if let Some(c) = command_of(&req.command) {
                    commands.push(c);
                    requester = req.by.clone();
                }
                request_id = Some(req.id);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(rollout = %key, error = %e, "ignoring a malformed {REQUEST_ANNOTATION}")
            }
        }
    }
    let measurements = ctx.take_measurements(&key);
    let smoke = take_smoke(&client, &ns, &name, &prev).await?;
    let obs = Observations {
        revisions,
        router_acked: prev_status.route_acked,
        measurements,
        smoke,
        commands,
    };
    let now = now_ms();
    let out = baton_engine::step(&spec, &prev, &obs, now);
    let st = out.status;

    // Persist before acting.
    let generation = ro.meta().generation.unwrap_or(0);
    let version = |rev: &Option<String>| {
        rev.as_ref()
            .and_then(|r| st.revision(r))
            .and_then(|r| r.run.app_version().map(str::to_string))
    };
    let total: i32 = existing
        .values()
        .map(|rs| rs.status.as_ref().map_or(0, |s| s.replicas))
        .sum();
    let ready: i32 = existing
        .values()
        .map(|rs| {
            rs.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
        })
        .sum();
    let stable_available = st
        .stable
        .as_ref()
        .map(|s| obs.rev(s).available)
        .unwrap_or(0)
        >= spec.spec.replicas;
    let conditions = vec![
        condition(
            "Progressing",
            matches!(st.phase, Phase::Progressing | Phase::Paused),
            st.phase.as_str(),
            &st.message,
            generation,
            &prev_status.conditions,
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
            &prev_status.conditions,
        ),
        condition(
            "Paused",
            st.phase == Phase::Paused,
            "Paused",
            if st.phase == Phase::Paused {
                &st.message
            } else {
                ""
            },
            generation,
            &prev_status.conditions,
        ),
        condition(
            "Degraded",
            st.phase == Phase::Degraded,
            "Degraded",
            if st.phase == Phase::Degraded {
                &st.message
            } else {
                ""
            },
            generation,
            &prev_status.conditions,
        ),
    ];
    let mut status = RolloutStatus {
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
        selector: workload::selector_string(ro),
        route_acked: prev_status.route_acked,
        last_request: request_id,
        conditions,
        engine: Some(serde_json::to_value(&st)?),
    };
    if status != prev_status {
        // A whole replace, not a merge patch: the engine's maps must lose keys too. It
        // carries the resourceVersion we read, so a concurrent change makes it 409 and
        // the next reconcile starts from what is there.
        let mut whole = ro.clone();
        whole.metadata.resource_version = latest_rv;
        whole.metadata.managed_fields = None;
        whole.status = Some(status.clone());
        rollouts
            .replace_status(&name, &PostParams::default(), &whole)
            .await?;
    }
    for result in &out.command_results {
        let (kind, note) = match result {
            Ok(m) => (EventType::Normal, format!("{m} (requested by {requester})")),
            Err(m) => (EventType::Warning, format!("request refused: {m}")),
        };
        publish(ctx, ro, kind, "Request", &note).await;
    }

    // Act: workload.
    let mut desired = st.desired.clone();
    if replica_ratio
        && let Some(c) = &st.canary
        && st.weight(c) < 100
        && !st.aborted
        && let Some(n) = desired.get_mut(c)
        && *n > 0
    {
        *n = replicas::canary_replicas(spec.spec.replicas, st.canary_weight.max(st.weight(c)));
    }
    for what in workload::sync(&rs_api, ro, (&current_rev, &template), &desired, &existing).await? {
        tracing::info!(rollout = %key, "{what}");
    }

    // Act: traffic.
    let mut served = true;
    let stable = st.stable.clone();
    if let Some(c) = canary_routing {
        if let (Some(svc), Some(s)) = (&c.stable_service, &stable) {
            served &= services::point(&client, &ns, svc, s).await?;
        }
        if let (Some(svc), Some(target)) = (
            &c.canary_service,
            st.canary
                .clone()
                .filter(|c| obs.rev(c).ready > 0)
                .or(stable.clone()),
        ) {
            served &= services::point(&client, &ns, svc, &target).await?;
        }
        let plan = Plan {
            namespace: ns.clone(),
            stable_service: c.stable_service.clone(),
            canary_service: c.canary_service.clone(),
            canary_weight: st.canary.as_ref().map(|c| st.weight(c)).unwrap_or(0),
            header: c
                .canary_header
                .as_ref()
                .filter(|_| st.canary.is_some() && !st.aborted)
                .map(|h| (h.name.clone(), h.value.clone())),
        };
        served &= match c.traffic_routing.as_ref() {
            Some(tr) => match (&tr.gateway_api, &tr.istio) {
                (Some(g), _) => {
                    Gateway {
                        route: g.http_route.clone(),
                    }
                    .apply(&client, &plan)
                    .await?
                }
                (None, Some(i)) => {
                    Istio {
                        virtual_service: i.virtual_service.clone(),
                    }
                    .apply(&client, &plan)
                    .await?
                }
                _ => true,
            },
            // Replica ratio: the share is served once its pods are.
            None => match &st.canary {
                Some(cr) if plan.canary_weight > 0 && plan.canary_weight < 100 => {
                    let rs = existing.get(cr).cloned();
                    let ready = rs.as_ref().map(|r| workload::obs_of(r).ready).unwrap_or(0);
                    ready >= replicas::canary_replicas(spec.spec.replicas, plan.canary_weight)
                }
                _ => true,
            },
        };
    } else if let Some(bg) = &ro.spec.strategy.blue_green {
        let active = st
            .weights
            .iter()
            .max_by_key(|(_, w)| **w)
            .map(|(r, _)| r.clone());
        if let Some(a) = &active {
            served &= services::point(&client, &ns, &bg.active_service, a).await?;
        }
        if let (Some(svc), Some(p)) = (&bg.preview_service, st.preview.clone().or(active)) {
            served &= services::point(&client, &ns, svc, &p).await?;
        }
    }
    if served && st.route_version > prev_status.route_acked {
        status.route_acked = st.route_version;
        rollouts
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"routeAcked": st.route_version}})),
            )
            .await?;
    }

    // Act: measurements, smoke tests, events.
    for action in out.actions {
        match action {
            EngineAction::Event(baton_engine::Event { kind, message }) => {
                let reason = kind.reason().to_string();
                let kind = if matches!(
                    reason.as_str(),
                    "Aborted" | "GateFailed" | "ProgressDeadline"
                ) {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                publish(ctx, ro, kind, &reason, &message).await;
            }
            EngineAction::Measure { gate, revision, .. } => {
                let Some(g) = spec
                    .spec
                    .analysis
                    .gates
                    .iter()
                    .find(|g| g.name == gate)
                    .cloned()
                else {
                    continue;
                };
                if matches!(
                    g.metric,
                    baton_spec::MetricSource::Builtin(_) | baton_spec::MetricSource::Scorecard(_)
                ) {
                    let m = Measurement {
                        gate: g.name.clone(),
                        revision,
                        verdict: baton_engine::Verdict::Error,
                        value: None,
                        requests: 0,
                        at: now,
                        detail: "builtin metrics come from Baton's own proxy, which a cluster does not have: use a prometheus or web metric".into(),
                    };
                    ctx.push_measurement(&key, m);
                    continue;
                }
                let vars = baton_analysis::Vars {
                    service: name.clone(),
                    revision,
                    stable: st.stable.clone(),
                    address: None,
                };
                let key = key.clone();
                let ctx_measure = MeasureSink(Arc::downgrade(ctx));
                tokio::spawn(async move {
                    let m = baton_analysis::measure(&g, &vars, now_ms()).await;
                    ctx_measure.push(&key, m);
                });
            }
            EngineAction::RunSmoke { revision } => start_smoke(&client, ro, &ns, &revision).await?,
        }
    }

    // A taken-over Deployment goes to zero once the Rollout's stable pods are available.
    if let Some(d) = &takeover
        && stable_available
        && d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) > 0
    {
        let patch = json!({"metadata": {"annotations": {TAKEN_OVER_ANNOTATION: name}}, "spec": {"replicas": 0}});
        deployments
            .patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
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
    }

    let busy =
        matches!(st.phase, Phase::Progressing | Phase::Paused) || !served || takeover.is_some();
    Ok(Action::requeue(if busy {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(30)
    }))
}

/// Measurements finish on their own task; a weak handle keeps them from holding the
/// context alive after the controller stops.
struct MeasureSink(std::sync::Weak<Context>);

impl MeasureSink {
    fn push(&self, key: &str, m: Measurement) {
        if let Some(ctx) = self.0.upgrade() {
            ctx.push_measurement(key, m);
        }
    }
}

fn smoke_job_name(rollout: &str, revision: &str) -> String {
    format!("{rollout}-smoke-{revision}")
}

/// Smoke tests run in the cluster, as a Job that calls the preview Service.
async fn start_smoke(client: &Client, ro: &Rollout, ns: &str, revision: &str) -> Result<(), Error> {
    let Some(bg) = &ro.spec.strategy.blue_green else {
        return Ok(());
    };
    let name = smoke_job_name(&ro.name_any(), revision);
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    if jobs.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let host = bg
        .preview_service
        .clone()
        .unwrap_or_else(|| bg.active_service.clone());
    let script: Vec<String> = bg
        .smoke
        .iter()
        .map(|t| {
            let mut cmd = format!(
                "curl -sS -o /tmp/body -w '%{{http_code}}' -X {} http://{host}.{ns}.svc{}",
                t.method, t.path
            );
            for (k, v) in &t.headers {
                cmd.push_str(&format!(" -H '{k}: {v}'"));
            }
            if let Some(b) = &t.body {
                cmd.push_str(&format!(" --data '{}'", b.replace('\'', "'\\''")));
            }
            let mut check = format!("[ \"$({cmd})\" = \"{}\" ]", t.expect_status);
            if let Some(text) = &t.expect_body_contains {
                check.push_str(&format!(
                    " && grep -qF '{}' /tmp/body",
                    text.replace('\'', "'\\''")
                ));
            }
            check
        })
        .collect();
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {workload::ROLLOUT_LABEL: ro.name_any(), services::REVISION_LABEL: revision},
            "ownerReferences": [ro.controller_owner_ref(&())],
        },
        "spec": {
            "backoffLimit": 0, "ttlSecondsAfterFinished": 3600, "activeDeadlineSeconds": 300,
            "template": {"spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "smoke", "image": "curlimages/curl:8.11.1",
                    "command": ["sh", "-c", format!("set -e\n{}", script.join("\n"))],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false, "capabilities": {"drop": ["ALL"]}},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                }],
            }},
        },
    });
    let job: Job = serde_json::from_value(job)?;
    jobs.create(&PostParams::default(), &job).await?;
    Ok(())
}

/// A finished smoke Job's verdict, once.
async fn take_smoke(
    client: &Client,
    ns: &str,
    rollout: &str,
    prev: &Status,
) -> Result<Option<(String, bool, String)>, Error> {
    let Some(rev) = prev.canary.clone() else {
        return Ok(None);
    };
    if !matches!(prev.smoke, baton_engine::SmokeState::Running { .. }) {
        return Ok(None);
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let Some(job) = jobs.get_opt(&smoke_job_name(rollout, &rev)).await? else {
        return Ok(None);
    };
    let st = job.status.unwrap_or_default();
    if st.succeeded.unwrap_or(0) > 0 {
        return Ok(Some((rev, true, "smoke Job succeeded".into())));
    }
    if st.failed.unwrap_or(0) > 0 {
        let detail = format!(
            "smoke Job {} failed: see its logs",
            smoke_job_name(rollout, &rev)
        );
        return Ok(Some((rev, false, detail)));
    }
    Ok(None)
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
    let cache = kube::runtime::reflector(
        writer,
        watcher(
            rss.clone(),
            watcher::Config::default().labels(workload::ROLLOUT_LABEL),
        ),
    )
    .for_each(|_| async {});
    *ctx.replicasets.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader.clone());
    // A bounded number of reconciles at once: beyond the API server's parallelism more
    // only queue inside it, and a Rollout waits in the work queue instead.
    let controller = Controller::new(rollouts, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .owns(
            rss,
            watcher::Config::default().labels(workload::ROLLOUT_LABEL),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx2)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // Reconcile only once the cache holds what exists, or it would recreate it.
    let main = async move {
        let _ = reader.wait_until_ready().await;
        controller.await;
    };
    tokio::select! {
        _ = cache => {}
        _ = main => {}
    }
}

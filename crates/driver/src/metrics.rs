//! Rollout metrics, kept here once so `baton up` and the operator export the same
//! names: what each rollout is doing (phase, step, weights desired and served) and
//! what it did (gate verdicts, rollouts started, promoted, aborted, rolled back,
//! their durations and the time to roll back) — what the DORA keys are computed from.
//!
//! Counters move only on events the cycle persisted, so a cycle that failed to save
//! counts nothing (its events are produced again by the next one). Served weights and
//! the time to roll back wait for the router's confirmation: a weight no request
//! reaches is never reported served.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use baton_engine::{Cause, EventKind, Millis, Phase, Status, Verdict};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::Target;
use crate::event::{Event, Kind};

const PHASES: [Phase; 4] = [
    Phase::Progressing,
    Phase::Paused,
    Phase::Healthy,
    Phase::Degraded,
];

/// The rollout metrics of one controller (cheap to clone: one registry behind).
#[derive(Clone)]
pub struct RolloutMetrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    phase: IntGaugeVec,
    step: IntGaugeVec,
    step_started: GaugeVec,
    weight: IntGaugeVec,
    served: IntGaugeVec,
    verdicts: IntCounterVec,
    started: IntCounterVec,
    promoted: IntCounterVec,
    aborted: IntCounterVec,
    rolled_back: IntCounterVec,
    duration: HistogramVec,
    to_rollback: HistogramVec,
    tracked: Mutex<HashMap<String, Tracked>>,
}

/// What a rollout's series need remembered between cycles.
#[derive(Default)]
struct Tracked {
    /// `(revision, role)` of the desired-weight series set last, to remove the stale.
    weights: Vec<(String, String)>,
    /// Revisions of the served-weight series set last.
    served: Vec<String>,
    /// When the rolling-out revision first failed a gate.
    first_failure: Option<Millis>,
    /// A rollback decided: the route version that carries it, and the failure it
    /// answers. Observed once the router confirms that version.
    rollback: Option<(u64, Millis)>,
}

/// The labels every rollout series starts with: `namespace` is empty on one machine
/// (Prometheus reads an empty label as an absent one).
fn ids<'a>(t: &Target<'a>) -> [&'a str; 2] {
    match t.key.split_once('/') {
        Some((ns, _)) => [ns, t.name],
        None => ["", t.name],
    }
}

/// The same labels from a key alone (`name`, or `namespace/name`).
fn key_ids(key: &str) -> [&str; 2] {
    match key.split_once('/') {
        Some((ns, name)) => [ns, name],
        None => ["", key],
    }
}

fn reason(c: Cause) -> &'static str {
    match c {
        Cause::User => "user",
        Cause::Gate => "gate",
        Cause::Smoke => "smoke",
        Cause::Deadline => "deadline",
    }
}

fn result(v: Verdict) -> Option<&'static str> {
    match v {
        Verdict::Pass => Some("pass"),
        Verdict::Fail => Some("fail"),
        Verdict::Error => Some("error"),
        Verdict::Inconclusive => None,
    }
}

fn secs(ms: Millis) -> f64 {
    ms as f64 / 1000.0
}

/// A series as `(name, labels sorted)`, an empty label dropped (Prometheus reads one
/// as absent), so label order does not matter.
fn series_key(s: &str) -> (String, Vec<String>) {
    match s.split_once('{') {
        Some((name, rest)) => {
            let mut labels: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty() && !l.ends_with("=\"\""))
                .map(str::to_string)
                .collect();
            labels.sort();
            (name.to_string(), labels)
        }
        None => (s.to_string(), Vec::new()),
    }
}

/// The value of `series` (`name{label="value",...}`, labels in any order) in a scrape
/// in the text format: how tests and tools read a metric back. Label values holding
/// `,` or `}` are not told apart.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    let want = series_key(series);
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| series_key(s) == want)
        .and_then(|(_, v)| v.parse().ok())
}

impl Default for RolloutMetrics {
    fn default() -> Self {
        RolloutMetrics::new()
    }
}

impl RolloutMetrics {
    #[allow(clippy::too_many_lines)]
    pub fn new() -> RolloutMetrics {
        let id = ["namespace", "rollout"];
        // Names and help are constants: a failure here is a bug caught by every test.
        let gauge = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = id.iter().chain(extra).copied().collect();
            IntGaugeVec::new(Opts::new(name, help), &labels).expect("valid metric")
        };
        let counter = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = id.iter().chain(extra).copied().collect();
            IntCounterVec::new(Opts::new(name, help), &labels).expect("valid metric")
        };
        let histogram = |name: &str, help: &str, extra: &[&str], buckets: &[f64]| {
            let labels: Vec<&str> = id.iter().chain(extra).copied().collect();
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &labels,
            )
            .expect("valid metric")
        };
        let inner = Inner {
            registry: Registry::new(),
            phase: gauge(
                "baton_rollout_phase",
                "1 for the rollout's current phase, 0 for the others.",
                &["phase"],
            ),
            step: gauge(
                "baton_rollout_step",
                "Index of the rollout's current canary step (0 for other strategies).",
                &[],
            ),
            step_started: GaugeVec::new(
                Opts::new(
                    "baton_rollout_step_started_timestamp_seconds",
                    "When the rollout's current step started (Unix time).",
                ),
                &id,
            )
            .expect("valid metric"),
            weight: gauge(
                "baton_rollout_weight",
                "Traffic weight (percent) the rollout's status desires for a revision.",
                &["revision", "role"],
            ),
            served: gauge(
                "baton_rollout_served_weight",
                "Traffic weight (percent) the router confirmed serving for a revision.",
                &["revision"],
            ),
            verdicts: counter(
                "baton_gate_verdicts_total",
                "Gate measurements with a verdict, by gate and result (pass, fail, error).",
                &["gate", "result"],
            ),
            started: counter(
                "baton_rollouts_started_total",
                "New revisions that started rolling out (a rollout's first revision is not one).",
                &[],
            ),
            promoted: counter(
                "baton_rollouts_promoted_total",
                "Revisions promoted to stable.",
                &[],
            ),
            aborted: counter(
                "baton_rollouts_aborted_total",
                "Rollouts a person aborted, by reason (user).",
                &["reason"],
            ),
            rolled_back: counter(
                "baton_rollouts_rolled_back_total",
                "Rollouts Baton rolled back, by reason (gate, smoke, deadline).",
                &["reason"],
            ),
            duration: histogram(
                "baton_rollout_duration_seconds",
                "From a revision's creation to its end, by result (promoted, aborted, rolled_back).",
                &["result"],
                &[
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
                ],
            ),
            to_rollback: histogram(
                "baton_rollout_time_to_rollback_seconds",
                "Baton's rollbacks: from the rolling-out revision's first failed gate verdict (the abort decision when none failed: smoke, deadline) to the router confirming traffic back on stable.",
                &[],
                &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
            ),
            tracked: Mutex::new(HashMap::new()),
        };
        for c in [
            Box::new(inner.phase.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(inner.step.clone()),
            Box::new(inner.step_started.clone()),
            Box::new(inner.weight.clone()),
            Box::new(inner.served.clone()),
            Box::new(inner.verdicts.clone()),
            Box::new(inner.started.clone()),
            Box::new(inner.promoted.clone()),
            Box::new(inner.aborted.clone()),
            Box::new(inner.rolled_back.clone()),
            Box::new(inner.duration.clone()),
            Box::new(inner.to_rollback.clone()),
        ] {
            inner.registry.register(c).expect("distinct metric names");
        }
        RolloutMetrics(Arc::new(inner))
    }

    /// The metrics in Prometheus' text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into memory fails only on a malformed family, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.0.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// After a persisted step: the status' gauges, and the counters of its events and
    /// of the gate verdicts it consumed.
    pub(crate) fn stepped(
        &self,
        t: &Target<'_>,
        status: &Status,
        events: &[Event],
        verdicts: &[(String, String, Verdict)],
        now: Millis,
    ) {
        let m = &self.0;
        let [ns, name] = ids(t);
        // Counters start at 0 for every rollout, so `increase()` sees the first one.
        m.started.with_label_values(&[ns, name]);
        m.promoted.with_label_values(&[ns, name]);
        m.aborted
            .with_label_values(&[ns, name, reason(Cause::User)]);
        for c in [Cause::Gate, Cause::Smoke, Cause::Deadline] {
            m.rolled_back.with_label_values(&[ns, name, reason(c)]);
        }
        for p in PHASES {
            let on = i64::from(p == status.phase);
            m.phase.with_label_values(&[ns, name, p.as_str()]).set(on);
        }
        m.step
            .with_label_values(&[ns, name])
            .set(i64::try_from(status.step_index).unwrap_or(i64::MAX));
        m.step_started
            .with_label_values(&[ns, name])
            .set(secs(status.step_started_at));

        let mut tracked = m.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let tr = tracked.entry(t.key.to_string()).or_default();
        let weights: Vec<(String, String)> = status
            .weights
            .keys()
            .map(|rev| {
                let role = if status.stable.as_ref() == Some(rev) {
                    "stable"
                } else if status.canary.as_ref() == Some(rev) {
                    "canary"
                } else {
                    "previous"
                };
                (rev.clone(), role.to_string())
            })
            .collect();
        for (rev, role) in &tr.weights {
            if !weights.contains(&(rev.clone(), role.clone())) {
                let _ = m.weight.remove_label_values(&[ns, name, rev, role]);
            }
        }
        for (rev, role) in &weights {
            m.weight
                .with_label_values(&[ns, name, rev, role])
                .set(i64::from(status.weight(rev)));
        }
        tr.weights = weights;

        for (gate, revision, v) in verdicts {
            if let Some(r) = result(*v) {
                m.verdicts.with_label_values(&[ns, name, gate, r]).inc();
            }
            // The clock starts at the rolling-out revision's first failure only.
            let rolling_out = status.canary.as_ref() == Some(revision) && !status.aborted;
            if *v == Verdict::Fail && rolling_out && tr.first_failure.is_none() {
                tr.first_failure = Some(now);
            }
        }
        for e in events {
            let Kind::Engine(kind) = e.kind else {
                continue;
            };
            let lived = || {
                e.revision
                    .as_deref()
                    .and_then(|r| status.revision(r))
                    .map(|r| secs(e.at.saturating_sub(r.created_at)))
            };
            match kind {
                EventKind::NewRevision | EventKind::Retry => {
                    tr.first_failure = None;
                    if kind == EventKind::NewRevision {
                        m.started.with_label_values(&[ns, name]).inc();
                    }
                }
                EventKind::Promoted => {
                    tr.first_failure = None;
                    m.promoted.with_label_values(&[ns, name]).inc();
                    if let Some(s) = lived() {
                        m.duration
                            .with_label_values(&[ns, name, "promoted"])
                            .observe(s);
                    }
                }
                EventKind::Aborted(Cause::User) => {
                    // A person's abort is no rollback: not timed as one.
                    tr.first_failure = None;
                    m.aborted.with_label_values(&[ns, name, "user"]).inc();
                    if let Some(s) = lived() {
                        m.duration
                            .with_label_values(&[ns, name, "aborted"])
                            .observe(s);
                    }
                }
                EventKind::Aborted(cause) => {
                    m.rolled_back
                        .with_label_values(&[ns, name, reason(cause)])
                        .inc();
                    if let Some(s) = lived() {
                        m.duration
                            .with_label_values(&[ns, name, "rolled_back"])
                            .observe(s);
                    }
                    let since = tr.first_failure.take().unwrap_or(e.at);
                    tr.rollback = Some((status.route_version, since));
                }
                _ => {}
            }
        }
    }

    /// After acting: what the router confirms serving (`confirmed` is the highest route
    /// version it confirmed), and a rollback's time once its route is served.
    pub(crate) fn routed(&self, t: &Target<'_>, status: &Status, confirmed: u64, now: Millis) {
        let m = &self.0;
        let [ns, name] = ids(t);
        let mut tracked = m.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let tr = tracked.entry(t.key.to_string()).or_default();
        if confirmed >= status.route_version {
            let served: BTreeMap<&String, u32> =
                status.weights.iter().map(|(r, w)| (r, *w)).collect();
            for rev in &tr.served {
                if !served.contains_key(rev) {
                    let _ = m.served.remove_label_values(&[ns, name, rev]);
                }
            }
            for (rev, w) in &served {
                m.served
                    .with_label_values(&[ns, name, rev])
                    .set(i64::from(*w));
            }
            tr.served = served.into_keys().cloned().collect();
        }
        if let Some((version, since)) = tr.rollback
            && confirmed >= version
        {
            tr.rollback = None;
            m.to_rollback
                .with_label_values(&[ns, name])
                .observe(secs(now.saturating_sub(since)));
        }
    }

    /// Drops a deleted rollout's series (its counters too: a rollout made again under
    /// the same name starts from zero, as a restarted process would).
    pub fn forget(&self, key: &str) {
        let m = &self.0;
        let [ns, name] = key_ids(key);
        m.tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        // Every series of the rollout, as the registry has them, removed by full labels.
        for family in m.registry.gather() {
            for metric in family.get_metric() {
                let labels: HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if labels.get("namespace") != Some(&ns) || labels.get("rollout") != Some(&name) {
                    continue;
                }
                let _ = match family.name() {
                    "baton_rollout_phase" => m.phase.remove(&labels),
                    "baton_rollout_step" => m.step.remove(&labels),
                    "baton_rollout_step_started_timestamp_seconds" => {
                        m.step_started.remove(&labels)
                    }
                    "baton_rollout_weight" => m.weight.remove(&labels),
                    "baton_rollout_served_weight" => m.served.remove(&labels),
                    "baton_gate_verdicts_total" => m.verdicts.remove(&labels),
                    "baton_rollouts_started_total" => m.started.remove(&labels),
                    "baton_rollouts_promoted_total" => m.promoted.remove(&labels),
                    "baton_rollouts_aborted_total" => m.aborted.remove(&labels),
                    "baton_rollouts_rolled_back_total" => m.rolled_back.remove(&labels),
                    "baton_rollout_duration_seconds" => m.duration.remove(&labels),
                    "baton_rollout_time_to_rollback_seconds" => m.to_rollback.remove(&labels),
                    _ => Ok(()),
                };
            }
        }
    }
}

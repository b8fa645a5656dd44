//! The Rollout API (`apiVersion: baton.dev/v1alpha1`, `kind: Rollout`): types, parsing
//! and validation.
//!
//! Parsing goes YAML → JSON value, checked against the JSON Schema of these types so
//! that *every* type error is found with its field path
//! (`spec.strategy.canary.steps[2].setWeight`), → typed struct; then a semantic pass
//! collects every remaining problem instead of stopping at the first.

pub mod addr;
mod duration;
pub mod shape;
pub mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use duration::Duration;
pub use validate::validate;

/// What `mirrorMethods` means when empty: the methods that change nothing.
pub const SAFE_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];

pub const API_VERSION: &str = "baton.dev/v1alpha1";
pub const KIND: &str = "Rollout";

/// One problem in a spec, named by its field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FieldError {
    /// Where the problem is, e.g. `spec.traffic.listen`. Prefixed with the document
    /// (`documents[1].`) when a file holds several.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Every problem found in a spec source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s) in the spec:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct SpecErrors(pub Vec<FieldError>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: RolloutSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Instances per revision.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = crate::validate::MAX_REPLICAS))]
    pub replicas: u32,
    pub run: RunSpec,
    #[serde(default)]
    pub probes: Probes,
    #[serde(default)]
    pub shutdown: Shutdown,
    /// An instance must stay ready this long before it counts as available.
    #[serde(default)]
    #[schemars(range(max = crate::validate::MAX_DURATION_SECONDS))]
    pub min_ready_seconds: u64,
    /// A rollout that makes no progress for this long is aborted.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1, max = crate::validate::MAX_DURATION_SECONDS))]
    pub progress_deadline_seconds: u64,
    /// Old revisions remembered for `undo` and `history` (on a cluster, their
    /// ReplicaSets kept at zero), besides those running or in use; older ones are
    /// forgotten, so that a rollout's status does not grow with every deploy.
    #[serde(default = "default_history")]
    #[schemars(range(max = crate::validate::MAX_HISTORY))]
    pub revision_history_limit: u32,
    pub traffic: Traffic,
    pub strategy: Strategy,
    #[serde(default)]
    pub analysis: Analysis,
    #[serde(default)]
    pub rollback: Rollback,
    /// Webhooks told about the rollout's progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
}

fn one() -> u32 {
    1
}
fn default_progress_deadline() -> u64 {
    600
}
fn default_history() -> u32 {
    3
}

/// How to start one instance. Any change here makes a new revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunSpec {
    /// Program and arguments; `{port}` is replaced by the instance's port (also in `env`
    /// values). The port is in `PORT` too.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

impl RunSpec {
    /// Stable identity of this run spec: the first 10 hex digits of the SHA-256 of its
    /// canonical JSON (env is a sorted map, so the encoding is deterministic).
    pub fn revision_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
    }

    /// The `APP_VERSION` the revision advertises, if any: a human label, not an identity.
    pub fn app_version(&self) -> Option<&str> {
        self.env.get("APP_VERSION").map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    pub http_get: HttpGet,
    #[serde(default = "default_period")]
    #[schemars(range(min = 0.05, max = 3600.0))]
    pub period_seconds: f64,
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 0.05, max = 3600.0))]
    pub timeout_seconds: f64,
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = crate::validate::MAX_COUNT))]
    pub failure_threshold: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = crate::validate::MAX_COUNT))]
    pub success_threshold: u32,
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 3600.0))]
    pub initial_delay_seconds: f64,
}

fn default_period() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    1.0
}
fn default_failure_threshold() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Shutdown {
    /// Time between leaving routing and SIGTERM, so that no request is in flight towards
    /// an instance that is about to stop.
    #[serde(default = "default_pre_stop")]
    #[schemars(range(min = 0.0, max = 3600.0))]
    pub pre_stop_seconds: f64,
    /// Time after SIGTERM before SIGKILL.
    #[serde(default = "default_drain")]
    #[schemars(range(min = 0.0, max = 3600.0))]
    pub drain_timeout_seconds: f64,
}

fn default_pre_stop() -> f64 {
    1.0
}
fn default_drain() -> f64 {
    30.0
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            pre_stop_seconds: default_pre_stop(),
            drain_timeout_seconds: default_drain(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Traffic {
    /// Where the proxy listens for this rollout's users, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// Keep each client on one revision while weights change: requests carrying the
    /// same header value (or cookie) hash to the same place, and a growing canary
    /// only takes clients over, never hands them back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stickiness: Option<Stickiness>,
    /// Requests with this header and value go to the canary whatever its weight
    /// (while it has ready instances): for testers, before users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_header: Option<HeaderMatch>,
    /// An idempotent request that the canary answers with a 5xx (or cannot answer) is
    /// sent once more to stable, so users see stable's answer while the analysis
    /// still counts the canary's failure.
    #[serde(default)]
    pub shield_canary: bool,
    /// Copy this share (0-100) of the requests that stable serves with a method of
    /// `mirrorMethods` to the canary too, answers discarded: the canary meets real
    /// traffic (and its gates measure it) before any user sees its answers.
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub mirror_percent: u32,
    /// The methods `mirrorPercent` copies; empty (the default) is the safe ones: GET,
    /// HEAD and OPTIONS. A copied PUT or DELETE runs twice against shared data, so
    /// list a method only when the canary's writes cannot reach stable's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_methods: Vec<String>,
    /// Serve the listener over TLS (rustls), offering HTTP/2 and HTTP/1.1 by ALPN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// How the proxy speaks to the instances: `http1` (the default) or `h2c`, HTTP/2
    /// by prior knowledge, for gRPC services and other HTTP/2-only servers (trailers
    /// pass through, gRPC answers count by their `grpc-status`). Clients may use
    /// HTTP/1.1 or HTTP/2 whichever this is.
    #[serde(default, skip_serializing_if = "BackendProtocol::is_http1")]
    pub backend_protocol: BackendProtocol,
}

/// `traffic.backendProtocol`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Http1,
    H2c,
}

impl BackendProtocol {
    pub fn is_http1(&self) -> bool {
        *self == BackendProtocol::Http1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stickiness {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Strategy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<Rolling>,
}

/// The strategy in force, once validation made sure exactly one is set.
#[derive(Debug, Clone, Copy)]
pub enum StrategyRef<'a> {
    Canary(&'a Canary),
    BlueGreen(&'a BlueGreen),
    Rolling(&'a Rolling),
}

impl Strategy {
    pub fn kind(&self) -> StrategyRef<'_> {
        match (&self.canary, &self.blue_green, &self.rolling) {
            (Some(c), _, _) => StrategyRef::Canary(c),
            (None, Some(b), _) => StrategyRef::BlueGreen(b),
            (None, None, Some(r)) => StrategyRef::Rolling(r),
            (None, None, None) => StrategyRef::Rolling(&DEFAULT_ROLLING),
        }
    }
}

static DEFAULT_ROLLING: Rolling = Rolling {
    max_surge: 1,
    max_unavailable: 0,
};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Shorthand for `steps`: expanded into them when the spec is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressive: Option<Progressive>,
    /// Keep the previous stable revision running this long after a promotion; going
    /// back to it meanwhile (`baton undo`, or its spec re-applied) skips the steps and
    /// is an instant switch to its warm instances, as with blue-green.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_previous: Option<Duration>,
}

/// Weights from `start`, multiplied by `factor` at each step while below 100, each
/// held `every` and then judged by `gates`: `progressive: { start: 2, factor: 2,
/// every: 90s }` is 2, 4, 8, 16, 32, 64 %, then full promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Progressive {
    /// The first weight, 1-99.
    #[schemars(range(min = 1, max = 99))]
    pub start: u32,
    /// What each weight is multiplied by (above 1; rounded, and always at least +1).
    pub factor: f64,
    /// How long each weight is held before its analysis.
    pub every: Duration,
    /// Gates judged after each hold; all of `spec.analysis.gates` when left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<String>,
}

impl Rollout {
    /// Replaces the canary's `progressive` by the steps it stands for, judged by every
    /// gate when it names none. Only for a validated spec (on one machine as it is read;
    /// on a cluster once the operator has checked it).
    pub fn expand_shorthands(&mut self) {
        let gates: Vec<String> = self
            .spec
            .analysis
            .gates
            .iter()
            .map(|g| g.name.clone())
            .collect();
        if let Some(c) = self.spec.strategy.canary.as_mut() {
            c.expand(&gates);
        }
    }
}

impl Canary {
    /// Replaces `progressive` by the steps it stands for (`all_gates` when it names
    /// none). Only for a validated spec: a factor above 1 is what makes it end.
    pub fn expand(&mut self, all_gates: &[String]) {
        let Some(p) = self.progressive.take() else {
            return;
        };
        let gates = if p.gates.is_empty() {
            all_gates.to_vec()
        } else {
            p.gates
        };
        let mut w = p.start;
        while w < 100 {
            self.steps.push(Step::SetWeight(w));
            self.steps.push(Step::Pause(Pause {
                duration: Some(p.every),
            }));
            if !gates.is_empty() {
                self.steps.push(Step::Analysis(AnalysisStep {
                    gates: gates.clone(),
                }));
            }
            w = ((f64::from(w) * p.factor).round() as u32).max(w + 1);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Step {
    /// Send this share (0-100) of traffic to the canary.
    SetWeight(#[schemars(range(max = 100))] u32),
    /// Wait for a duration, or until promoted when no duration is given.
    Pause(Pause),
    /// Wait until the named gates have each passed `count` measurements in this step.
    Analysis(AnalysisStep),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pause {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalysisStep {
    pub gates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlueGreen {
    /// A second listener that routes only to the new revision, for smoke tests and humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_listen: Option<String>,
    /// Switch as soon as the new stack is available and its smoke tests pass; otherwise
    /// wait for `baton promote`.
    #[serde(default = "yes")]
    pub auto_promote: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smoke: Vec<SmokeTest>,
    /// How long the previous stack keeps running after the switch, so that a rollback is
    /// a switch back rather than a redeploy.
    #[serde(default = "default_retain")]
    pub retain_previous: Duration,
    /// Keep judging the new stack with the gates for this long after the switch, while
    /// the previous one is retained; a failure switches traffic back to it at once.
    /// No longer than `retainPrevious`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_promotion_analysis: Option<Duration>,
}

fn yes() -> bool {
    true
}
fn default_retain() -> Duration {
    Duration::from_secs(3600)
}

/// One HTTP check run against the preview revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmokeTest {
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default = "default_status")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: u16,
    /// The response body must contain this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_body_contains: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_status() -> u16 {
    200
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rolling {
    /// Instances above `replicas` that may exist during the roll.
    #[serde(default = "one")]
    #[schemars(range(max = crate::validate::MAX_REPLICAS))]
    pub max_surge: u32,
    /// Instances below `replicas` that may be unavailable during the roll.
    #[serde(default)]
    #[schemars(range(max = crate::validate::MAX_REPLICAS))]
    pub max_unavailable: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    #[serde(default)]
    pub gates: Vec<Gate>,
    /// Gates (by name) run once the new revision's instances are ready and before it
    /// gets any traffic — an image-signature check, an expand-phase migration. Each must
    /// pass once; a failure aborts the revision before it serves a request. They are not
    /// measured again while it has traffic. Not builtin or scorecard gates: there are no
    /// requests yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_traffic: Vec<String>,
}

/// An SLO gate. Every gate is measured on the canary in the background while it has
/// traffic; an `analysis` step also waits for the gates it names to pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gate {
    pub name: String,
    pub metric: MetricSource,
    /// Expression over `result` that must hold, e.g. `result < 0.800`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_condition: Option<String>,
    /// Expression over `result` that marks a failure even if the success condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_condition: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// Failed measurements tolerated; one more aborts the rollout.
    #[serde(default)]
    #[schemars(range(max = crate::validate::MAX_COUNT))]
    pub failure_limit: u32,
    /// Passing measurements an `analysis` step needs from this gate.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = crate::validate::MAX_COUNT))]
    pub count: u32,
    /// Requests a measurement window must hold to be judged; a smaller window grows
    /// until it does, so a handful of slow requests cannot fail a version.
    #[serde(default = "default_min_requests")]
    #[schemars(range(max = crate::validate::MAX_MIN_REQUESTS))]
    pub min_requests: u64,
    /// Wait this long after the canary first gets traffic before the first measurement.
    #[serde(default)]
    pub initial_delay: Duration,
    /// A failure counts only once the gate has failed without a pass in between for
    /// this long (as a Prometheus alert rule's `for`): a blip does not roll back.
    /// Failing measurements before then are recorded as inconclusive.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub for_duration: Option<Duration>,
    /// Inconclusive measurements tolerated; one more pauses the rollout for a human.
    /// No limit when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = crate::validate::MAX_COUNT))]
    pub inconclusive_limit: Option<u32>,
    /// Measurements in a row that could not be taken (the provider failed: Prometheus
    /// down, a bad query); one more fails the gate. A provider error is not a failed
    /// metric.
    #[serde(default = "default_consecutive_error_limit")]
    #[schemars(range(max = crate::validate::MAX_COUNT))]
    pub consecutive_error_limit: u32,
    /// Measure and record, never act: for trying a new query before trusting it.
    #[serde(default)]
    pub dry_run: bool,
    /// What a failure of this gate does; `rollback.onFailure` decides when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// Judge the canary against the stable revision over the same window instead of
    /// (or as well as) against fixed conditions. Built-in metrics only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Compare>,
    /// Judge the canary against stable with statistics over the same window: a
    /// Mann-Whitney test for a shift, a bootstrap interval on the tail quantile for a
    /// change of shape, Fisher's exact test for error counts. Built-in metrics only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistical: Option<Statistical>,
    /// Error-budget burn rate over the canary's errors (builtin `error_rate` only), as
    /// in the SRE workbook's multi-window, multi-burn-rate alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burn_rate: Option<BurnRate>,
    /// `continuous` (the default): a builtin `error_rate` gate's conditions and
    /// `compare.maxIncreasePercent` are also tested sequentially as requests arrive, and
    /// a failure is acted on the moment the evidence is strong enough; `interval` still
    /// records a verdict at least that often. `interval`: judged at the interval only.
    #[serde(default, skip_serializing_if = "Judging::is_default")]
    pub judging: Judging,
    /// How sure the sequential test must be before it fails the canary: an unchanged
    /// version is failed by this gate with a chance of at most `1 - confidence`, however
    /// long it runs and however often it is looked at.
    #[serde(
        default = "default_confidence",
        skip_serializing_if = "is_default_confidence"
    )]
    pub confidence: f64,
}

impl Gate {
    /// A gate with every field at the default a spec that leaves it out gets.
    pub fn new(name: &str, metric: MetricSource) -> Gate {
        Gate {
            name: name.to_string(),
            metric,
            success_condition: None,
            failure_condition: None,
            interval: default_interval(),
            failure_limit: 0,
            count: one(),
            min_requests: default_min_requests(),
            initial_delay: Duration::default(),
            for_duration: None,
            inconclusive_limit: None,
            consecutive_error_limit: default_consecutive_error_limit(),
            dry_run: false,
            on_failure: None,
            compare: None,
            statistical: None,
            burn_rate: None,
            judging: Judging::default(),
            confidence: default_confidence(),
        }
    }
}

/// When a builtin gate is judged.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Judging {
    /// As evidence arrives (a sequential test), and a verdict at least every `interval`.
    #[default]
    Continuous,
    /// Only every `interval`, on a window of at least `minRequests`.
    Interval,
}

impl Judging {
    fn is_default(&self) -> bool {
        *self == Judging::Continuous
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_default_confidence(c: &f64) -> bool {
    *c == default_confidence()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BurnRate {
    /// The availability objective, e.g. `0.999`: the error budget is `1 - slo`.
    pub slo: f64,
    /// The gate fails when, for any pair, the budget burns faster than `factor` over
    /// both the long and the short window. Windows longer than the canary has run
    /// cover what there is.
    #[serde(default = "default_burn_windows")]
    pub windows: Vec<BurnWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BurnWindow {
    pub long: Duration,
    pub short: Duration,
    pub factor: f64,
}

fn default_burn_windows() -> Vec<BurnWindow> {
    vec![
        BurnWindow {
            long: Duration::from_secs(3600),
            short: Duration::from_secs(300),
            factor: 14.4,
        },
        BurnWindow {
            long: Duration::from_secs(6 * 3600),
            short: Duration::from_secs(1800),
            factor: 6.0,
        },
    ]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Statistical {
    /// How sure a test must be before it calls the canary worse.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// The smallest worsening that matters, as a share of stable's value.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Which way is worse: `increase` (latency, errors; the default), `decrease`, or
    /// `either`.
    #[serde(default)]
    pub direction: Direction,
    /// For a `scorecard`: the share (0-100) of metrics that must pass to pass...
    #[serde(default = "default_pass_score")]
    pub pass_score: f64,
    /// ... and below which the canary fails; in between it is inconclusive.
    #[serde(default = "default_marginal_score")]
    pub marginal_score: f64,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    #[default]
    Increase,
    Decrease,
    Either,
}

fn default_pass_score() -> f64 {
    95.0
}
fn default_marginal_score() -> f64 {
    75.0
}

fn default_confidence() -> f64 {
    0.99
}
fn default_tolerance() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    Rollback,
    Pause,
}

/// The canary passes when its value is within the allowance over stable's:
/// `canary <= stable * (1 + maxIncreasePercent / 100)` or
/// `canary <= stable + maxIncrease` (either allowance suffices when both are set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Compare {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_increase_percent: Option<f64>,
    /// In the metric's own unit: seconds for latency, a 0-1 share for error rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_increase: Option<f64>,
}

fn default_consecutive_error_limit() -> u32 {
    4
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_min_requests() -> u64 {
    20
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum MetricSource {
    /// Measured by the built-in proxy per revision, with no scrape delay.
    Builtin(BuiltinMetric),
    /// An instant PromQL query; `{{service}}`, `{{revision}}` and `{{stable}}` are
    /// replaced by the rollout's name and the canary's and stable's revision names.
    Prometheus(PrometheusMetric),
    /// An HTTP GET whose JSON answer holds the value at `jsonPath`.
    Web(WebMetric),
    /// A command whose exit status is the result (0 passes by default); the local twin
    /// of a Kubernetes Job.
    Command(CommandMetric),
    /// HTTP checks against a ready instance of the canary only; passes when all pass.
    Smoke(Vec<SmokeTest>),
    /// Several builtin metrics judged together against stable, Kayenta-style: each is
    /// classified Pass/High/Low/NoData and the share that pass is scored. Needs
    /// `statistical`.
    Scorecard(Vec<BuiltinMetric>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusMetric {
    /// E.g. `http://127.0.0.1:9090`.
    pub address: String,
    pub query: String,
    #[serde(default = "default_provider_timeout")]
    pub timeout: Duration,
}

/// Where builtin gates read each revision's requests when Baton's proxy does not carry
/// them (a cluster): a Prometheus holding the traffic router's metrics, and the
/// queries that select one revision's. Kubernetes only (`spec.analysis.requestMetrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMetrics {
    /// The Prometheus, e.g. `http://prometheus.monitoring:9090`.
    pub address: String,
    /// Whose metrics: `istio` (Istio's standard metrics), `contour` (Envoy's cluster
    /// stats as Contour names them), or `custom` (`requests` and `latency` given here).
    /// Default: `istio` with `trafficRouting.istio`, `contour` with `trafficRouting.gatewayAPI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<RequestTemplate>,
    /// `custom` only. PromQL: one revision's answers so far (a counter), one series per
    /// status code, the code in label `codeLabel`. `{{namespace}}`, `{{service}}` (the
    /// Rollout), `{{revision}}` and `{{backend}}` (the Service carrying that revision's
    /// traffic) are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
    /// `custom` only: the label of `requests` holding the status code. Default `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_label: Option<String>,
    /// `custom` only. PromQL: one revision's latency histogram so far, one series per
    /// bucket (label `le`, cumulative, as Prometheus histograms are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    /// `custom` only: the unit of `latency`'s `le` bounds. Default `seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_unit: Option<LatencyUnit>,
    #[serde(default = "default_provider_timeout")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RequestTemplate {
    Istio,
    Contour,
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LatencyUnit {
    Seconds,
    Milliseconds,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebMetric {
    /// `{{service}}`, `{{revision}}`, `{{stable}}` are replaced as in Prometheus queries.
    pub url: String,
    /// Dotted path to a number in the JSON answer, e.g. `data.p99` or `items.0.value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_path: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_provider_timeout")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandMetric {
    /// Program and arguments. It gets `BATON_SERVICE`, `BATON_REVISION`,
    /// `BATON_STABLE` and `BATON_ADDRESS` (a ready instance of the canary).
    pub command: Vec<String>,
    #[serde(default = "default_command_timeout")]
    pub timeout: Duration,
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinMetric {
    /// Share (0-1) of responses that were 5xx or failed to reach an instance.
    ErrorRate,
    LatencyP50,
    LatencyP90,
    LatencyP99,
}

impl BuiltinMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinMetric::ErrorRate => "error_rate",
            BuiltinMetric::LatencyP50 => "latency_p50",
            BuiltinMetric::LatencyP90 => "latency_p90",
            BuiltinMetric::LatencyP99 => "latency_p99",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollback {
    /// Abort and return all traffic to stable when a gate fails or the progress deadline
    /// passes. When false, the rollout pauses instead and waits for a human.
    #[serde(default = "yes")]
    pub on_failure: bool,
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback { on_failure: true }
    }
}

/// A webhook told when a rollout starts, pauses, passes a step, is promoted, aborted
/// or rolled back. A failed delivery is retried and never holds up the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Notification {
    /// How logs and the audit trail name this webhook (they never show its URL's path
    /// or its headers, which may hold secrets).
    #[serde(default = "default_notification_name")]
    pub name: String,
    /// `http(s)://...`. `${NAME}` is replaced from the controller's environment when
    /// sending, so secrets need not be in the spec.
    pub url: String,
    #[serde(default)]
    pub format: NotificationFormat,
    /// Extra request headers; values may use `${NAME}` too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Which events to send; all when left out.
    #[serde(default = "all_events")]
    pub events: Vec<NotificationEvent>,
}

fn default_notification_name() -> String {
    "webhook".into()
}

fn all_events() -> Vec<NotificationEvent> {
    vec![
        NotificationEvent::Started,
        NotificationEvent::Paused,
        NotificationEvent::StepPassed,
        NotificationEvent::Promoted,
        NotificationEvent::Aborted,
        NotificationEvent::RolledBack,
    ]
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NotificationFormat {
    /// `{"rollout", "event", "revision", "appVersion", "phase", "reason", "at"}`.
    #[default]
    Json,
    /// `{"text": "..."}`, as Slack's incoming webhooks (and Mattermost's) take it.
    Slack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NotificationEvent {
    Started,
    Paused,
    StepPassed,
    Promoted,
    /// Aborted by a person.
    Aborted,
    /// Aborted by Baton itself: a failed gate, smoke test or progress deadline.
    RolledBack,
}

impl NotificationEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationEvent::Started => "started",
            NotificationEvent::Paused => "paused",
            NotificationEvent::StepPassed => "stepPassed",
            NotificationEvent::Promoted => "promoted",
            NotificationEvent::Aborted => "aborted",
            NotificationEvent::RolledBack => "rolledBack",
        }
    }
}

/// Parses one or more `---`-separated Rollout documents and validates each; returns
/// every problem found, prefixed with the document index when there are several.
pub fn parse(text: &str) -> Result<Vec<Rollout>, SpecErrors> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        SpecErrors(vec![FieldError {
            field: "(yaml)".into(),
            reason: first_line(&e.to_string()),
        }])
    })?;
    if docs.is_empty() {
        return Err(SpecErrors(vec![FieldError {
            field: "(document)".into(),
            reason: "no Rollout found: the input is empty".into(),
        }]));
    }
    let many = docs.len() > 1;
    let prefix = |i: usize, field: &str| {
        if many {
            format!("documents[{i}].{field}")
        } else {
            field.to_string()
        }
    };
    let mut errors = Vec::new();
    let mut rollouts = Vec::new();
    let schema = rollout_shape();
    for (i, doc) in docs.into_iter().enumerate() {
        let shape = schema.as_ref().map(|s| s.errors(&doc)).unwrap_or_default();
        let typed = match serde_path_to_error::deserialize::<_, Rollout>(doc) {
            Ok(mut r) => {
                let found = validate(&r);
                if found.is_empty() && shape.is_empty() {
                    r.expand_shorthands();
                }
                rollouts.push(r);
                Ok(found)
            }
            Err(e) => Err(serde_error(e)),
        };
        for e in shape::combine(shape, typed) {
            errors.push(FieldError {
                field: prefix(i, &e.field),
                reason: e.reason,
            });
        }
    }
    validate::across(&rollouts, &mut errors, many);
    if errors.is_empty() {
        Ok(rollouts)
    } else {
        Err(SpecErrors(errors))
    }
}

/// The Rollout's schema, compiled for each parse and dropped after it. Kept for the
/// process's life it was 1.34 MB of `baton up`'s 3 MB live heap, for a parse per
/// apply; compiling it costs some 10 ms of CPU (a release `baton validate` takes
/// 19 ms against 5 ms for `--version`). It failing to compile is a bug (a test says
/// it does not); parsing then falls back to serde's first error.
fn rollout_shape() -> Result<shape::Shape, String> {
    shape::Shape::of::<Rollout>()
}

/// serde's error with its field path (`(document)` for the top level).
pub fn serde_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    FieldError {
        field: if path == "." {
            "(document)".into()
        } else {
            path
        },
        reason: e.into_inner().to_string(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests;

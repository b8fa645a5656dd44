//! The `Rollout`, `GateTemplate` and `ClusterGateTemplate` resources (group
//! `baton.dev`, version `v1alpha1`). Strategy steps, gates and smoke tests are the
//! local spec's own types, so a gate means the same thing on one machine and in a
//! cluster; what differs is the workload (a pod template instead of a command) and
//! the traffic (Services, Gateway API or Istio instead of the built-in proxy).

use std::collections::BTreeMap;

use baton_spec::{Duration, Gate, Rollback, Rolling, SmokeTest, Step};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A progressive rollout of a pod template: canary, blue-green or rolling, gated by
/// analysis, rolled back on failure.
// The lint mistakes the repeated `printcolumn(type_ = ...)` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baton.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "brl",
    category = "baton",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableVersion"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canaryVersion"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.canaryWeight"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.template) != has(self.workloadRef)").message("set exactly one of spec.template and spec.workloadRef"))]
#[x_kube(validation = Rule::new("(has(self.strategy.canary) ? 1 : 0) + (has(self.strategy.blueGreen) ? 1 : 0) + (has(self.strategy.rolling) ? 1 : 0) <= 1").message("set at most one of strategy.canary, strategy.blueGreen and strategy.rolling"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Pods per revision.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = baton_spec::validate::MAX_REPLICAS))]
    pub replicas: i32,
    /// Selects the rollout's pods (all revisions); the template's labels must match it.
    /// With `workloadRef` it may be left out: the Deployment's is used.
    #[serde(default)]
    pub selector: LabelSelector,
    /// The pods to roll out; a change here is a new revision. (Its schema is left to
    /// the ReplicaSets that carry it, as Argo Rollouts does, to keep the CRD small
    /// enough for client-side apply.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque")]
    pub template: Option<PodTemplateSpec>,
    /// Or: an existing Deployment whose template to roll out. Baton takes it over and
    /// scales it to zero only once the Rollout's own pods are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_ref: Option<WorkloadRef>,
    /// Ready this long before a pod counts as available; at most 30 days.
    #[serde(default)]
    #[schemars(range(min = 0, max = baton_spec::validate::MAX_DURATION_SECONDS))]
    pub min_ready_seconds: i64,
    /// No progress this long (outside pauses) fails the rollout; at most 30 days.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1, max = baton_spec::validate::MAX_DURATION_SECONDS))]
    pub progress_deadline_seconds: i64,
    /// Old ReplicaSets kept (scaled to zero) for `undo`.
    #[serde(default = "default_history")]
    #[schemars(range(min = 0, max = crate::engine_spec::MAX_HISTORY))]
    pub revision_history_limit: i32,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub analysis: Analysis,
    #[serde(default)]
    pub rollback: Rollback,
    /// Webhooks told of the rollout's events, as on one machine; `${NAME}` in a URL or
    /// header comes from the operator's environment (fill it from a Secret in the
    /// operator's Deployment, never inline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<baton_spec::Notification>,
    /// How `command` gates run: as Jobs in the Rollout's namespace, never in the
    /// operator's pod nor with its service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Jobs>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jobs {
    /// The image holding the gates' commands (a command gate's `command` is the
    /// container's command, passed as data: no shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Jobs' service account: one the operator's `--job-service-accounts` allows.
    /// Default: the namespace's `default`, with no token mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

fn one() -> i32 {
    1
}
fn default_progress_deadline() -> i64 {
    600
}
fn default_history() -> i32 {
    3
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadRef {
    #[serde(default = "apps_v1")]
    pub api_version: String,
    #[serde(default = "deployment")]
    pub kind: String,
    pub name: String,
}

fn apps_v1() -> String {
    "apps/v1".into()
}
fn deployment() -> String {
    "Deployment".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Strategy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<Rolling>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Shorthand for `steps`, as on one machine: `{ start: 2, factor: 2, every: 90s }`
    /// is 2, 4, 8, 16, 32, 64 %, each held 90 s and then judged by the gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressive: Option<baton_spec::Progressive>,
    /// Keep the previous stable ReplicaSet scaled up this long after a promotion; going
    /// back to it meanwhile skips the steps: an instant switch to its ready pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_previous: Option<Duration>,
    /// A Service whose selector Baton pins to the stable revision's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_service: Option<String>,
    /// A Service whose selector Baton pins to the canary's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_service: Option<String>,
    /// Without it, a step's weight is the canary's share of pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<TrafficRouting>,
    /// Requests with this header (exact value) go to the canary at any weight while a
    /// canary is in flight (Gateway API and Istio routers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_header: Option<baton_spec::HeaderMatch>,
    /// Percent of requests with one of `mirrorMethods` also copied to the canary while
    /// one is in flight, answers discarded (Gateway API's RequestMirror filter, Istio's
    /// mirror), as `traffic.mirrorPercent` on one machine.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 100))]
    pub mirror_percent: u32,
    /// The methods mirrored; empty (the default) is the safe ones: GET, HEAD, OPTIONS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_methods: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficRouting {
    /// Weights on an HTTPRoute's backendRefs to the stable and canary Services.
    #[serde(
        default,
        rename = "gatewayAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApi>,
    /// Weights on a VirtualService's routes to the stable and canary Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<Istio>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayApi {
    pub http_route: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Istio {
    pub virtual_service: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlueGreen {
    /// The Service users reach: Baton points its selector at the active revision.
    pub active_service: String,
    /// A Service pointed at the new revision before the switch, for smoke tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_service: Option<String>,
    #[serde(default = "yes")]
    pub auto_promote: bool,
    /// HTTP checks against the preview Service, run as a Job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smoke: Vec<SmokeTest>,
    #[serde(default = "default_retain")]
    pub retain_previous: Duration,
    /// Keep judging the new active revision with the gates for this long after the
    /// switch, while the previous ReplicaSet is retained; a failure points the active
    /// Service back at it. No longer than `retainPrevious`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_promotion_analysis: Option<Duration>,
}

fn yes() -> bool {
    true
}
fn default_retain() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    #[serde(default)]
    pub gates: Vec<Gate>,
    /// Gates (by name, from `gates` or the templates) run as Jobs once the new
    /// revision's pods are ready and before it gets any traffic; each must pass once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_traffic: Vec<String>,
    /// Shared gates from GateTemplates (or ClusterGateTemplates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateRef>,
    /// Where builtin and scorecard gates read each revision's requests: the traffic
    /// router's metrics in Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_metrics: Option<baton_spec::RequestMetrics>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateRef {
    pub name: String,
    /// A ClusterGateTemplate rather than a GateTemplate in the Rollout's namespace.
    #[serde(default)]
    pub cluster_scope: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_version: Option<String>,
    #[serde(default)]
    pub canary_weight: i32,
    /// Pods of every revision (for the scale subresource and HPAs).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// The label selector of the pods, as a string (for the scale subresource).
    #[serde(default)]
    pub selector: String,
    /// The route version the traffic router has been seen to serve.
    #[serde(default)]
    pub route_acked: u64,
    /// The id of the last request (annotation `baton.dev/request`) acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The engine's own state, opaque to everyone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque")]
    pub engine: Option<serde_json::Value>,
}

fn opaque(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Gates shared by the Rollouts of one namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "baton.dev",
    version = "v1alpha1",
    kind = "GateTemplate",
    namespaced,
    category = "baton"
)]
pub struct GateTemplateSpec {
    pub gates: Vec<Gate>,
}

/// Gates shared by every namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "baton.dev",
    version = "v1alpha1",
    kind = "ClusterGateTemplate",
    category = "baton"
)]
pub struct ClusterGateTemplateSpec {
    pub gates: Vec<Gate>,
}

/// The three CRDs as one multi-document YAML, as checked in under `deploy/crds/`.
pub fn crds() -> BTreeMap<&'static str, String> {
    let yaml = |v: serde_json::Value| {
        format!(
            "# Generated from crates/k8s/src/crd.rs by `baton crd --write deploy/crds`: do not edit.\n{}",
            serde_saphyr::to_string(&v).unwrap_or_default()
        )
    };
    let mut out = BTreeMap::new();
    for (file, crd) in [
        (
            "rollouts.baton.dev.yaml",
            serde_json::to_value(Rollout::crd()),
        ),
        (
            "gatetemplates.baton.dev.yaml",
            serde_json::to_value(GateTemplate::crd()),
        ),
        (
            "clustergatetemplates.baton.dev.yaml",
            serde_json::to_value(ClusterGateTemplate::crd()),
        ),
    ] {
        out.insert(file, yaml(crd.unwrap_or_default()));
    }
    out
}

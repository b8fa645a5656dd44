//! Builtin gates on a cluster: each revision's requests read from the traffic router's
//! metrics in Prometheus (`spec.analysis.requestMetrics`), through the template the
//! router implies, into the same counters Baton's proxy gives on one machine, so the
//! same judges (thresholds, `compare`, `statistical`, scorecards, burn rates) and the
//! same `minRequests` guard decide.

use std::collections::BTreeMap;

use baton_analysis::mesh::{self, MeshVars, Queries};
use baton_driver::Counters;
use baton_spec::{FieldError, MetricSource, RequestTemplate};
use kube::ResourceExt;

use crate::crd::Rollout;
use crate::workload::ISTIO_NAME_LABEL;

/// The template the Rollout's traffic router implies.
pub fn router_template(ro: &Rollout) -> Option<RequestTemplate> {
    let routing = ro.spec.strategy.canary.as_ref()?.traffic_routing.as_ref()?;
    if routing.istio.is_some() {
        Some(RequestTemplate::Istio)
    } else if routing.gateway_api.is_some() {
        Some(RequestTemplate::Contour)
    } else {
        None
    }
}

/// The Service carrying `revision`'s traffic: the canary (or preview) Service for the
/// revision being measured, the stable (or active) one for the others.
fn backend(ro: &Rollout, revision: &str, measured: &str) -> String {
    let s = &ro.spec.strategy;
    let canary = revision == measured;
    if let Some(c) = &s.canary {
        let svc = if canary {
            &c.canary_service
        } else {
            &c.stable_service
        };
        return svc.clone().unwrap_or_default();
    }
    if let Some(b) = &s.blue_green {
        return if canary {
            b.preview_service.clone().unwrap_or_default()
        } else {
            b.active_service.clone()
        };
    }
    String::new()
}

/// The counters of `revisions` (the measured one first), or why there are none.
pub async fn counters(ro: &Rollout, revisions: &[&str]) -> Counters {
    let Some(m) = &ro.spec.analysis.request_metrics else {
        return Counters::Unsupported(
            "builtin gates on a cluster read the traffic router's metrics: set spec.analysis.requestMetrics".into(),
        );
    };
    let queries = match Queries::of(m, router_template(ro)) {
        Ok(q) => q,
        Err((field, why)) => {
            return Counters::Unsupported(format!("spec.analysis.requestMetrics.{field}: {why}"));
        }
    };
    let Some(measured) = revisions.first() else {
        return Counters::Read(BTreeMap::new());
    };
    // As `workload::new_replicaset` labels the pods.
    let canonical_service = ro
        .spec
        .template
        .as_ref()
        .and_then(|t| {
            t.metadata
                .as_ref()?
                .labels
                .as_ref()?
                .get(ISTIO_NAME_LABEL)
                .cloned()
        })
        .unwrap_or_else(|| ro.name_any());
    let reads = revisions.iter().map(|rev| {
        let vars = MeshVars {
            namespace: ro.namespace().unwrap_or_else(|| "default".into()),
            service: ro.name_any(),
            revision: (*rev).to_string(),
            backend: backend(ro, rev, measured),
            canonical_service: canonical_service.clone(),
        };
        let (m, queries) = (m.clone(), queries.clone());
        async move { mesh::read(&m, &queries, &vars).await }
    });
    let mut out = BTreeMap::new();
    for (rev, read) in revisions
        .iter()
        .zip(futures_util::future::join_all(reads).await)
    {
        match read {
            Ok(stats) => {
                out.insert((*rev).to_string(), stats);
            }
            Err(e) => return Counters::Failed(format!("request metrics of {rev}: {e}")),
        }
    }
    Counters::Read(out)
}

/// Gates a cluster cannot measure as written: builtin and scorecard gates without
/// `requestMetrics` (or with one that is incomplete), and smoke metrics. `gates` are the
/// Rollout's own followed by its templates'.
pub fn problems(ro: &Rollout, gates: &[baton_spec::Gate]) -> Vec<FieldError> {
    let own = ro.spec.analysis.gates.len();
    let field = |g: usize, name: &str| {
        if g < own {
            format!("spec.analysis.gates[{g}].metric")
        } else {
            format!("spec.analysis.templates (gate {name})")
        }
    };
    let mut errors = Vec::new();
    if let Some(m) = &ro.spec.analysis.request_metrics {
        if let Err((f, why)) = Queries::of(m, router_template(ro)) {
            errors.push(FieldError {
                field: format!("spec.analysis.requestMetrics.{f}"),
                reason: why,
            });
        }
        if !(m.address.starts_with("http://") || m.address.starts_with("https://")) {
            errors.push(FieldError {
                field: "spec.analysis.requestMetrics.address".into(),
                reason: format!("must be an http:// or https:// URL, got {:?}", m.address),
            });
        }
    }
    for (g, gate) in gates.iter().enumerate() {
        let why = match &gate.metric {
            MetricSource::Builtin(_) | MetricSource::Scorecard(_)
                if ro.spec.analysis.request_metrics.is_none() =>
            {
                "builtin and scorecard gates read each revision's requests; on a cluster they come from the traffic router's metrics in Prometheus: set spec.analysis.requestMetrics (or use a prometheus, web or command metric)"
            }
            MetricSource::Smoke(_) => {
                "a smoke metric tests one instance by address, which a cluster gate does not have: use blueGreen smoke tests (run as a Job) or a web metric"
            }
            _ => continue,
        };
        errors.push(FieldError {
            field: field(g, &gate.name),
            reason: why.into(),
        });
    }
    errors
}

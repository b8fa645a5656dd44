//! The request-metrics provider: a revision's answers and latency histogram read from
//! the traffic router's metrics in Prometheus, as the builtin gates' counters where
//! Baton's proxy does not carry the traffic (a mesh or a Gateway on a cluster).
//!
//! Both queries read cumulative counters (summed over the revision's pods), like the
//! proxy's: the builtin judges subtract two reads to get a window, so the templates
//! stay plain `sum by` selections and the same statistical judges run on them. The
//! resolution is the router's buckets and the delay one scrape interval (see the
//! README's table of templates).

use baton_proxy_api::RevisionStats;
use baton_spec::{LatencyUnit, RequestMetrics, RequestTemplate};

use crate::provider::{ProviderError, http_get};

/// The two queries of a template, with what reading their answers needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Queries {
    pub requests: String,
    pub code_label: String,
    pub latency: String,
    /// Seconds per unit of the `le` bounds.
    pub scale: f64,
}

/// Istio's standard metrics, as reported by the destination's sidecar; the revision is
/// the `service.istio.io/canonical-revision` label the operator sets on its pods.
const ISTIO_SELECTOR: &str = r#"reporter="destination",destination_workload_namespace="{{namespace}}",destination_canonical_service="{{canonicalService}}",destination_canonical_revision="{{revision}}""#;

/// Envoy's cluster stats as Contour names its clusters (`namespace_service_port`): one
/// cluster per Service, so the revision is the Service that carries it.
const CONTOUR_SELECTOR: &str = r#"envoy_cluster_name=~"{{namespace}}_{{backend}}_[0-9]+""#;

impl Queries {
    /// The queries of `m`, its template defaulting to `router_default` (the template of
    /// the Rollout's traffic router). `Err` says which field is missing or misplaced.
    pub fn of(
        m: &RequestMetrics,
        router_default: Option<RequestTemplate>,
    ) -> Result<Queries, (&'static str, String)> {
        let Some(template) = m.template.or(router_default) else {
            return Err((
                "template",
                "required without a trafficRouting to choose one: istio, contour or custom".into(),
            ));
        };
        let custom_fields = [
            ("requests", m.requests.is_some()),
            ("codeLabel", m.code_label.is_some()),
            ("latency", m.latency.is_some()),
            ("latencyUnit", m.latency_unit.is_some()),
        ];
        match template {
            RequestTemplate::Custom => {
                let (Some(requests), Some(latency)) = (&m.requests, &m.latency) else {
                    let missing = if m.requests.is_none() {
                        "requests"
                    } else {
                        "latency"
                    };
                    return Err((missing, "required with template custom".into()));
                };
                Ok(Queries {
                    requests: requests.clone(),
                    code_label: m.code_label.clone().unwrap_or_else(|| "code".into()),
                    latency: latency.clone(),
                    scale: match m.latency_unit.unwrap_or(LatencyUnit::Seconds) {
                        LatencyUnit::Seconds => 1.0,
                        LatencyUnit::Milliseconds => 0.001,
                    },
                })
            }
            named => {
                if let Some((field, _)) = custom_fields.iter().find(|(_, set)| *set) {
                    return Err((
                        field,
                        format!(
                            "only with template custom (the {} template has its own queries)",
                            if named == RequestTemplate::Istio {
                                "istio"
                            } else {
                                "contour"
                            }
                        ),
                    ));
                }
                let (requests, code_label, latency) = if named == RequestTemplate::Istio {
                    (
                        format!(
                            "sum by (response_code) (istio_requests_total{{{ISTIO_SELECTOR}}})"
                        ),
                        "response_code",
                        format!(
                            "sum by (le) (istio_request_duration_milliseconds_bucket{{{ISTIO_SELECTOR}}})"
                        ),
                    )
                } else {
                    (
                        format!(
                            "sum by (envoy_response_code) (envoy_cluster_upstream_rq{{{CONTOUR_SELECTOR}}})"
                        ),
                        "envoy_response_code",
                        format!(
                            "sum by (le) (envoy_cluster_upstream_rq_time_bucket{{{CONTOUR_SELECTOR}}})"
                        ),
                    )
                };
                Ok(Queries {
                    requests,
                    code_label: code_label.into(),
                    latency,
                    scale: 0.001,
                })
            }
        }
    }
}

/// What a template's placeholders stand for, for one revision.
#[derive(Debug, Clone, Default)]
pub struct MeshVars {
    pub namespace: String,
    /// The Rollout's name.
    pub service: String,
    pub revision: String,
    /// The Service carrying this revision's traffic (stable or canary).
    pub backend: String,
    /// Istio's canonical service of the pods (`service.istio.io/canonical-name`).
    pub canonical_service: String,
}

impl MeshVars {
    pub fn apply(&self, template: &str) -> String {
        template
            .replace("{{namespace}}", &self.namespace)
            .replace("{{service}}", &self.service)
            .replace("{{revision}}", &self.revision)
            .replace("{{backend}}", &self.backend)
            .replace("{{canonicalService}}", &self.canonical_service)
    }
}

/// One revision's counters now.
pub async fn read(
    m: &RequestMetrics,
    q: &Queries,
    vars: &MeshVars,
) -> Result<RevisionStats, ProviderError> {
    let (requests, latency) = (vars.apply(&q.requests), vars.apply(&q.latency));
    let (a, b) = tokio::join!(query(m, &requests), query(m, &latency));
    let mut stats = RevisionStats::default();
    add_answers(&mut stats, &a?, &q.code_label, &requests)?;
    add_histogram(&mut stats, &b?, q.scale, &latency)?;
    Ok(stats)
}

async fn query(m: &RequestMetrics, promql: &str) -> Result<Vec<u8>, ProviderError> {
    let encoded: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", promql)
        .finish();
    let url = format!("{}/api/v1/query?{encoded}", m.address.trim_end_matches('/'));
    http_get(&url, &[], m.timeout.0, "Prometheus").await
}

/// One series of an instant vector: its labels and value.
type Series = (serde_json::Map<String, serde_json::Value>, f64);

fn series(body: &[u8], promql: &str) -> Result<Vec<Series>, ProviderError> {
    let data = crate::prometheus::data(body, promql)?;
    if data["resultType"] != "vector" {
        return Err(ProviderError::Invalid(format!(
            "`{promql}` must return an instant vector, got {}",
            data["resultType"]
        )));
    }
    let mut out = Vec::new();
    for s in data["result"].as_array().into_iter().flatten() {
        let text = s["value"][1].as_str().unwrap_or("");
        let value: f64 = text.parse().map_err(|_| {
            ProviderError::Invalid(format!("`{promql}`: value {text:?} is not a number"))
        })?;
        let labels = s["metric"].as_object().cloned().unwrap_or_default();
        out.push((labels, value));
    }
    Ok(out)
}

/// A counter's value as a count (sums over pods are whole; NaN and negatives are none).
fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Answers by status code into the five classes. Code 0 (Istio: no answer at all, the
/// connection reset) is a failure to reach the instance, as the proxy counts a 502.
fn add_answers(
    stats: &mut RevisionStats,
    body: &[u8],
    code_label: &str,
    promql: &str,
) -> Result<(), ProviderError> {
    for (labels, value) in series(body, promql)? {
        let Some(code) = labels.get(code_label).and_then(|c| c.as_str()) else {
            return Err(ProviderError::Invalid(format!(
                "`{promql}` returned a series without the label {code_label:?}: group it `by ({code_label})`"
            )));
        };
        let n = count(value);
        match code.parse::<u16>() {
            Ok(0) => {
                stats.classes[4] += n;
                stats.upstream_errors += n;
            }
            Ok(c @ 100..=599) => stats.classes[usize::from(c / 100 - 1)] += n,
            _ => {
                return Err(ProviderError::Invalid(format!(
                    "`{promql}`: {code_label}={code:?} is not an HTTP status code"
                )));
            }
        }
    }
    Ok(())
}

/// Cumulative `le` buckets into per-bucket counts with their own bounds (in seconds).
fn add_histogram(
    stats: &mut RevisionStats,
    body: &[u8],
    scale: f64,
    promql: &str,
) -> Result<(), ProviderError> {
    let mut points = Vec::new();
    for (labels, value) in series(body, promql)? {
        let le = labels.get("le").and_then(|l| l.as_str()).unwrap_or("");
        let bound: f64 = le.parse().map_err(|_| {
            ProviderError::Invalid(format!(
                "`{promql}` returned a series without a numeric `le` label: group it `by (le)`"
            ))
        })?;
        points.push((bound, count(value)));
    }
    if points.is_empty() {
        // No answers yet: an empty histogram, judged as no data.
        return Ok(());
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut bounds = Vec::new();
    let mut buckets = Vec::new();
    let mut below = 0u64;
    for (bound, cumulative) in &points {
        // Pods scraped at different moments can make a sum dip: never a negative bucket.
        buckets.push(cumulative.saturating_sub(below));
        below = below.max(*cumulative);
        if bound.is_finite() {
            bounds.push(bound * scale);
        }
    }
    if points.last().is_some_and(|(b, _)| b.is_finite()) {
        buckets.push(0);
    }
    stats.bounds = bounds;
    stats.buckets = buckets;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(series: &[(&str, &str, &str)]) -> Vec<u8> {
        let result: Vec<serde_json::Value> = series
            .iter()
            .map(|(k, v, n)| serde_json::json!({"metric": {*k: v}, "value": [1.0, n]}))
            .collect();
        serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": result}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn status_codes_become_classes_and_resets_are_errors() {
        let mut s = RevisionStats::default();
        let body = answer(&[
            ("response_code", "200", "90"),
            ("response_code", "503", "7"),
            ("response_code", "0", "3"),
        ]);
        add_answers(&mut s, &body, "response_code", "q").expect("read");
        assert_eq!(s.requests(), 100);
        assert_eq!(s.error_rate(), Some(0.1));
        assert_eq!(s.upstream_errors, 3);
        let unlabelled = answer(&[("other", "200", "1")]);
        assert!(add_answers(&mut s, &unlabelled, "response_code", "q").is_err());
    }

    #[test]
    fn cumulative_buckets_become_counts_with_the_routers_bounds() {
        let mut s = RevisionStats::default();
        // Istio-like milliseconds: 10 under 5 ms, 80 under 100 ms, 100 in all.
        let body = answer(&[
            ("le", "100", "80"),
            ("le", "5", "10"),
            ("le", "+Inf", "100"),
        ]);
        add_histogram(&mut s, &body, 0.001, "q").expect("read");
        assert_eq!(s.bounds, vec![0.005, 0.1]);
        assert_eq!(s.buckets, vec![10, 70, 20]);
        // The median sits in (5 ms, 100 ms]: 40 of its 70, as histogram_quantile says.
        let p50 = s.quantile(0.5).expect("data");
        assert!((p50 - (0.005 + 0.095 * 40.0 / 70.0)).abs() < 1e-9, "{p50}");
    }

    #[test]
    fn templates_follow_the_router_and_custom_needs_its_queries() {
        let m = |t: Option<RequestTemplate>| RequestMetrics {
            address: "http://p:9090".into(),
            template: t,
            requests: None,
            code_label: None,
            latency: None,
            latency_unit: None,
            timeout: baton_spec::Duration(std::time::Duration::from_secs(5)),
        };
        let istio = Queries::of(&m(None), Some(RequestTemplate::Istio)).expect("istio");
        let vars = MeshVars {
            namespace: "shop".into(),
            service: "web".into(),
            revision: "abc".into(),
            backend: "web-canary".into(),
            canonical_service: "web".into(),
        };
        assert!(vars.apply(&istio.requests).contains(
            r#"destination_canonical_service="web",destination_canonical_revision="abc""#
        ));
        let contour = Queries::of(&m(None), Some(RequestTemplate::Contour)).expect("contour");
        assert!(
            vars.apply(&contour.latency)
                .contains(r#"envoy_cluster_name=~"shop_web-canary_[0-9]+""#)
        );
        assert_eq!(
            Queries::of(&m(None), None).map_err(|e| e.0),
            Err("template")
        );
        let custom = m(Some(RequestTemplate::Custom));
        assert_eq!(Queries::of(&custom, None).map_err(|e| e.0), Err("requests"));
        let mut mixed = m(Some(RequestTemplate::Istio));
        mixed.latency = Some("x".into());
        assert_eq!(Queries::of(&mixed, None).map_err(|e| e.0), Err("latency"));
    }
}

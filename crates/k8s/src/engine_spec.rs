//! The bridge to the engine: a `Rollout` resource (with its pod template and its
//! gates) becomes the engine's spec. A revision is a pod template: its identity is a
//! hash of the template, carried in `run.env` so the engine's revision naming works
//! unchanged; `APP_VERSION` is the template's version label or its first image's tag.

use std::collections::BTreeMap;

use baton_spec::{FieldError, Gate, Metadata, RunSpec, Traffic};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use sha2::{Digest, Sha256};

use crate::crd::Rollout;

/// First 10 hex digits of the SHA-256 of the template's JSON.
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(t).unwrap_or_default();
    Sha256::digest(&json)
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What people call this version: `app.kubernetes.io/version`, else the first image's tag.
pub fn version_of(t: &PodTemplateSpec) -> String {
    if let Some(v) = t
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get("app.kubernetes.io/version"))
    {
        return v.clone();
    }
    t.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.as_deref())
        .map(|image| {
            let tail = image.rsplit('/').next().unwrap_or(image);
            match tail.split_once('@') {
                Some((_, digest)) => digest.chars().take(19).collect(),
                None => tail
                    .split_once(':')
                    .map(|(_, t)| t.to_string())
                    .unwrap_or_else(|| "latest".into()),
            }
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn run_spec(t: &PodTemplateSpec) -> RunSpec {
    RunSpec {
        command: vec!["kubernetes:pod-template".into()],
        env: BTreeMap::from([
            ("APP_VERSION".to_string(), version_of(t)),
            ("POD_TEMPLATE_HASH".to_string(), template_hash(t)),
        ]),
        working_dir: None,
    }
}

/// The engine's view of a Rollout whose template is `template` and whose gates
/// (its own and its templates') are `gates`.
pub fn engine_spec(
    ro: &Rollout,
    template: &PodTemplateSpec,
    gates: Vec<Gate>,
) -> baton_spec::Rollout {
    let s = &ro.spec;
    let name = ro.metadata.name.clone().unwrap_or_default();
    let strategy = baton_spec::Strategy {
        canary: s.strategy.canary.as_ref().map(|c| baton_spec::Canary {
            steps: c.steps.clone(),
            progressive: c.progressive.clone(),
            retain_previous: c.retain_previous,
        }),
        blue_green: s
            .strategy
            .blue_green
            .as_ref()
            .map(|b| baton_spec::BlueGreen {
                preview_listen: b.preview_service.clone(),
                auto_promote: b.auto_promote,
                smoke: b.smoke.clone(),
                retain_previous: b.retain_previous,
                post_promotion_analysis: b.post_promotion_analysis,
            }),
        rolling: s.strategy.rolling.clone(),
    };
    baton_spec::Rollout {
        api_version: "baton.dev/v1alpha1".into(),
        kind: "Rollout".into(),
        metadata: Metadata {
            name,
            labels: BTreeMap::new(),
        },
        spec: baton_spec::RolloutSpec {
            replicas: s.replicas.max(0) as u32,
            run: run_spec(template),
            probes: Default::default(),
            shutdown: Default::default(),
            min_ready_seconds: s.min_ready_seconds.max(0) as u64,
            progress_deadline_seconds: s.progress_deadline_seconds.max(1) as u64,
            revision_history_limit: s.revision_history_limit.clamp(0, MAX_HISTORY as i32) as u32,
            traffic: Traffic {
                listen: "kubernetes".into(),
                stickiness: None,
                canary_header: None,
                shield_canary: false,
                // Checked by the local spec's rules, under the cluster's names.
                mirror_percent: s.strategy.canary.as_ref().map_or(0, |c| c.mirror_percent),
                mirror_methods: s
                    .strategy
                    .canary
                    .as_ref()
                    .map(|c| c.mirror_methods.clone())
                    .unwrap_or_default(),
                tls: None,
                // On a cluster the router speaks to the pods: a Gateway reads the
                // Service port's `appProtocol` (kubernetes.io/h2c), Istio its name.
                backend_protocol: Default::default(),
            },
            strategy,
            analysis: baton_spec::Analysis {
                gates,
                pre_traffic: ro.spec.analysis.pre_traffic.clone(),
            },
            rollback: s.rollback.clone(),
            notifications: s.notifications.clone(),
        },
    }
}

/// What the local spec's checks find wrong in a cluster Rollout's engine spec, leaving
/// out what only the local spec has (a command, listeners, probes), after the bounds of
/// the Rollout's own signed numbers (which the engine spec would have clamped).
pub fn cluster_errors(ro: &Rollout, espec: &baton_spec::Rollout) -> Vec<FieldError> {
    use baton_spec::validate::{MAX_DURATION_SECONDS, MAX_REPLICAS};
    let s = &ro.spec;
    let max_seconds = i64::try_from(MAX_DURATION_SECONDS).unwrap_or(i64::MAX);
    let mut errors: Vec<FieldError> = [
        (
            "spec.replicas",
            i64::from(s.replicas),
            1,
            i64::from(MAX_REPLICAS),
        ),
        ("spec.minReadySeconds", s.min_ready_seconds, 0, max_seconds),
        (
            "spec.progressDeadlineSeconds",
            s.progress_deadline_seconds,
            1,
            max_seconds,
        ),
        (
            "spec.revisionHistoryLimit",
            i64::from(s.revision_history_limit),
            0,
            MAX_HISTORY,
        ),
    ]
    .into_iter()
    .filter(|(_, v, min, max)| !(min..=max).contains(&v))
    .map(|(field, v, min, max)| FieldError {
        field: field.into(),
        reason: format!("must be between {min} and {max}, got {v}"),
    })
    .collect();
    let own: Vec<String> = errors.iter().map(|e| e.field.clone()).collect();
    errors.extend(
        baton_spec::validate::validate(espec)
            .into_iter()
            .map(|mut e| {
                if let Some(rest) = e.field.strip_prefix("spec.traffic.mirror") {
                    e.field = format!("spec.strategy.canary.mirror{rest}");
                }
                e
            })
            .filter(|e| !own.contains(&e.field))
            .filter(|e| {
                !(e.field.starts_with("spec.run")
                    || e.field.starts_with("spec.traffic")
                    || e.field.starts_with("spec.probes")
                    || e.field.contains("previewListen")
                    || (e.field.contains("gates")
                        && e.reason.starts_with("no gate named")
                        && !ro.spec.analysis.templates.is_empty()))
            }),
    );
    if let Some(c) = &s.strategy.canary
        && c.mirror_percent > 0
        && c.traffic_routing.is_none()
    {
        errors.push(FieldError {
            field: "spec.strategy.canary.mirrorPercent".into(),
            reason: "mirroring copies requests in the traffic router: it needs trafficRouting (gatewayAPI or istio)".into(),
        });
    }
    if let Some(c) = &s.strategy.canary
        && c.traffic_routing
            .as_ref()
            .is_some_and(|r| r.gateway_api.is_some())
    {
        // HTTPRoute's method match is an enum: anything else is refused by the API server.
        const GATEWAY_METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        for (i, m) in c.mirror_methods.iter().enumerate() {
            if !GATEWAY_METHODS.contains(&m.as_str()) {
                errors.push(FieldError {
                    field: format!("spec.strategy.canary.mirrorMethods[{i}]"),
                    reason: format!(
                        "{m:?}: a Gateway API HTTPRoute matches only {}",
                        GATEWAY_METHODS.join(", ")
                    ),
                });
            }
        }
    }
    errors.extend(crate::requests::problems(ro, &espec.spec.analysis.gates));
    errors.extend(crate::jobs::spec_problems(ro, &espec.spec.analysis.gates));
    errors
}

/// The most old ReplicaSets a Rollout keeps for `undo`: the local spec's bound.
pub const MAX_HISTORY: i64 = baton_spec::validate::MAX_HISTORY as i64;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_new_image_is_a_new_revision_named_by_its_tag() {
        let a = run_spec(&template("ghcr.io/x/trade:v1"));
        let b = run_spec(&template("ghcr.io/x/trade:v2"));
        assert_ne!(a.revision_hash(), b.revision_hash());
        assert_eq!(a.app_version(), Some("v1"));
        assert_eq!(
            run_spec(&template("trade@sha256:abcdef0123456789abcdef")).app_version(),
            Some("sha256:abcdef012345")
        );
        assert_eq!(
            a.revision_hash(),
            run_spec(&template("ghcr.io/x/trade:v1")).revision_hash(),
            "stable identity"
        );
    }

    #[test]
    fn numbers_out_of_bounds_are_refused_by_name_not_clamped() {
        let doc = |spec: serde_json::Value| {
            let mut d = serde_json::json!({
                "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": "web"},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "workloadRef": {"name": "web"},
                         "strategy": {"canary": {"steps": [{"setWeight": 50}]}}},
            });
            if let (Some(o), Some(extra)) = (d["spec"].as_object_mut(), spec.as_object()) {
                o.extend(extra.clone());
            }
            d
        };
        let fields = |spec| match crate::cli::parse_cluster(&[doc(spec)]) {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|e| (e.field, e.reason)).collect(),
        };
        assert_eq!(
            fields(serde_json::json!({
                "replicas": -2,
                "minReadySeconds": -1,
                "progressDeadlineSeconds": i64::MAX,
                "revisionHistoryLimit": 1000,
            })),
            vec![
                (
                    "spec.replicas".into(),
                    "must be between 1 and 100, got -2".into()
                ),
                (
                    "spec.minReadySeconds".into(),
                    "must be between 0 and 2592000, got -1".into()
                ),
                (
                    "spec.progressDeadlineSeconds".into(),
                    format!("must be between 1 and 2592000, got {}", i64::MAX)
                ),
                (
                    "spec.revisionHistoryLimit".into(),
                    "must be between 0 and 100, got 1000".into()
                ),
            ]
        );
        assert_eq!(
            fields(
                serde_json::json!({"minReadySeconds": 2_592_000, "progressDeadlineSeconds": 2_592_000})
            ),
            Vec::<(String, String)>::new(),
            "30 days is allowed"
        );
    }

    #[test]
    fn every_type_error_of_a_cluster_rollout_is_listed() {
        let doc = serde_json::json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": "three",
                "selector": {"matchLabels": {"app": "web"}}, "workloadRef": {"name": "web"},
                "strategy": {"canary": {"steps": [{"setWeight": 150}, {"pause": {"duration": "soon"}}]}},
                "analysis": {"gates": [{"name": "errors", "metric": {"web": {"url": "http://x/"}}, "interval": -1}]},
            },
        });
        let Err(e) = crate::cli::parse_cluster(&[doc]) else {
            panic!("refused")
        };
        let fields: Vec<&str> = e.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.analysis.gates[0].interval",
                "spec.replicas",
                "spec.strategy.canary.steps[0].setWeight",
                "spec.strategy.canary.steps[1].pause.duration",
            ],
            "{e}"
        );
    }
}

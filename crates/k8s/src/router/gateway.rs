//! Gateway API: weights on an HTTPRoute's backendRefs. Served once every parent
//! reports `Accepted` for the route's current generation.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::{Plan, Router};
use crate::Error;

pub struct Gateway {
    pub route: String,
}

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "HTTPRoute".into(),
        plural: "httproutes".into(),
    }
}

/// Sets the weights of the stable and canary backendRefs in every rule that names
/// the stable Service, adding the canary beside it when missing. Returns whether
/// anything changed.
pub fn set_weights(spec: &mut Value, stable: &str, canary: &str, w: u32) -> bool {
    let mut changed = false;
    for rule in spec["rules"].as_array_mut().into_iter().flatten() {
        let Some(refs) = rule["backendRefs"].as_array_mut() else {
            continue;
        };
        let Some(stable_ref) = refs.iter().find(|r| r["name"] == stable).cloned() else {
            continue;
        };
        if !refs.iter().any(|r| r["name"] == canary) {
            let mut c = stable_ref.clone();
            c["name"] = json!(canary);
            refs.push(c);
            changed = true;
        }
        for r in refs.iter_mut() {
            let want = if r["name"] == stable {
                100 - w
            } else if r["name"] == canary {
                w
            } else {
                continue;
            };
            if r["weight"].as_u64() != Some(u64::from(want)) {
                r["weight"] = json!(want);
                changed = true;
            }
        }
    }
    changed
}

/// Adds (or updates, or with None removes) the first rule, named for Baton, that sends
/// requests carrying the header to the canary. Returns whether anything changed.
pub fn set_header_rule(
    spec: &mut Value,
    stable: &str,
    canary: &str,
    header: Option<&(String, String)>,
) -> bool {
    let Some(rules) = spec["rules"].as_array_mut() else {
        return false;
    };
    let existing = rules.iter().position(|r| r["name"] == super::HEADER_RULE);
    let Some((name, value)) = header else {
        return match existing {
            Some(i) => {
                rules.remove(i);
                true
            }
            None => false,
        };
    };
    let port = rules
        .iter()
        .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
        .find(|b| b["name"] == stable)
        .and_then(|b| b.get("port").cloned());
    let mut backend = json!({"name": canary, "weight": 1});
    if let Some(p) = port {
        backend["port"] = p;
    }
    let rule = json!({
        "name": super::HEADER_RULE,
        "matches": [{"headers": [{"type": "Exact", "name": name, "value": value}]}],
        "backendRefs": [backend],
    });
    match existing {
        Some(i) if rules[i] == rule => false,
        Some(i) => {
            rules[i] = rule;
            true
        }
        None => {
            rules.insert(0, rule);
            true
        }
    }
}

/// Adds (or updates, or with None removes) the rule, named for Baton, that copies
/// `mirror.percent` of the weighted rule's requests with a safe method to the canary:
/// the weighted rule with a method on each match and a RequestMirror filter. A match
/// with a method is more specific, so those requests take this rule (same backends
/// and weights) and the rest the weighted one. Returns whether anything changed.
pub fn set_mirror_rule(
    spec: &mut Value,
    stable: &str,
    canary: &str,
    mirror: Option<&super::Mirror>,
) -> bool {
    let Some(rules) = spec["rules"].as_array_mut() else {
        return false;
    };
    let existing = rules.iter().position(|r| r["name"] == super::MIRROR_RULE);
    let weighted = rules.iter().position(|r| {
        r["name"] != super::MIRROR_RULE
            && r["name"] != super::HEADER_RULE
            && r["backendRefs"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["name"] == stable))
    });
    let (Some(mirror), Some(w)) = (mirror, weighted) else {
        return match existing {
            Some(i) => {
                rules.remove(i);
                true
            }
            None => false,
        };
    };
    let mut rule = rules[w].clone();
    let port = rule["backendRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == stable)
        .and_then(|b| b.get("port").cloned());
    let mut target = json!({"name": canary});
    if let Some(p) = port {
        target["port"] = p;
    }
    rule["name"] = json!(super::MIRROR_RULE);
    rule["matches"] = json!(super::method_matches(
        rule["matches"].as_array(),
        &mirror.methods,
        |m, method| m["method"] = json!(method),
    ));
    let mut filters = rule["filters"].as_array().cloned().unwrap_or_default();
    filters.push(json!({"type": "RequestMirror", "requestMirror": {"backendRef": target, "percent": mirror.percent}}));
    rule["filters"] = json!(filters);
    match existing {
        Some(i) if rules[i] == rule => false,
        Some(i) => {
            rules[i] = rule;
            true
        }
        None => {
            rules.insert(w, rule);
            true
        }
    }
}

pub fn accepted(route: &Value) -> bool {
    let generation = route["metadata"]["generation"].as_i64().unwrap_or(0);
    let parents = route["status"]["parents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    !parents.is_empty()
        && parents.iter().all(|p| {
            p["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Accepted"
                        && c["status"] == "True"
                        && c["observedGeneration"] == generation
                })
            })
        })
}

impl Router for Gateway {
    async fn apply(&self, client: &Client, plan: &Plan) -> Result<bool, Error> {
        let (Some(stable), Some(canary)) = (&plan.stable_service, &plan.canary_service) else {
            return Err(Error::Spec(
                "gatewayAPI routing needs strategy.canary.stableService and canaryService".into(),
            ));
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &plan.namespace, &api_resource());
        let mut route = api.get(&self.route).await?;
        let mut spec = route.data["spec"].clone();
        let header_changed = set_header_rule(&mut spec, stable, canary, plan.header.as_ref());
        let weights_changed = set_weights(&mut spec, stable, canary, plan.canary_weight);
        // After the weights: the mirror rule is the weighted rule's copy.
        let mirror_changed = set_mirror_rule(&mut spec, stable, canary, plan.mirror.as_ref());
        if weights_changed | header_changed | mirror_changed {
            route.data["spec"] = spec;
            // A replace carries our resourceVersion: a concurrent writer makes this 409
            // and the next reconcile starts from what they wrote.
            route = api
                .replace(&self.route, &crate::post_params(), &route)
                .await?;
        }
        let whole = serde_json::to_value(&route)?;
        Ok(accepted(&whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_land_on_the_named_backends_and_the_canary_is_added() {
        let mut spec = json!({"rules": [{"backendRefs": [{"name": "web-stable", "port": 80}]}, {"backendRefs": [{"name": "other"}]}]});
        assert!(set_weights(&mut spec, "web-stable", "web-canary", 20));
        assert_eq!(spec["rules"][0]["backendRefs"][0]["weight"], 80);
        assert_eq!(
            spec["rules"][0]["backendRefs"][1],
            json!({"name": "web-canary", "port": 80, "weight": 20})
        );
        assert!(
            spec["rules"][1]["backendRefs"][0].get("weight").is_none(),
            "other rules untouched"
        );
        assert!(
            !set_weights(&mut spec, "web-stable", "web-canary", 20),
            "no change the second time"
        );
    }

    #[test]
    fn the_header_rule_comes_first_and_goes_when_asked() {
        let mut spec = json!({"rules": [{"backendRefs": [{"name": "web-stable", "port": 80}]}]});
        let h = ("X-Canary".to_string(), "always".to_string());
        assert!(set_header_rule(
            &mut spec,
            "web-stable",
            "web-canary",
            Some(&h)
        ));
        assert_eq!(spec["rules"][0]["name"], "baton-canary-header");
        assert_eq!(
            spec["rules"][0]["matches"][0]["headers"][0]["value"],
            "always"
        );
        assert_eq!(
            spec["rules"][0]["backendRefs"][0],
            json!({"name": "web-canary", "port": 80, "weight": 1})
        );
        assert!(
            !set_header_rule(&mut spec, "web-stable", "web-canary", Some(&h)),
            "idempotent"
        );
        set_weights(&mut spec, "web-stable", "web-canary", 20);
        assert_eq!(
            spec["rules"][0]["backendRefs"][0]["weight"], 1,
            "weights leave the header rule alone"
        );
        assert!(set_header_rule(&mut spec, "web-stable", "web-canary", None));
        assert_eq!(spec["rules"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn the_mirror_rule_copies_the_weighted_rule_for_safe_methods_only() {
        let mut spec = json!({"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "web-stable", "port": 80}]}]});
        set_weights(&mut spec, "web-stable", "web-canary", 10);
        let m = crate::router::Mirror {
            percent: 25,
            methods: vec!["GET".into(), "HEAD".into()],
        };
        assert!(set_mirror_rule(
            &mut spec,
            "web-stable",
            "web-canary",
            Some(&m)
        ));
        let rule = &spec["rules"][0];
        assert_eq!(rule["name"], "baton-mirror");
        assert_eq!(
            rule["matches"],
            json!([
                {"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET"},
                {"path": {"type": "PathPrefix", "value": "/api"}, "method": "HEAD"},
            ])
        );
        assert_eq!(
            rule["backendRefs"], spec["rules"][1]["backendRefs"],
            "same weights"
        );
        assert_eq!(
            rule["filters"][0]["requestMirror"],
            json!({"backendRef": {"name": "web-canary", "port": 80}, "percent": 25})
        );
        assert!(
            spec["rules"][1].get("filters").is_none(),
            "the weighted rule is untouched"
        );
        assert!(
            !set_mirror_rule(&mut spec, "web-stable", "web-canary", Some(&m)),
            "idempotent"
        );
        // Weights move both rules.
        set_weights(&mut spec, "web-stable", "web-canary", 50);
        assert!(!set_mirror_rule(
            &mut spec,
            "web-stable",
            "web-canary",
            Some(&m)
        ));
        assert_eq!(spec["rules"][0]["backendRefs"][0]["weight"], 50);
        assert!(set_mirror_rule(&mut spec, "web-stable", "web-canary", None));
        assert_eq!(spec["rules"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn accepted_means_for_this_generation() {
        let mut r = json!({"metadata": {"generation": 3}, "status": {"parents": [{"conditions": [{"type": "Accepted", "status": "True", "observedGeneration": 2}]}]}});
        assert!(!accepted(&r));
        r["status"]["parents"][0]["conditions"][0]["observedGeneration"] = json!(3);
        assert!(accepted(&r));
    }
}

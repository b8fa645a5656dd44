//! Gateway API: weights on an HTTPRoute's backendRefs. Served once every parent
//! reports `Accepted` for the route's current generation.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
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
        if set_weights(&mut spec, stable, canary, plan.canary_weight) {
            route.data["spec"] = spec;
            // A replace carries our resourceVersion: a concurrent writer makes this 409
            // and the next reconcile starts from what they wrote.
            route = api
                .replace(
                    &self.route,
                    &PostParams {
                        field_manager: Some("baton".into()),
                        ..Default::default()
                    },
                    &route,
                )
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
    fn accepted_means_for_this_generation() {
        let mut r = json!({"metadata": {"generation": 3}, "status": {"parents": [{"conditions": [{"type": "Accepted", "status": "True", "observedGeneration": 2}]}]}});
        assert!(!accepted(&r));
        r["status"]["parents"][0]["conditions"][0]["observedGeneration"] = json!(3);
        assert!(accepted(&r));
    }
}

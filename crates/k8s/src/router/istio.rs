//! Istio: weights on a VirtualService's HTTP route destinations. Istio reports no
//! status for them by default, so a weight counts as served once the object reads
//! back with it.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::{Plan, Router};
use crate::Error;

pub struct Istio {
    pub virtual_service: String,
}

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    }
}

fn host_is(dest: &Value, service: &str) -> bool {
    dest["destination"]["host"]
        .as_str()
        .is_some_and(|h| h == service || h.starts_with(&format!("{service}.")))
}

pub fn set_weights(spec: &mut Value, stable: &str, canary: &str, w: u32) -> bool {
    let mut changed = false;
    for http in spec["http"].as_array_mut().into_iter().flatten() {
        let Some(routes) = http["route"].as_array_mut() else {
            continue;
        };
        let Some(stable_dest) = routes.iter().find(|d| host_is(d, stable)).cloned() else {
            continue;
        };
        if !routes.iter().any(|d| host_is(d, canary)) {
            let mut c = stable_dest.clone();
            c["destination"]["host"] = json!(canary);
            routes.push(c);
            changed = true;
        }
        for d in routes.iter_mut() {
            let want = if host_is(d, stable) {
                100 - w
            } else if host_is(d, canary) {
                w
            } else {
                continue;
            };
            if d["weight"].as_u64() != Some(u64::from(want)) {
                d["weight"] = json!(want);
                changed = true;
            }
        }
    }
    changed
}

/// The first HTTP route, named for Baton, sending requests with the header to the
/// canary host (None removes it).
pub fn set_header_route(spec: &mut Value, canary: &str, header: Option<&(String, String)>) -> bool {
    let Some(http) = spec["http"].as_array_mut() else {
        return false;
    };
    let existing = http.iter().position(|r| r["name"] == super::HEADER_RULE);
    let Some((name, value)) = header else {
        return match existing {
            Some(i) => {
                http.remove(i);
                true
            }
            None => false,
        };
    };
    let route = json!({
        "name": super::HEADER_RULE,
        "match": [{"headers": {name.to_ascii_lowercase(): {"exact": value}}}],
        "route": [{"destination": {"host": canary}, "weight": 100}],
    });
    match existing {
        Some(i) if http[i] == route => false,
        Some(i) => {
            http[i] = route;
            true
        }
        None => {
            http.insert(0, route);
            true
        }
    }
}

/// Adds (or updates, or with None removes) the HTTP route, named for Baton, that
/// copies `mirror.percent` of the weighted route's requests with a safe method to the
/// canary: the weighted route with a method on each match, a `mirror` and a
/// `mirrorPercentage`, placed before it (Istio takes the first route that matches).
pub fn set_mirror_route(
    spec: &mut Value,
    stable: &str,
    canary: &str,
    mirror: Option<&super::Mirror>,
) -> bool {
    let Some(routes) = spec["http"].as_array_mut() else {
        return false;
    };
    let existing = routes.iter().position(|r| r["name"] == super::MIRROR_RULE);
    let weighted = routes.iter().position(|r| {
        r["name"] != super::MIRROR_RULE
            && r["name"] != super::HEADER_RULE
            && r["route"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| host_is(d, stable)))
    });
    let (Some(mirror), Some(w)) = (mirror, weighted) else {
        return match existing {
            Some(i) => {
                routes.remove(i);
                true
            }
            None => false,
        };
    };
    let mut route = routes[w].clone();
    route["name"] = json!(super::MIRROR_RULE);
    route["match"] = json!(super::method_matches(
        route["match"].as_array(),
        &mirror.methods,
        |m, method| m["method"] = json!({"exact": method}),
    ));
    route["mirror"] = json!({"host": canary});
    route["mirrorPercentage"] = json!({"value": mirror.percent});
    match existing {
        Some(i) if routes[i] == route => false,
        Some(i) => {
            routes[i] = route;
            true
        }
        None => {
            let at = w.min(existing.unwrap_or(w));
            routes.insert(at, route);
            true
        }
    }
}

impl Router for Istio {
    async fn apply(&self, client: &Client, plan: &Plan) -> Result<bool, Error> {
        let (Some(stable), Some(canary)) = (&plan.stable_service, &plan.canary_service) else {
            return Err(Error::Spec(
                "istio routing needs strategy.canary.stableService and canaryService".into(),
            ));
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &plan.namespace, &api_resource());
        let mut vs = api.get(&self.virtual_service).await?;
        let mut spec = vs.data["spec"].clone();
        let header_changed = set_header_route(&mut spec, canary, plan.header.as_ref());
        let weights_changed = set_weights(&mut spec, stable, canary, plan.canary_weight);
        let mirror_changed = set_mirror_route(&mut spec, stable, canary, plan.mirror.as_ref());
        if weights_changed | header_changed | mirror_changed {
            vs.data["spec"] = spec;
            api.replace(&self.virtual_service, &crate::post_params(), &vs)
                .await?;
        }
        let back = api.get(&self.virtual_service).await?;
        let mut check = back.data["spec"].clone();
        let header_pending = set_header_route(&mut check, canary, plan.header.as_ref());
        let weights_pending = set_weights(&mut check, stable, canary, plan.canary_weight);
        let mirror_pending = set_mirror_route(&mut check, stable, canary, plan.mirror.as_ref());
        Ok(!weights_pending && !header_pending && !mirror_pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_hosts() {
        let mut spec = json!({"http": [{"route": [{"destination": {"host": "web-stable.shop.svc.cluster.local"}}]}]});
        assert!(set_weights(&mut spec, "web-stable", "web-canary", 30));
        assert_eq!(spec["http"][0]["route"][0]["weight"], 70);
        assert_eq!(
            spec["http"][0]["route"][1]["destination"]["host"],
            "web-canary"
        );
        assert_eq!(spec["http"][0]["route"][1]["weight"], 30);
    }
}

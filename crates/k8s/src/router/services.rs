//! Service selectors: the stable and canary Services (and blue-green's active and
//! preview Services) are pinned to one revision's pods by adding the
//! `baton.dev/revision` label to their selector. Served once the Service reads back
//! with that selector *and* its EndpointSlices have followed: a selector takes effect
//! only when the EndpointSlice controller has rewritten the Service's endpoints, and
//! until then a router weighting the Service sends its share to the old pods (or, for a
//! new Service, to none: 503s). Without a router, a canary's share is its share of
//! pods, so the stable Service then selects every revision of the Rollout (`spread`).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams, Patch};
use serde_json::json;

use crate::Error;
use crate::workload::ROLLOUT_LABEL;

pub const REVISION_LABEL: &str = "baton.dev/revision";

/// Points `service` at the pods of `rollout`'s `revision`; answers whether it reads
/// back so and its endpoints have followed (see [`endpoints_follow`]).
pub async fn point(
    client: &Client,
    ns: &str,
    service: &str,
    rollout: &str,
    revision: &str,
) -> Result<bool, Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc = api.get(service).await?;
    let current = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.get(REVISION_LABEL))
        .cloned();
    if current.as_deref() != Some(revision) {
        let patch = json!({"spec": {"selector": {REVISION_LABEL: revision}}});
        let back = api
            .patch(service, &crate::patch_params(), &Patch::Merge(&patch))
            .await?;
        let reads_back = back
            .spec
            .and_then(|s| s.selector)
            .and_then(|s| s.get(REVISION_LABEL).cloned())
            .as_deref()
            == Some(revision);
        if !reads_back {
            return Ok(false);
        }
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let prefix = format!("{}-", crate::workload::rs_name(rollout, revision));
    Ok(endpoints_follow(&list.items, &prefix))
}

/// Whether a Service's EndpointSlices serve one revision only: at least one ready
/// endpoint, and every ready endpoint a pod of that revision (named after its
/// ReplicaSet, `pod_prefix`). A Service with no EndpointSlice at all (a cluster, or a
/// test double, without the EndpointSlice controller) cannot be checked: the selector
/// reading back is then all there is.
pub fn endpoints_follow(slices: &[EndpointSlice], pod_prefix: &str) -> bool {
    if slices.is_empty() {
        return true;
    }
    let mut any = false;
    for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
        // The API: an unset `ready` means ready.
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let ours = e.target_ref.as_ref().is_some_and(|t| {
            t.kind.as_deref() == Some("Pod")
                && t.name.as_deref().is_some_and(|n| n.starts_with(pod_prefix))
        });
        if !ours {
            return false;
        }
        any = true;
    }
    any
}

/// Points `service` at the pods of every revision of `rollout` (its selector loses the
/// revision and gains the Rollout): with no router, this is how a canary's share of
/// pods becomes its share of the Service's traffic. Answers whether it reads back so.
pub async fn spread(
    client: &Client,
    ns: &str,
    service: &str,
    rollout: &str,
) -> Result<bool, Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let spreads = |svc: &Service| {
        svc.spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| {
                !s.contains_key(REVISION_LABEL)
                    && s.get(ROLLOUT_LABEL).map(String::as_str) == Some(rollout)
            })
    };
    if spreads(&api.get(service).await?) {
        return Ok(true);
    }
    let patch = json!({"spec": {"selector": {REVISION_LABEL: null, ROLLOUT_LABEL: rollout}}});
    let back = api
        .patch(service, &crate::patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(spreads(&back))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-x"}, "addressType": "IPv4", "endpoints": endpoints,
        }))
        .expect("slice")
    }

    fn ep(pod: &str, ready: bool) -> serde_json::Value {
        json!({"addresses": ["10.0.0.1"], "conditions": {"ready": ready},
               "targetRef": {"kind": "Pod", "name": pod}})
    }

    #[test]
    fn endpoints_follow_the_selector_only_once_they_list_the_revision_alone() {
        let p = "web-abc-";
        // The selector changed, the endpoints not yet: the old revision's pods.
        assert!(!endpoints_follow(
            &[slice(json!([ep("web-old-1", true)]))],
            p
        ));
        // Half way: both revisions ready behind the Service.
        let both = slice(json!([ep("web-old-1", true), ep("web-abc-1", true)]));
        assert!(!endpoints_follow(&[both], p));
        // No ready endpoint yet: a weight would meet 503s.
        assert!(!endpoints_follow(
            &[slice(json!([ep("web-abc-1", false)]))],
            p
        ));
        assert!(!endpoints_follow(&[slice(json!([]))], p));
        // Followed; the old pods still listed but terminating (not ready) do not count.
        let done = slice(json!([ep("web-abc-1", true), ep("web-old-1", false)]));
        assert!(endpoints_follow(&[done], p));
        // Nothing to check against.
        assert!(endpoints_follow(&[], p));
    }
}

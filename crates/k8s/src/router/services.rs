//! Service selectors: the stable and canary Services (and blue-green's active and
//! preview Services) are pinned to one revision's pods by adding the
//! `baton.dev/revision` label to their selector. Served once the Service reads back
//! with that selector. Without a router, a canary's share is its share of pods, so the
//! stable Service then selects every revision of the Rollout (`spread`).

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch};
use serde_json::json;

use crate::Error;
use crate::workload::ROLLOUT_LABEL;

pub const REVISION_LABEL: &str = "baton.dev/revision";

/// Points `service` at `revision`'s pods; answers whether it reads back so.
pub async fn point(
    client: &Client,
    ns: &str,
    service: &str,
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
    if current.as_deref() == Some(revision) {
        return Ok(true);
    }
    let patch = json!({"spec": {"selector": {REVISION_LABEL: revision}}});
    let back = api
        .patch(service, &crate::patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(back
        .spec
        .and_then(|s| s.selector)
        .and_then(|s| s.get(REVISION_LABEL).cloned())
        .as_deref()
        == Some(revision))
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

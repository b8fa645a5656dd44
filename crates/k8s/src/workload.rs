//! Revisions as ReplicaSets: one per pod template, named `{rollout}-{revision}`,
//! labelled with the rollout and the revision, owned by the Rollout so that deleting
//! it collects them. Old ones are kept at zero replicas up to revisionHistoryLimit.

use std::collections::BTreeMap;

use baton_engine::RevisionObs;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::Error;
use crate::crd::Rollout;
use crate::router::services::REVISION_LABEL;

pub const ROLLOUT_LABEL: &str = "baton.dev/rollout";

pub fn rs_name(rollout: &str, revision: &str) -> String {
    format!("{rollout}-{revision}")
}

/// The ReplicaSets of a rollout, by revision.
pub async fn observe(
    api: &Api<ReplicaSet>,
    rollout: &str,
) -> Result<BTreeMap<String, ReplicaSet>, Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{ROLLOUT_LABEL}={rollout}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|rs| Some((rs.labels().get(REVISION_LABEL)?.clone(), rs)))
        .collect())
}

pub fn obs_of(rs: &ReplicaSet) -> RevisionObs {
    let st = rs.status.as_ref();
    RevisionObs {
        ready: st.and_then(|s| s.ready_replicas).unwrap_or(0).max(0) as u32,
        available: st.and_then(|s| s.available_replicas).unwrap_or(0).max(0) as u32,
        // Counted from the pods, and only while a restart runs (see the controller).
        stale: 0,
    }
}

/// The labels Istio's metrics take a workload's revision and name from.
pub const ISTIO_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
pub const ISTIO_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// A ReplicaSet's annotation: the pod-template labels Baton added to the user's.
pub const ADDED_LABELS: &str = "baton.dev/added-labels";

/// A revision's pod template as the user wrote it: without the labels Baton added
/// (older ReplicaSets record none and carry only the two it always added).
pub fn users_template(rs: ReplicaSet) -> PodTemplateSpec {
    let added: Vec<String> = rs
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADDED_LABELS))
        .map(|l| l.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| vec![ROLLOUT_LABEL.to_string(), REVISION_LABEL.to_string()]);
    let mut template = rs.spec.and_then(|s| s.template).unwrap_or_default();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        for label in &added {
            labels.remove(label);
        }
    }
    template
}

fn new_replicaset(
    ro: &Rollout,
    revision: &str,
    template: &PodTemplateSpec,
    replicas: u32,
) -> ReplicaSet {
    let name = ro.name_any();
    let mut template = template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(ROLLOUT_LABEL.into(), name.clone());
    labels.insert(REVISION_LABEL.into(), revision.into());
    // So that a mesh's metrics carry the revision (Istio's canonical revision; its
    // canonical name defaults to the `app` label, so the Rollout's name is set only
    // where the template names none): builtin gates read them (`requests.rs`).
    labels.insert(ISTIO_REVISION_LABEL.into(), revision.into());
    let mut added = vec![ROLLOUT_LABEL, REVISION_LABEL, ISTIO_REVISION_LABEL];
    if !labels.contains_key(ISTIO_NAME_LABEL) {
        labels.insert(ISTIO_NAME_LABEL.into(), name.clone());
        added.push(ISTIO_NAME_LABEL);
    }
    let mut match_labels = ro.spec.selector.match_labels.clone().unwrap_or_default();
    match_labels.insert(REVISION_LABEL.into(), revision.into());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(rs_name(&name, revision)),
            namespace: ro.namespace(),
            labels: Some(BTreeMap::from([
                (ROLLOUT_LABEL.to_string(), name.clone()),
                (REVISION_LABEL.to_string(), revision.to_string()),
            ])),
            owner_references: ro.controller_owner_ref(&()).map(|o| vec![o]),
            // What `undo` takes off to get the user's template back.
            annotations: Some(BTreeMap::from([(
                ADDED_LABELS.to_string(),
                added.join(","),
            )])),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas as i32),
            min_ready_seconds: Some(i32::try_from(ro.spec.min_ready_seconds).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(match_labels),
                match_expressions: ro.spec.selector.match_expressions.clone(),
            },
            template: Some(template),
        }),
        status: None,
    }
}

/// Makes the ReplicaSets match `desired` (revision → replicas): creates the current
/// revision's when missing, scales the others, scales what is not desired to zero,
/// and deletes zero-replica ones beyond the history limit, oldest first.
pub async fn sync(
    api: &Api<ReplicaSet>,
    ro: &Rollout,
    current: (&str, &PodTemplateSpec),
    desired: &BTreeMap<String, u32>,
    existing: &BTreeMap<String, ReplicaSet>,
) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let name = ro.name_any();
    for (rev, &n) in desired {
        match existing.get(rev) {
            None if rev == current.0 => {
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                // The cache may lag our own create by a moment: existing is fine.
                match api
                    .create(&pp, &new_replicaset(ro, rev, current.1, n))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
                done.push(format!(
                    "created ReplicaSet {} with {n} replicas",
                    rs_name(&name, rev)
                ));
            }
            None => done.push(format!(
                "revision {rev} has no ReplicaSet any more; it cannot be scaled"
            )),
            Some(rs) => {
                if rs.spec.as_ref().and_then(|s| s.replicas) != Some(n as i32) {
                    scale(api, &rs_name(&name, rev), n).await?;
                    done.push(format!("scaled ReplicaSet {} to {n}", rs_name(&name, rev)));
                }
            }
        }
    }
    let mut idle: Vec<&ReplicaSet> = Vec::new();
    for (rev, rs) in existing {
        if desired.contains_key(rev) {
            continue;
        }
        if rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
            scale(api, &rs_name(&name, rev), 0).await?;
            done.push(format!("scaled ReplicaSet {} to 0", rs_name(&name, rev)));
        }
        idle.push(rs);
    }
    idle.sort_by_key(|rs| rs.metadata.creation_timestamp.clone().map(|t| t.0));
    let keep = ro.spec.revision_history_limit.max(0) as usize;
    for rs in idle.iter().take(idle.len().saturating_sub(keep)) {
        api.delete(&rs.name_any(), &DeleteParams::background())
            .await?;
        done.push(format!(
            "deleted old ReplicaSet {} (revisionHistoryLimit {keep})",
            rs.name_any()
        ));
    }
    Ok(done)
}

/// The operator's name in `managedFields`.
pub const FIELD_MANAGER: &str = "baton-operator";

/// Server-side apply of the one field the operator owns on a ReplicaSet it scales, so
/// that another manager's fields are left alone and a conflict is visible.
pub async fn scale(api: &Api<ReplicaSet>, name: &str, n: u32) -> Result<(), Error> {
    let patch = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": name}, "spec": {"replicas": n}});
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The rollout's pods selector as the scale subresource reports it.
pub fn selector_string(ro: &Rollout) -> String {
    let mut parts: Vec<String> = ro
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.sort();
    parts.join(",")
}

/// A revision's pods, for a restart: which predate it, and which goes next.
pub async fn pods(
    client: &kube::Client,
    ns: &str,
    rollout: &str,
    revision: &str,
) -> Result<Vec<k8s_openapi::api::core::v1::Pod>, Error> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let sel = format!("{ROLLOUT_LABEL}={rollout},{REVISION_LABEL}={revision}");
    Ok(api.list(&ListParams::default().labels(&sel)).await?.items)
}

/// Whether a pod predates a restart asked for at `at` (Unix ms). A pod's creation time
/// has whole seconds, so the restart's is taken to the second too: a pod made in the
/// same second as the request, before it, is not replaced (as Argo Rollouts' restartAt).
fn predates(pod: &k8s_openapi::api::core::v1::Pod, at: u64) -> bool {
    let at_secs = (at / 1000) as i64;
    pod.metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| t.0.as_second() < at_secs)
}

fn terminating(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Pods of the revision a restart at `at` still has to replace.
pub fn stale(pods: &[k8s_openapi::api::core::v1::Pod], at: u64) -> u32 {
    pods.iter()
        .filter(|p| !terminating(p) && predates(p, at))
        .count() as u32
}

fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod to delete next in a restart: the oldest that predates it, once `wanted` of
/// the pods just read are ready and none is terminating, so the ReplicaSet's
/// replacement and the surge keep the revision's capacity whole. Read from the pods,
/// not the ReplicaSet's status, which lags a deletion.
pub fn next_to_replace(
    pods: &[k8s_openapi::api::core::v1::Pod],
    at: u64,
    wanted: u32,
) -> Option<String> {
    let ready = pods.iter().filter(|p| pod_ready(p)).count() as u32;
    if ready < wanted || pods.iter().any(terminating) {
        return None;
    }
    pods.iter()
        .filter(|p| predates(p, at))
        .min_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .map(|p| p.name_any())
}

//! What the `baton` command does against a cluster: read a Rollout's status, ask the
//! operator to promote, abort or retry (through an annotation it acts on once, then
//! records in the status), undo (put the previous stable template back), show the
//! history; and validate Rollouts written for a cluster.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use baton_spec::shape::Shape;
use baton_spec::{FieldError, SpecErrors};
use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use baton_driver::view::Seen;
use baton_driver::{Record, RolloutView};

use crate::Error;
use crate::controller::REQUEST_ANNOTATION;
use crate::crd::Rollout;
use crate::engine_spec::{cluster_errors, engine_spec};
use crate::router::services::REVISION_LABEL;
use crate::workload::{ROLLOUT_LABEL, rs_name};

/// Whether a YAML document is a Rollout written for a cluster (a pod template or a
/// workload reference) rather than for `baton up`.
pub fn is_cluster_form(doc: &Value) -> bool {
    doc["spec"].get("template").is_some() || doc["spec"].get("workloadRef").is_some()
}

/// Parses and checks cluster Rollouts: every type error (against the schema), names,
/// then the same semantic checks as local specs for what they share (steps, gates,
/// analysis).
pub fn parse_cluster(docs: &[Value]) -> Result<Vec<Rollout>, SpecErrors> {
    let many = docs.len() > 1;
    let prefix = |i: usize, f: &str| {
        if many {
            format!("documents[{i}].{f}")
        } else {
            f.to_string()
        }
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let typed = match serde_path_to_error::deserialize::<_, Rollout>(doc.clone()) {
            Ok(ro) => {
                let found = cluster_problems(&ro);
                out.push(ro);
                Ok(found)
            }
            Err(e) => Err(baton_spec::serde_error(e)),
        };
        for e in baton_spec::shape::combine(spec_shape(doc), typed) {
            errors.push(FieldError {
                field: prefix(i, &e.field),
                reason: e.reason,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(SpecErrors(errors))
    }
}

/// The type errors of a document's `spec`, all of them (serde stops at the first).
fn spec_shape(doc: &Value) -> Vec<FieldError> {
    static SHAPE: LazyLock<Result<Shape, String>> =
        LazyLock::new(Shape::of::<crate::crd::RolloutSpec>);
    let (Ok(shape), Some(spec)) = (SHAPE.as_ref(), doc.get("spec")) else {
        return Vec::new();
    };
    shape
        .errors(spec)
        .into_iter()
        .map(|e| FieldError {
            field: if e.field == "(document)" {
                "spec".into()
            } else {
                format!("spec.{}", e.field)
            },
            reason: e.reason,
        })
        .collect()
}

/// What is wrong with a cluster Rollout that deserialised: names, the workload, and
/// the checks the operator makes too (`cluster_errors`).
fn cluster_problems(ro: &Rollout) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if ro.metadata.name.as_deref().is_none_or(str::is_empty) {
        errors.push(FieldError {
            field: "metadata.name".into(),
            reason: "required".into(),
        });
    }
    match (&ro.spec.template, &ro.spec.workload_ref) {
        (Some(_), Some(_)) | (None, None) => errors.push(FieldError {
            field: "spec.template".into(),
            reason: "set exactly one of spec.template and spec.workloadRef".into(),
        }),
        _ => {}
    }
    let template = ro.spec.template.clone().unwrap_or_default();
    let espec = engine_spec(ro, &template, ro.spec.analysis.gates.clone());
    errors.extend(cluster_errors(ro, &espec));
    errors
}

/// The status as `baton status` shows it, for a cluster Rollout: the same typed view
/// as on one machine, with each revision's ReplicaSet.
pub async fn status(client: &Client, ns: &str, name: &str) -> Result<Value, Error> {
    let ro = Api::<Rollout>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let rss = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{ROLLOUT_LABEL}={name}")))
        .await?;
    Ok(serde_json::to_value(view(&ro, &rss.items)?)?)
}

/// A Rollout's view from the resource and its ReplicaSets.
pub fn view(ro: &Rollout, rss: &[ReplicaSet]) -> Result<RolloutView, Error> {
    let name = ro.name_any();
    let key = format!("{}/{name}", ro.namespace().unwrap_or_default());
    let st = ro.status.clone().unwrap_or_default();
    let record = match st.engine.clone() {
        Some(v) => Record::decode(&key, v)?,
        None => Record::default(),
    };
    let template = ro.spec.template.clone().unwrap_or_default();
    let spec = engine_spec(ro, &template, ro.spec.analysis.gates.clone());
    let listen = format!("namespace {}", ro.namespace().unwrap_or_default());
    let mut v = baton_driver::view::rollout(
        &name,
        &spec,
        &record.status,
        baton_driver::view::Routing {
            acked: st.route_acked,
            ..Default::default()
        },
        listen,
        |rev| {
            let Some(rs) = rss
                .iter()
                .find(|x| x.labels().get(REVISION_LABEL).map(String::as_str) == Some(rev))
            else {
                return Seen::default();
            };
            let s = rs.status.clone().unwrap_or_default();
            Seen {
                present: true,
                ready: s.ready_replicas.unwrap_or(0).max(0) as u32,
                available: s.available_replicas.unwrap_or(0).max(0) as u32,
                replica_set: Some(rs.name_any()),
                replicas: Some(
                    rs.spec
                        .as_ref()
                        .and_then(|s| s.replicas)
                        .unwrap_or(0)
                        .max(0) as u32,
                ),
                ..Seen::default()
            }
        },
    );
    v.namespace = ro.namespace();
    v.conditions = st
        .conditions
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    v.observed_generation = Some(st.observed_generation);
    v.generation = ro.metadata.generation;
    Ok(v)
}

/// Asks the operator for `command` (promote, promote-full, abort, retry) and waits
/// until it has acted on it; returns what the status says then.
pub async fn request(
    client: &Client,
    ns: &str,
    name: &str,
    command: &str,
    by: &str,
    wait: Duration,
) -> Result<String, Error> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), ns);
    api.get(name).await?;
    let id = format!("{}-{}", crate::now_ms(), std::process::id());
    let req = json!({"id": id, "command": command, "by": by}).to_string();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {REQUEST_ANNOTATION: req}}})),
    )
    .await?;
    let deadline = Instant::now() + wait;
    loop {
        let ro = api.get(name).await?;
        let st = ro.status.unwrap_or_default();
        if st.last_request.as_deref() == Some(id.as_str()) {
            return Ok(format!(
                "{command}: the operator acted on it; now {}: {}",
                st.phase, st.message
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::Spec(format!(
                "the operator did not act on the {command} request within {wait:?}: is `baton operator` running and leading?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts the previous stable revision's pod template back into the Rollout (its
/// ReplicaSet still holds it), which the operator then rolls out like any change.
pub async fn undo(client: &Client, ns: &str, name: &str) -> Result<String, Error> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), ns);
    let ro = api.get(name).await?;
    if ro.spec.workload_ref.is_some() {
        return Err(Error::Spec(format!(
            "{name} takes its template from a Deployment (workloadRef): undo by changing that Deployment's template back"
        )));
    }
    let engine = ro.status.and_then(|s| s.engine).unwrap_or(Value::Null);
    let history: Vec<String> = engine["stableHistory"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let current = engine["stable"].as_str().unwrap_or("");
    let Some(previous) = history.iter().rev().find(|r| r.as_str() != current) else {
        return Err(Error::Spec(format!(
            "{name} has no previous stable revision to go back to"
        )));
    };
    let rs = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .get_opt(&rs_name(name, previous))
        .await?
        .ok_or_else(|| {
            Error::Spec(format!(
                "the ReplicaSet of revision {previous} is gone (revisionHistoryLimit): cannot undo"
            ))
        })?;
    let template = crate::workload::users_template(rs);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": template}})),
    )
    .await?;
    Ok(format!(
        "{name}: the template of revision {previous} is back; the operator rolls it out"
    ))
}

/// `set image`: new images for named containers of a Rollout's template (`*` for
/// every container), as one write that fails if the Rollout changed since it was read.
pub async fn set_image(
    client: &Client,
    ns: &str,
    name: &str,
    images: &[(String, String)],
) -> Result<String, Error> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), ns);
    let ro = api.get(name).await?;
    if let Some(w) = &ro.spec.workload_ref {
        return Err(Error::Spec(format!(
            "{name} takes its template from {} {} (workloadRef): set the image there, e.g. `kubectl set image deployment/{} ...`",
            w.kind, w.name, w.name
        )));
    }
    let mut pod = ro
        .spec
        .template
        .clone()
        .and_then(|t| t.spec)
        .ok_or_else(|| Error::Spec(format!("{name} has no pod template")))?;
    let mut changed = Vec::new();
    for (container, image) in images {
        let mut found = false;
        let all = pod
            .init_containers
            .iter_mut()
            .flatten()
            .chain(pod.containers.iter_mut());
        for c in all {
            if container == "*" || &c.name == container {
                found = true;
                if c.image.as_deref() != Some(image.as_str()) {
                    c.image = Some(image.clone());
                    changed.push(format!("{}={image}", c.name));
                }
            }
        }
        if !found {
            let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
            return Err(Error::Spec(format!(
                "{name} has no container {container:?}; its containers: {}",
                names.join(", ")
            )));
        }
    }
    if changed.is_empty() {
        return Ok(format!("{name}: the template already has those images"));
    }
    let patch = json!({
        "metadata": {"resourceVersion": ro.resource_version()},
        "spec": {"template": {"spec": {"initContainers": pod.init_containers, "containers": pod.containers}}},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match e {
            kube::Error::Api(a) if a.code == 409 => Error::Spec(format!(
                "{name} changed while its images were being set: run it again"
            )),
            e => e.into(),
        })?;
    Ok(format!(
        "{name}: {} (a new revision; the operator rolls it out)",
        changed.join(", ")
    ))
}

/// The pod templates (as YAML) of two revisions, by number, from their ReplicaSets:
/// what `history --diff` compares on a cluster.
pub async fn revision_templates(
    client: &Client,
    ns: &str,
    name: &str,
    numbers: [u64; 2],
) -> Result<[String; 2], Error> {
    let ro = Api::<Rollout>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let engine = ro.status.and_then(|s| s.engine).unwrap_or(Value::Null);
    let rss = Api::<ReplicaSet>::namespaced(client.clone(), ns);
    let mut out = [String::new(), String::new()];
    for (slot, n) in out.iter_mut().zip(numbers) {
        let rev = engine["revisions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["number"].as_u64() == Some(n))
            .and_then(|r| r["name"].as_str())
            .ok_or_else(|| Error::Spec(format!("{name} has no revision #{n}")))?;
        let rs = rss.get_opt(&rs_name(name, rev)).await?.ok_or_else(|| {
            Error::Spec(format!(
                "the ReplicaSet of {name} #{n} is gone (revisionHistoryLimit): nothing to compare"
            ))
        })?;
        let template = crate::workload::users_template(rs);
        *slot = serde_saphyr::to_string(&template).map_err(|e| Error::Spec(e.to_string()))?;
    }
    Ok(out)
}

/// Revisions with their outcome, and the Rollout's Events.
pub async fn history(client: &Client, ns: &str, name: &str) -> Result<Value, Error> {
    let ro = Api::<Rollout>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let engine = ro.status.and_then(|s| s.engine).unwrap_or(Value::Null);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<Value> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| json!({"reason": e.reason, "note": e.note, "type": e.type_, "at": e.event_time.map(|t| t.0.to_string())}))
        .collect();
    list.sort_by_key(|e| e["at"].as_str().unwrap_or("").to_string());
    Ok(json!({"name": name, "revisions": engine["revisions"], "events": list}))
}

/// Every Rollout of a namespace, as the dashboard draws them.
pub async fn dashboard_list(client: &Client, ns: &str) -> Result<Vec<Value>, Error> {
    let rollouts = Api::<Rollout>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let rss = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(ROLLOUT_LABEL))
        .await?
        .items;
    rollouts
        .iter()
        .map(|ro| {
            let mine: Vec<ReplicaSet> = rss
                .iter()
                .filter(|r| r.labels().get(ROLLOUT_LABEL) == Some(&ro.name_any()))
                .cloned()
                .collect();
            view(ro, &mine).and_then(|v| Ok(serde_json::to_value(v)?))
        })
        .collect()
}

//! What a real client asks before it touches a resource: `/version`, the legacy
//! discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`) built from
//! a fixed table of built-in resources plus every stored CustomResourceDefinition,
//! and server-side Tables for `kubectl get`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::store::Store;

const CRDS_GV: &str = "apiextensions.k8s.io/v1";
const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// One resource as discovery shows it.
#[derive(Clone)]
struct Resource {
    name: String,
    singular: String,
    namespaced: bool,
    kind: String,
    short: Vec<String>,
    subresources: Vec<&'static str>,
}

/// The built-in resources the project uses: `(group/version, plural, singular, namespaced, kind, shortNames, subresources)`.
#[allow(clippy::type_complexity)]
const BUILTIN: &[(&str, &str, &str, bool, &str, &[&str], &[&str])] = &[
    ("v1", "pods", "pod", true, "Pod", &["po"], &["status"]),
    (
        "v1",
        "services",
        "service",
        true,
        "Service",
        &["svc"],
        &["status"],
    ),
    (
        "v1",
        "configmaps",
        "configmap",
        true,
        "ConfigMap",
        &["cm"],
        &[],
    ),
    ("v1", "secrets", "secret", true, "Secret", &[], &[]),
    ("v1", "events", "event", true, "Event", &["ev"], &[]),
    (
        "v1",
        "namespaces",
        "namespace",
        false,
        "Namespace",
        &["ns"],
        &["status"],
    ),
    (
        "v1",
        "endpoints",
        "endpoints",
        true,
        "Endpoints",
        &["ep"],
        &[],
    ),
    (
        "apps/v1",
        "deployments",
        "deployment",
        true,
        "Deployment",
        &["deploy"],
        &["status", "scale"],
    ),
    (
        "apps/v1",
        "replicasets",
        "replicaset",
        true,
        "ReplicaSet",
        &["rs"],
        &["status", "scale"],
    ),
    ("batch/v1", "jobs", "job", true, "Job", &[], &["status"]),
    // What the exchange's manifests hold beside them; the Gateway API's HTTPRoute is
    // a CRD on a real cluster, served here as if installed.
    (
        "apps/v1",
        "statefulsets",
        "statefulset",
        true,
        "StatefulSet",
        &["sts"],
        &["status", "scale"],
    ),
    (
        "policy/v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        "PodDisruptionBudget",
        &["pdb"],
        &["status"],
    ),
    (
        "networking.k8s.io/v1",
        "networkpolicies",
        "networkpolicy",
        true,
        "NetworkPolicy",
        &["netpol"],
        &[],
    ),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "endpointslice",
        true,
        "EndpointSlice",
        &[],
        &[],
    ),
    (
        "gateway.networking.k8s.io/v1",
        "httproutes",
        "httproute",
        true,
        "HTTPRoute",
        &[],
        &["status"],
    ),
    (
        "coordination.k8s.io/v1",
        "leases",
        "lease",
        true,
        "Lease",
        &[],
        &[],
    ),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "endpointslice",
        true,
        "EndpointSlice",
        &[],
        &[],
    ),
    (
        "events.k8s.io/v1",
        "events",
        "event",
        true,
        "Event",
        &["ev"],
        &[],
    ),
    (
        CRDS_GV,
        "customresourcedefinitions",
        "customresourcedefinition",
        false,
        "CustomResourceDefinition",
        &["crd", "crds"],
        &["status"],
    ),
    (
        "policy/v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        "PodDisruptionBudget",
        &["pdb"],
        &["status"],
    ),
    (
        "autoscaling/v2",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        "HorizontalPodAutoscaler",
        &["hpa"],
        &["status"],
    ),
];

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every served group/version with its resources, in a stable order.
fn catalogue(store: &Store) -> BTreeMap<String, Vec<Resource>> {
    let mut out: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
    for (gv, name, singular, namespaced, kind, short, subs) in BUILTIN {
        out.entry((*gv).to_string()).or_default().push(Resource {
            name: (*name).to_string(),
            singular: (*singular).to_string(),
            namespaced: *namespaced,
            kind: (*kind).to_string(),
            short: short.iter().map(|s| (*s).to_string()).collect(),
            subresources: subs.to_vec(),
        });
    }
    for crd in store.list(CRDS_GV, "customresourcedefinitions", None).0 {
        let spec = &crd["spec"];
        let (Some(group), Some(plural), Some(kind)) = (
            spec["group"].as_str(),
            spec["names"]["plural"].as_str(),
            spec["names"]["kind"].as_str(),
        ) else {
            continue;
        };
        for version in spec["versions"].as_array().into_iter().flatten() {
            let Some(v) = version["name"].as_str() else {
                continue;
            };
            if version["served"] == json!(false) {
                continue;
            }
            let mut subresources = Vec::new();
            if version["subresources"]["status"].is_object() {
                subresources.push("status");
            }
            if version["subresources"]["scale"].is_object() {
                subresources.push("scale");
            }
            out.entry(format!("{group}/{v}"))
                .or_default()
                .push(Resource {
                    name: plural.to_string(),
                    singular: spec["names"]["singular"]
                        .as_str()
                        .map_or_else(|| kind.to_lowercase(), str::to_string),
                    namespaced: spec["scope"].as_str() != Some("Cluster"),
                    kind: kind.to_string(),
                    short: strings(&spec["names"]["shortNames"]),
                    subresources,
                });
        }
    }
    out
}

/// The kind a resource's objects have, when discovery knows it (for an empty list's kind).
pub(crate) fn kind_of(store: &Store, gv: &str, resource: &str) -> Option<String> {
    catalogue(store)
        .remove(gv)?
        .into_iter()
        .find(|r| r.name == resource)
        .map(|r| r.kind)
}

/// The answer for a discovery path, or `None` when the path is not one.
pub(crate) fn answer(store: &Store, path: &str) -> Option<Value> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["version"] => Some(json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-baton-kube-fake",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "", "compiler": "", "platform": "linux/amd64"
        })),
        // An index without paths: kubectl finds no schema to validate against and
        // no endpoint that could take `fieldValidation`, and goes on (a 404 here
        // makes `kubectl apply` fail with "failed to download openapi").
        ["openapi", "v3"] => Some(json!({"paths": {}})),
        ["api"] => Some(json!({
            "kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]
        })),
        ["apis"] => {
            let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for gv in catalogue(store).into_keys() {
                if let Some((g, v)) = gv.split_once('/') {
                    groups.entry(g.to_string()).or_default().push(v.to_string());
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    let preferred = versions[0].clone();
                    json!({"name": g, "versions": versions, "preferredVersion": preferred})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["api", v] => resource_list(store, v),
        ["apis", g, v] => resource_list(store, &format!("{g}/{v}")),
        _ => None,
    }
}

fn resource_list(store: &Store, gv: &str) -> Option<Value> {
    let resources = catalogue(store).remove(gv)?;
    let mut out = Vec::new();
    for r in resources {
        out.push(json!({
            "name": r.name, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": VERBS, "shortNames": r.short
        }));
        for sub in &r.subresources {
            let kind = if *sub == "scale" { "Scale" } else { &r.kind };
            let group = if *sub == "scale" {
                json!("autoscaling")
            } else {
                Value::Null
            };
            let mut entry = json!({
                "name": format!("{}/{sub}", r.name), "singularName": "", "namespaced": r.namespaced,
                "kind": kind, "verbs": ["get", "patch", "update"]
            });
            if !group.is_null() {
                entry["group"] = group;
                entry["version"] = json!("v1");
            }
            out.push(entry);
        }
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

/// Whether a request's Accept header asks for a server-side Table.
pub(crate) fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// A `meta.k8s.io/v1` Table of objects: Name and the CRD's additionalPrinterColumns
/// (simple `.a.b` JSONPaths; `date` cells as ages), or Name and Age when it declares
/// none, as the API server does; each row carries its object's metadata.
pub(crate) fn table(
    store: &Store,
    gv: &str,
    resource: &str,
    items: &[std::sync::Arc<Value>],
    rv: &str,
) -> Value {
    let mut columns = printer_columns(store, gv, resource);
    if columns.is_empty() {
        columns.push((
            "Age".into(),
            "date".into(),
            ".metadata.creationTimestamp".into(),
            0,
        ));
    }
    let mut defs = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    for (name, ty, _, priority) in &columns {
        defs.push(json!({"name": name, "type": ty, "format": "", "description": "", "priority": priority}));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let mut cells = vec![obj["metadata"]["name"].clone()];
            for (_, ty, path, _) in &columns {
                let mut v: &Value = obj;
                for seg in path.trim_start_matches('.').split('.') {
                    v = &v[seg];
                }
                let age = (ty == "date")
                    .then(|| v.as_str().and_then(parse_rfc3339))
                    .flatten()
                    .map(|t| json!(human_age(now.saturating_sub(t))));
                cells.push(age.unwrap_or_else(|| v.clone()));
            }
            json!({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"]
            }})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv}, "columnDefinitions": defs, "rows": rows})
}

/// `(name, type, jsonPath, priority)` of a custom resource's printer columns; none for
/// built-in resources (their columns are the API server's code, not data).
fn printer_columns(store: &Store, gv: &str, resource: &str) -> Vec<(String, String, String, i64)> {
    let Some((group, version)) = gv.split_once('/') else {
        return Vec::new();
    };
    let crd = store
        .list(CRDS_GV, "customresourcedefinitions", None)
        .0
        .into_iter()
        .find(|c| {
            c["spec"]["group"] == json!(group) && c["spec"]["names"]["plural"] == json!(resource)
        });
    let Some(crd) = crd else {
        return Vec::new();
    };
    let Some(v) = crd["spec"]["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == json!(version)))
    else {
        return Vec::new();
    };
    v["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["name"].as_str()?.to_string(),
                c["type"].as_str().unwrap_or("string").to_string(),
                c["jsonPath"].as_str()?.to_string(),
                c["priority"].as_i64().unwrap_or(0),
            ))
        })
        .collect()
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (the form the store writes).
fn parse_rfc3339(s: &str) -> Option<u64> {
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, m, d) = (n(0, 4)?, n(5, 7)?, n(8, 10)?);
    let (hh, mm, ss) = (n(11, 13)?, n(14, 16)?, n(17, 19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Age the way kubectl prints it: `42s`, `5m`, `3h`, `2d`.
fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-03-01T01:02:03Z"), Some(1_709_254_923));
    }
}

//! The EndpointSlice controller, for pods that have addresses (the kubelet's): one
//! slice per Service with a selector, `NAME-box`, labelled
//! `kubernetes.io/service-name`. An endpoint is `ready` when its pod is Ready and not
//! being deleted; a pod being deleted stays listed as `terminating` (not ready), as the
//! API server's controller keeps it, so data planes drop it from the moment of the
//! deletion.

use serde_json::{Value, json};

use crate::store::{Key, Store};

const GV: &str = "discovery.k8s.io/v1";

fn selects(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    let labels = &pod["metadata"]["labels"];
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// The port numbers a Service's ports reach on `pod` (`targetPort` by number or by
/// container port name; `port` when absent).
fn ports(svc: &Value, pod: Option<&Value>) -> Vec<Value> {
    let container_ports: Vec<&Value> = pod
        .map(|p| {
            p["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .collect()
        })
        .unwrap_or_default();
    let declared = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    if declared.is_empty() {
        // A Service without ports: the pods' first containerPort (the box's manifests
        // often leave ports out).
        return container_ports
            .first()
            .and_then(|p| p["containerPort"].as_u64())
            .map(|n| vec![json!({"name": "", "port": n, "protocol": "TCP"})])
            .unwrap_or_default();
    }
    declared
        .iter()
        .filter_map(|p| {
            let number = match &p["targetPort"] {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => container_ports
                    .iter()
                    .find(|c| c["name"] == name.as_str())
                    .and_then(|c| c["containerPort"].as_u64()),
                _ => p["port"].as_u64(),
            }?;
            Some(json!({"name": p["name"].as_str().unwrap_or(""), "port": number, "protocol": "TCP"}))
        })
        .collect()
}

/// Brings every Service's slice up to date with the pods.
pub fn sync(store: &Store) {
    let (services, _) = store.list("v1", "services", None);
    let (pods, _) = store.list("v1", "pods", None);
    for svc in services {
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            continue;
        };
        let ns = svc["metadata"]["namespace"].as_str();
        let name = svc["metadata"]["name"].as_str().unwrap_or("");
        let mut mine: Vec<&Value> = pods
            .iter()
            .map(|p| &**p)
            .filter(|p| p["metadata"]["namespace"].as_str() == ns)
            .filter(|p| p["status"]["podIP"].is_string() && selects(selector, p))
            .collect();
        mine.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string());
        let endpoints: Vec<Value> = mine
            .iter()
            .map(|p| {
                let deleting = p["metadata"]["deletionTimestamp"].is_string();
                let ready = pod_ready(p);
                json!({
                    "addresses": [p["status"]["podIP"].clone()],
                    "conditions": {"ready": ready && !deleting, "serving": ready, "terminating": deleting},
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"].clone(), "uid": p["metadata"]["uid"].clone()},
                })
            })
            .collect();
        let ports = ports(&svc, mine.first().copied());
        let key = Key::new(GV, "endpointslices", ns, &format!("{name}-box"));
        match store.get(&key) {
            Ok(cur) if cur["endpoints"] == json!(endpoints) && cur["ports"] == json!(ports) => {}
            Ok(_) => {
                let _ = store.modify(&key, false, |o| {
                    o["endpoints"] = json!(endpoints);
                    o["ports"] = json!(ports);
                    Ok(())
                });
            }
            Err(_) => {
                let slice = json!({
                    "apiVersion": GV, "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-box"),
                        "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "box.baton.dev"},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc["metadata"]["uid"].clone(), "controller": true}]},
                    "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
                });
                let _ = store.create(&Key::new(GV, "endpointslices", ns, ""), slice);
            }
        }
    }
}

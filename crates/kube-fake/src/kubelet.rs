//! A kubelet that runs pods as real processes, for tests that send real requests
//! through the operator's path: each pod's first container is started from a table
//! of images the test gives (image → program, arguments, environment), on an address
//! of its own (`127.N.x.y`, handed to the process as `HOST` with its containerPort as
//! `PORT`: the loopback network stands in for per-pod network namespaces), its
//! readiness and liveness probes really sent, its status (`podIP`, `Ready`,
//! `restartCount`) written as a kubelet writes it. A process that exits is started
//! again (restartPolicy Always), as is one whose liveness probe fails.
//!
//! Deletion goes as on a node: the pod gets a deletionTimestamp (this kubelet's
//! finalizer holds the object), the endpoints controller takes it out of its Services'
//! EndpointSlices at once, and meanwhile the kubelet runs the preStop hook, then sends
//! SIGTERM, then SIGKILL when `terminationGracePeriodSeconds` is over, and only then lets
//! the object go. Nothing orders the endpoint removal before the SIGTERM: a data plane
//! that has not yet applied the removal sends requests to a process that is stopping,
//! which is why manifests carry a preStop delay, and why this box shows what one without
//! it costs. Every SIGTERM is recorded ([`Kubelet::terminations`]) for tests to compare
//! with what the data plane was serving at that moment.
//!
//! A container's `command` and `args` replace the image's program and arguments, as
//! they replace an image's entrypoint and command. Pods of `restartPolicy: Never` (a
//! Job's) end `Succeeded` or `Failed` by their exit code. With `dns`, a pod resolves
//! Services by name (`NAME.NAMESPACE.svc`) to their ClusterIPs, served by the box's
//! userspace kube-proxy. A pod whose image is not in the table stays Pending with
//! `ErrImagePull`, as one whose image cannot be pulled.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::store::{Key, Store, StoreError};

/// Holds a pod's object until its process is gone.
pub const FINALIZER: &str = "kubelet.box.baton.dev/process";

/// What an image runs.
#[derive(Debug, Clone)]
pub struct Image {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub images: HashMap<String, Image>,
    /// Each pod's output goes to `DIR/NAMESPACE_POD.log`.
    pub logs: PathBuf,
    pub tick: Duration,
    /// Pods get addresses `127.SUBNET.x.y`, Services `127.SUBNET.255.n`.
    pub subnet: u8,
    /// Run each pod in a mount namespace of its own whose `/etc/hosts` is the box's
    /// (Services by name, see `kubeproxy`): needs root and `unshare` (util-linux).
    pub dns: bool,
    /// Where to keep a Prometheus file_sd list of the pods that ask to be scraped
    /// (`prometheus.io/scrape: "true"`, `prometheus.io/port`, `prometheus.io/path`),
    /// labelled `namespace`, `pod` and each pod label with `.`, `/` and `-` as `_`
    /// (what a `labelmap` of `__meta_kubernetes_pod_label_(.+)` gives).
    pub file_sd: Option<PathBuf>,
}

/// A SIGTERM the kubelet sent: to which pod, at which address, when.
#[derive(Debug, Clone)]
pub struct Termination {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub deleted_at: Instant,
    pub sigterm_at: Instant,
}

#[derive(Default)]
struct Shared {
    /// Pod uid → the process group of its running process.
    groups: HashMap<String, i32>,
    terminations: Vec<Termination>,
    /// Each pod's task: stopped with the kubelet, or it would start its process again.
    tasks: Vec<tokio::task::AbortHandle>,
}

/// The running kubelet; dropping it kills every process it started.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Mutex<Shared>>,
}

impl Kubelet {
    pub fn terminations(&self) -> Vec<Termination> {
        lock(&self.shared).terminations.clone()
    }
    /// Process group ids (the leaders' pids) of the pods' processes now running, for
    /// tests that check nothing is left behind.
    pub fn running(&self) -> Vec<i32> {
        lock(&self.shared).groups.values().copied().collect()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        let mut shared = lock(&self.shared);
        for t in shared.tasks.drain(..) {
            t.abort();
        }
        for (_, pgid) in shared.groups.drain() {
            kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn kill_group(pgid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
}

/// Starts the kubelet (and the EndpointSlice controller that goes with pods that have
/// addresses) on `store`.
pub fn start(store: Store, cfg: KubeletConfig) -> Kubelet {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let task = tokio::spawn(run(store, cfg, shared.clone()));
    Kubelet { task, shared }
}

struct PodHandle {
    term: watch::Sender<bool>,
}

async fn run(store: Store, cfg: KubeletConfig, shared: Arc<Mutex<Shared>>) {
    let mut pods: HashMap<String, PodHandle> = HashMap::new();
    let mut next_ip: u32 = 1;
    let hosts = cfg.logs.join("hosts");
    let mut proxy = crate::kubeproxy::KubeProxy::new(cfg.subnet, hosts.clone());
    let mut sd_written = String::new();
    loop {
        let (list, _) = store.list("v1", "pods", None);
        let mut seen = Vec::with_capacity(list.len());
        for p in &list {
            let Some(uid) = p["metadata"]["uid"].as_str() else {
                continue;
            };
            seen.push(uid.to_string());
            let deleting = p["metadata"]["deletionTimestamp"].is_string();
            if let Some(h) = pods.get(uid) {
                if deleting && !*h.term.borrow() {
                    let _ = h.term.send(true);
                }
                continue;
            }
            if deleting || p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed" {
                continue;
            }
            let key = pod_key(p);
            let image = p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let Some(img) = cfg.images.get(&image).cloned() else {
                if p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    != "ErrImagePull"
                {
                    let _ = store.modify(&key, true, |o| {
                        o["status"] = json!({"phase": "Pending", "containerStatuses": [{
                            "name": o["spec"]["containers"][0]["name"].clone(), "ready": false, "restartCount": 0, "image": image,
                            "state": {"waiting": {"reason": "ErrImagePull", "message": format!("image {image:?} is not in the box's table of images")}}}]});
                        Ok(())
                    });
                }
                continue;
            };
            // The finalizer first: a pod deleted from here on waits for its process.
            let held = store.modify(&key, false, |o| {
                let f = &mut o["metadata"]["finalizers"];
                if !f.is_array() {
                    *f = json!([]);
                }
                if let Some(a) = f.as_array_mut()
                    && !a.iter().any(|x| x == FINALIZER)
                {
                    a.push(json!(FINALIZER));
                }
                Ok(())
            });
            if held.is_err() {
                continue;
            }
            let n = next_ip;
            next_ip += 1;
            let ip = Ipv4Addr::new(127, cfg.subnet, (n / 250) as u8, (n % 250 + 1) as u8);
            let (term, rx) = watch::channel(false);
            let pod = Pod {
                store: store.clone(),
                key,
                uid: uid.to_string(),
                spec: p["spec"].clone(),
                image: img,
                ip,
                log: cfg.logs.join(format!(
                    "{}_{}.log",
                    p["metadata"]["namespace"].as_str().unwrap_or(""),
                    p["metadata"]["name"].as_str().unwrap_or("")
                )),
                shared: shared.clone(),
                hosts: cfg.dns.then(|| hosts.clone()),
            };
            let task = tokio::spawn(pod.run(rx));
            let mut sh = lock(&shared);
            sh.tasks.retain(|t| !t.is_finished());
            sh.tasks.push(task.abort_handle());
            pods.insert(uid.to_string(), PodHandle { term });
        }
        // A pod gone without deletion going through here (a forced delete): its
        // process stops at once.
        pods.retain(|uid, h| {
            let keep = seen.contains(uid);
            if !keep {
                let _ = h.term.send(true);
            }
            keep
        });
        crate::endpoints::sync(&store);
        proxy.sync(&store);
        if let Some(path) = &cfg.file_sd {
            let text = scrape_targets(&list).to_string();
            if text != sd_written
                && std::fs::write(path.with_extension("tmp"), &text).is_ok()
                && std::fs::rename(path.with_extension("tmp"), path).is_ok()
            {
                sd_written = text;
            }
        }
        tokio::time::sleep(cfg.tick).await;
    }
}

/// The file_sd list of the pods that ask to be scraped.
fn scrape_targets(pods: &[Arc<Value>]) -> Value {
    let mut out = Vec::new();
    for p in pods {
        let a = &p["metadata"]["annotations"];
        let Some(ip) = p["status"]["podIP"].as_str() else {
            continue;
        };
        if a["prometheus.io/scrape"] != "true" || p["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let port = a["prometheus.io/port"].as_str().unwrap_or("80");
        let mut labels = serde_json::Map::new();
        for (k, v) in p["metadata"]["labels"].as_object().into_iter().flatten() {
            let k: String = k
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            labels.insert(k, v.clone());
        }
        labels.insert("namespace".into(), p["metadata"]["namespace"].clone());
        labels.insert("pod".into(), p["metadata"]["name"].clone());
        labels.insert(
            "__metrics_path__".into(),
            json!(a["prometheus.io/path"].as_str().unwrap_or("/metrics")),
        );
        out.push(json!({"targets": [format!("{ip}:{port}")], "labels": labels}));
    }
    json!(out)
}

fn pod_key(p: &Value) -> Key {
    Key::new(
        "v1",
        "pods",
        p["metadata"]["namespace"].as_str(),
        p["metadata"]["name"].as_str().unwrap_or(""),
    )
}

/// An HTTP probe (`httpGet`) with the API's defaults.
#[derive(Debug, Clone)]
struct Probe {
    path: String,
    port: u16,
    initial: Duration,
    period: Duration,
    timeout: Duration,
    success: u32,
    failure: u32,
}

fn secs(v: &Value, default: u64) -> Duration {
    Duration::from_secs(v.as_u64().unwrap_or(default))
}

impl Probe {
    fn of(v: &Value, container: &Value, default_port: u16) -> Option<Probe> {
        let get = v.get("httpGet")?;
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().map(|n| n as u16),
            Value::String(name) => container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .map(|n| n as u16),
            _ => None,
        }
        .unwrap_or(default_port);
        Some(Probe {
            path: get["path"].as_str().unwrap_or("/").to_string(),
            port,
            initial: secs(&v["initialDelaySeconds"], 0),
            period: secs(&v["periodSeconds"], 10),
            timeout: secs(&v["timeoutSeconds"], 1),
            success: v["successThreshold"].as_u64().unwrap_or(1) as u32,
            failure: v["failureThreshold"].as_u64().unwrap_or(3) as u32,
        })
    }

    /// A 2xx or 3xx answer within the timeout, as the kubelet counts success.
    async fn send(&self, ip: Ipv4Addr) -> bool {
        tokio::time::timeout(self.timeout, http_get(ip, self.port, &self.path))
            .await
            .ok()
            .flatten()
            .is_some_and(|code| (200..400).contains(&code))
    }
}

/// One `GET` with `Connection: close`; the status code.
async fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/box\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Pod {
    store: Store,
    key: Key,
    uid: String,
    spec: Value,
    image: Image,
    ip: Ipv4Addr,
    log: PathBuf,
    shared: Arc<Mutex<Shared>>,
    /// The box's hosts file, bind-mounted over `/etc/hosts` for the pod.
    hosts: Option<PathBuf>,
}

/// Why a running container stopped being watched.
enum Stop {
    Deleted,
    /// With the exit code (none when killed by a signal).
    Exited(Option<i32>),
    LivenessFailed,
}

impl Pod {
    fn container(&self) -> &Value {
        &self.spec["containers"][0]
    }

    fn port(&self) -> u16 {
        self.container()["ports"][0]["containerPort"]
            .as_u64()
            .map_or(8080, |p| p as u16)
    }

    /// The program and arguments: the container's `command` replaces the image's
    /// program (and arguments), its `args` the image's arguments.
    fn argv(&self) -> Vec<String> {
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
        };
        let c = self.container();
        let mut argv = match strings(&c["command"]) {
            Some(cmd) if !cmd.is_empty() => cmd,
            _ => {
                let mut v = vec![self.image.program.display().to_string()];
                if strings(&c["args"]).is_none() {
                    v.extend(self.image.args.iter().cloned());
                }
                v
            }
        };
        argv.extend(strings(&c["args"]).unwrap_or_default());
        argv
    }

    fn command(&self) -> tokio::process::Command {
        let argv = self.argv();
        let mut cmd = match &self.hosts {
            // unshare execs sh, which execs the program: one process, the pod's.
            Some(hosts) => {
                let mut c = tokio::process::Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(hosts)
                    .args(&argv);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in self.environment() {
            cmd.env(k, v);
        }
        cmd
    }

    /// The process's environment, in the kubelet's order (later wins): the box's own
    /// (`HOST` and `PORT`: the pod's address and first containerPort, `POD_NAME`,
    /// `POD_IP`), the image's, the container's `envFrom` (ConfigMaps, Secrets), then its
    /// `env` (`value` with `$(VAR)` expanded from what comes before, or `valueFrom` a
    /// ConfigMap or Secret key or the fields `status.podIP`, `metadata.name`,
    /// `metadata.namespace`). A missing source is skipped (the kubelet would refuse to
    /// start the container unless it is `optional`).
    fn environment(&self) -> Vec<(String, String)> {
        let ip = self.ip.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("HOST".into(), ip.clone()),
            ("PORT".into(), self.port().to_string()),
            ("POD_NAME".into(), self.key.name.clone()),
            ("POD_IP".into(), ip.clone()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(x, _)| *x != k);
            env.push((k, v));
        };
        for (k, v) in &self.image.env {
            set(&mut env, k.clone(), v.clone());
        }
        let ns = self.key.namespace.clone();
        let data = |resource: &str, name: &str| -> Vec<(String, String)> {
            let Ok(obj) = self
                .store
                .get(&Key::new("v1", resource, ns.as_deref(), name))
            else {
                return vec![];
            };
            let mut out = Vec::new();
            if resource == "secrets" {
                for (k, v) in obj["data"].as_object().into_iter().flatten() {
                    use base64::Engine as _;
                    let decoded = v
                        .as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned());
                    if let Some(d) = decoded {
                        out.push((k.clone(), d));
                    }
                }
                for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
                    out.push((k.clone(), v.as_str().unwrap_or("").to_string()));
                }
            } else {
                for (k, v) in obj["data"].as_object().into_iter().flatten() {
                    out.push((k.clone(), v.as_str().unwrap_or("").to_string()));
                }
            }
            out
        };
        let c = self.container();
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let prefix = from["prefix"].as_str().unwrap_or("");
            let pairs = if let Some(n) = from["configMapRef"]["name"].as_str() {
                data("configmaps", n)
            } else if let Some(n) = from["secretRef"]["name"].as_str() {
                data("secrets", n)
            } else {
                vec![]
            };
            for (k, v) in pairs {
                set(&mut env, format!("{prefix}{k}"), v);
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let Some(k) = e["name"].as_str() else {
                continue;
            };
            let from = &e["valueFrom"];
            let key_of = |resource: &str, r: &Value| {
                let (name, key) = (r["name"].as_str()?, r["key"].as_str()?);
                data(resource, name)
                    .into_iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
            };
            let v = if let Some(v) = e["value"].as_str() {
                Some(expand(v, &env))
            } else if from["secretKeyRef"].is_object() {
                key_of("secrets", &from["secretKeyRef"])
            } else if from["configMapKeyRef"].is_object() {
                key_of("configmaps", &from["configMapKeyRef"])
            } else {
                match from["fieldRef"]["fieldPath"].as_str() {
                    Some("status.podIP") => Some(ip.clone()),
                    Some("status.hostIP") => Some("127.0.0.1".into()),
                    Some("metadata.name") => Some(self.key.name.clone()),
                    Some("metadata.namespace") => ns.clone(),
                    _ => None,
                }
            };
            if let Some(v) = v {
                set(&mut env, k.to_string(), v);
            }
        }
        env
    }

    fn spawn(&self) -> std::io::Result<tokio::process::Child> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
        };
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        if let Some(pid) = child.id() {
            lock(&self.shared)
                .groups
                .insert(self.uid.clone(), pid as i32);
        }
        Ok(child)
    }

    fn status(&self, ready: bool, restarts: u32, state: Value) {
        let r = if ready { "True" } else { "False" };
        let name = self.container()["name"].clone();
        let image = self.container()["image"].clone();
        let ip = self.ip.to_string();
        let _ = self.store.modify(&self.key, true, |o| {
            o["status"] = json!({
                "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": r}, {"type": "ContainersReady", "status": r}],
                "containerStatuses": [{"name": name, "image": image, "ready": ready,
                    "restartCount": restarts, "started": true, "state": state}],
            });
            Ok(())
        });
    }

    async fn run(self, mut term: watch::Receiver<bool>) {
        let port = self.port();
        let readiness = Probe::of(&self.container()["readinessProbe"], self.container(), port);
        let liveness = Probe::of(&self.container()["livenessProbe"], self.container(), port);
        let mut restarts = 0u32;
        loop {
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    self.status(
                        false,
                        restarts,
                        json!({"waiting": {"reason": "StartError", "message": e.to_string()}}),
                    );
                    if wait_or_term(&mut term, Duration::from_secs(1)).await {
                        self.release().await;
                        return;
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let running = json!({"running": {"startedAt": crate::store::now_rfc3339()}});
            let mut ready = readiness.is_none();
            self.status(ready, restarts, running.clone());
            let (mut ok_run, mut fail_run, mut live_fails) = (0u32, 0u32, 0u32);
            let mut next_ready = readiness.as_ref().map(|p| started + p.initial);
            let mut next_live = liveness.as_ref().map(|p| started + p.initial);
            let stop = loop {
                let next = [next_ready, next_live]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(started + Duration::from_secs(3600));
                tokio::select! {
                    _ = term.changed() => break Stop::Deleted,
                    r = child.wait() => break Stop::Exited(r.ok().and_then(|s| s.code())),
                    _ = tokio::time::sleep_until(next.into()) => {}
                }
                let now = Instant::now();
                if let (Some(p), Some(at)) = (&readiness, next_ready)
                    && now >= at
                {
                    next_ready = Some(now + p.period);
                    if p.send(self.ip).await {
                        (ok_run, fail_run) = (ok_run + 1, 0);
                    } else {
                        (ok_run, fail_run) = (0, fail_run + 1);
                    }
                    let was = ready;
                    if !ready && ok_run >= p.success {
                        ready = true;
                    } else if ready && fail_run >= p.failure {
                        ready = false;
                    }
                    if was != ready {
                        self.status(ready, restarts, running.clone());
                    }
                }
                if let (Some(p), Some(at)) = (&liveness, next_live)
                    && now >= at
                {
                    next_live = Some(now + p.period);
                    live_fails = if p.send(self.ip).await {
                        0
                    } else {
                        live_fails + 1
                    };
                    if live_fails >= p.failure {
                        break Stop::LivenessFailed;
                    }
                }
            };
            match stop {
                Stop::Deleted => {
                    self.terminate(child).await;
                    self.release().await;
                    return;
                }
                Stop::Exited(code) => {
                    let policy = self.spec["restartPolicy"].as_str().unwrap_or("Always");
                    if policy == "Never" || (policy == "OnFailure" && code == Some(0)) {
                        lock(&self.shared).groups.remove(&self.uid);
                        self.finished(code, restarts);
                        let _ = term.wait_for(|t| *t).await;
                        self.release().await;
                        return;
                    }
                }
                Stop::LivenessFailed => {
                    self.stop_process(&mut child, self.grace()).await;
                }
            }
            lock(&self.shared).groups.remove(&self.uid);
            restarts += 1;
            self.status(
                false,
                restarts,
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            );
            // Back-off as the kubelet's, much shortened: 100 ms doubling to 5 s.
            let backoff =
                Duration::from_millis(100 * (1u64 << restarts.min(6))).min(Duration::from_secs(5));
            if wait_or_term(&mut term, backoff).await {
                self.release().await;
                return;
            }
        }
    }

    /// A pod that will not restart: `Succeeded` on exit code 0, else `Failed`.
    fn finished(&self, code: Option<i32>, restarts: u32) {
        let phase = if code == Some(0) {
            "Succeeded"
        } else {
            "Failed"
        };
        let name = self.container()["name"].clone();
        let image = self.container()["image"].clone();
        let ip = self.ip.to_string();
        let _ = self.store.modify(&self.key, true, |o| {
            o["status"] = json!({
                "phase": phase, "hostIP": "127.0.0.1", "podIP": ip,
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": name, "image": image, "ready": false, "restartCount": restarts,
                    "state": {"terminated": {"exitCode": code.unwrap_or(137),
                        "reason": if code == Some(0) { "Completed" } else { "Error" },
                        "finishedAt": crate::store::now_rfc3339()}}}],
            });
            Ok(())
        });
    }

    fn grace(&self) -> Duration {
        secs(&self.spec["terminationGracePeriodSeconds"], 30)
    }

    /// preStop, SIGTERM, SIGKILL at the end of the grace period.
    async fn terminate(&self, mut child: tokio::process::Child) {
        let deleted_at = Instant::now();
        let deadline = deleted_at + self.grace();
        let hook = &self.container()["lifecycle"]["preStop"];
        let pre_stop = async {
            if let Some(cmd) = hook["exec"]["command"].as_array() {
                let argv: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
                if let Some((prog, args)) = argv.split_first() {
                    let mut c = tokio::process::Command::new(prog);
                    c.args(args).kill_on_drop(true);
                    let _ = c.status().await;
                }
            } else if let Some(s) = hook["sleep"]["seconds"].as_u64() {
                tokio::time::sleep(Duration::from_secs(s)).await;
            } else if let Some(p) = Probe::of(hook, self.container(), self.port()) {
                let _ = http_get(self.ip, p.port, &p.path).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline.into(), pre_stop).await;
        lock(&self.shared).terminations.push(Termination {
            pod: self.key.name.clone(),
            ip: self.ip,
            port: self.port(),
            deleted_at,
            sigterm_at: Instant::now(),
        });
        // As the kubelet does: a preStop that used the whole grace period gets 2 s more.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        self.stop_process(&mut child, left).await;
        lock(&self.shared).groups.remove(&self.uid);
    }

    async fn stop_process(&self, child: &mut tokio::process::Child, grace: Duration) {
        if let Some(pid) = child.id() {
            kill_group(pid as i32, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            if let Some(pid) = child.id() {
                kill_group(pid as i32, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
    }

    /// Takes the finalizer off: the API removes a deleted pod's object then.
    async fn release(&self) {
        let r = self.store.modify(&self.key, false, |o| {
            if let Some(a) = o["metadata"]["finalizers"].as_array_mut() {
                a.retain(|f| f != FINALIZER);
            }
            Ok(())
        });
        if let Err(e) = r
            && !matches!(e, StoreError::NotFound(_))
        {
            eprintln!("kubelet: cannot release pod {}: {e}", self.key.name);
        }
    }
}

/// Waits `d`; true when the pod was deleted meanwhile.
async fn wait_or_term(term: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *term.borrow() {
        return true;
    }
    tokio::select! {
        _ = term.changed() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// `$(VAR)` replaced by VAR's value when it is defined before; `$$` is a `$`.
fn expand(v: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, val)) => out.push_str(val),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_the_kubelet_expands_them() {
        let env = vec![("PW".to_string(), "s3cret".to_string())];
        assert_eq!(
            expand("postgres://u:$(PW)@db/x", &env),
            "postgres://u:s3cret@db/x"
        );
        assert_eq!(expand("$(MISSING) $$(PW) $", &env), "$(MISSING) $(PW) $");
    }
}

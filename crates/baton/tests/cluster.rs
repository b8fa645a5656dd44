//! `baton` against a cluster, end to end: the real `baton operator` process (leader
//! election, health and metrics) on the in-memory API server, driven by the real CLI
//! (`baton -n NS status|promote|history|undo|abort`) and by the same binary as the
//! kubectl plugin; and `baton validate` on Rollouts written for a cluster.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_kube_fake::{FakeApi, sim};
use serde_json::{Value, json};

struct Operator(Child);

const AUDIT_KEY: &str = "a cluster's audit key, at least 16 bytes";

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn baton(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::baton_bin())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("baton runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn post(api: &FakeApi, path: &str, body: Value) {
    let store = api.store.clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, ns, resource) = match parts.as_slice() {
        ["api", v, "namespaces", ns, r] => (v.to_string(), *ns, *r),
        ["apis", g, v, "namespaces", ns, r] => (format!("{g}/{v}"), *ns, *r),
        _ => panic!("unexpected path {path}"),
    };
    store
        .create(
            &baton_kube_fake::Key::new(&gv, resource, Some(ns), ""),
            body,
        )
        .expect("create");
}

fn status_json(kc: &std::path::Path) -> Value {
    let (ok, out, _) = baton(kc, &["-n", "default", "status", "web", "-o", "json"]);
    if !ok {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

fn wait(kc: &std::path::Path, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = status_json(kc);
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 request: (status, head, body).
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), rest.to_string())
}

fn template(image: &str) -> Value {
    json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": image}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_rollouts_through_the_operator_on_a_cluster() {
    let api = FakeApi::start().await.expect("fake api");
    let _sim = sim::start(api.store.clone(), sim::SimConfig::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: default}}}}]\ncurrent-context: fake\n",
            api.url()
        ),
    )
    .expect("kubeconfig");
    let (health, metrics) = (common::free_addr(), common::free_addr());
    let _op = Operator(
        Command::new(common::baton_bin())
            .args([
                "operator",
                "--namespace",
                "default",
                "--leader-election-namespace",
                "default",
                "--identity",
                "op-1",
            ])
            .args([
                "--health-listen",
                &health.to_string(),
                "--metrics-listen",
                &metrics.to_string(),
            ])
            .env("KUBECONFIG", &kc)
            .env("BATON_AUDIT_KEY", AUDIT_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("baton operator starts"),
    );
    post(&api, "/api/v1/namespaces/default/services", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}}})).await;
    post(
        &api,
        "/apis/baton.dev/v1alpha1/namespaces/default/rollouts",
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": template("web:v1"),
                     "strategy": {"canary": {"stableService": "web", "steps": [{"setWeight": 50}, {"pause": {}}]}}},
        }),
    )
    .await;
    let v1_revision = wait(&kc, Duration::from_secs(30), "v1 healthy", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v1"
    })["stableRevision"]
        .clone();
    // Without a name: every Rollout of the namespace, in the same view.
    let (ok, out, err) = baton(&kc, &["-n", "default", "status", "-o", "json"]);
    assert!(ok, "{err}");
    let all: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(all["rollouts"][0]["name"], "web", "{all}");
    assert_eq!(all["rollouts"][0]["stableVersion"], "v1", "{all}");
    // `wait` gives the verdict as its exit status on a cluster too.
    let (ok, out, err) = baton(&kc, &["-n", "default", "wait", "web", "--timeout", "30s"]);
    assert!(ok, "wait: {out}{err}");

    // A new template pauses at 50 % (replica ratio: 1 of 2 pods) until promoted.
    let key = baton_kube_fake::Key::new("baton.dev/v1alpha1", "rollouts", Some("default"), "web");
    api.store
        .modify(&key, false, |o| {
            o["spec"]["template"] = template("web:v2");
            Ok(())
        })
        .expect("new template");
    wait(&kc, Duration::from_secs(30), "paused at 50 %", |v| {
        v["phase"] == "Paused" && v["canaryWeight"] == 50
    });
    // With no router the 50 % is 1 pod of 2, and the stable Service carries it only by
    // selecting both revisions' pods: never a weight that no request can reach.
    let svc_key = baton_kube_fake::Key::new("v1", "services", Some("default"), "web");
    let selector = api.store.get(&svc_key).expect("service")["spec"]["selector"].clone();
    assert_eq!(selector["baton.dev/rollout"], "web", "{selector}");
    assert!(selector.get("baton.dev/revision").is_none(), "{selector}");
    assert_eq!(
        selector["app"], "web",
        "the user's selector stays: {selector}"
    );
    let (_, text, _) = baton(&kc, &["-n", "default", "status", "web"]);
    assert!(text.contains("▶  2. pause until promoted"), "{text}");
    let (ok, out, err) = baton(&kc, &["-n", "default", "promote", "web"]);
    assert!(ok, "promote: {out}{err}");
    assert!(out.contains("the operator acted on it"), "{out}");
    wait(&kc, Duration::from_secs(30), "v2 stable", |v| {
        v["phase"] == "Healthy" && v["stableVersion"] == "v2"
    });
    let stable_rev = baton(&kc, &["-n", "default", "status", "web", "-o", "json"]).1;
    let stable_rev: Value = serde_json::from_str(&stable_rev).expect("status json");
    let selector = api.store.get(&svc_key).expect("service")["spec"]["selector"].clone();
    assert_eq!(
        selector["baton.dev/revision"], stable_rev["stableRevision"],
        "pinned to the new stable once it has all traffic: {selector}"
    );
    // kubectl's flags choose the kubeconfig and context (no KUBECONFIG here, and no
    // -n: they imply the cluster), and -o yaml gives the same document as YAML.
    let flagged = |args: &[&str]| {
        Command::new(common::baton_bin())
            .args(["--kubeconfig", kc.to_str().expect("utf-8"), "--context"])
            .args(args)
            .env("KUBECONFIG", dir.path().join("missing"))
            .env_remove("BATON_NAMESPACE")
            .output()
            .expect("baton runs")
    };
    let out = flagged(&["fake", "status", "web", "-o", "yaml"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        yaml.lines().any(|l| l == "stableVersion: v2"),
        "YAML, not JSON: {yaml}"
    );
    let out = flagged(&["elsewhere", "status", "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--context elsewhere"), "{err}");
    let (ok, out, _) = baton(&kc, &["-n", "default", "history", "web", "-o", "json"]);
    assert!(ok);
    let h: Value = serde_json::from_str(&out).expect("history json");
    assert_eq!(h["revisions"].as_array().map(Vec::len), Some(2), "{h}");
    // What changed between the two revisions: their pod templates.
    let (ok, out, err) = baton(
        &kc,
        &["-n", "default", "history", "web", "--diff", "1", "2"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("-") && out.contains("web:v1") && out.contains("+") && out.contains("web:v2"),
        "{out}"
    );
    assert!(out.contains("web #1") && out.contains("web #2"), "{out}");
    assert!(
        !out.contains("canonical-revision"),
        "only what the user changed, not the labels Baton adds: {out}"
    );
    // The operator's audit trail, read and verified as on one machine.
    let (ok, out, err) = baton(
        &kc,
        &["-n", "default", "audit", "--rollout", "web", "-o", "json"],
    );
    assert!(ok, "{err}");
    let entries: Value = serde_json::from_str(&out).expect("audit json");
    let entries = entries.as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|e| e["action"] == "promote"
            && e["actor"].as_str().is_some_and(|a| a.starts_with("claim:"))),
        "the promote request, its actor a claim: {entries:?}"
    );
    let (ok, out, err) = baton(&kc, &["-n", "default", "audit", "verify"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("intact"), "{out}");
    // Signed with the operator's key, its head beside the Lease.
    let key_file = dir.path().join("audit.key");
    std::fs::write(&key_file, AUDIT_KEY).expect("key file");
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let (ok, out, err) = baton(
        &kc,
        &[
            "-n",
            "default",
            "audit",
            "verify",
            "--heads-namespace",
            "default",
            "--audit-key-file",
            key_file.to_str().expect("utf-8 path"),
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("MACs checked") && out.contains("against their heads"),
        "{out}"
    );
    assert!(
        h["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "Request")),
        "the promote request is an Event: {h}"
    );

    // Undo puts v1's template back; abort then keeps v2.
    let (ok, out, err) = baton(&kc, &["-n", "default", "undo", "web"]);
    assert!(ok, "undo: {out}{err}");
    let again = wait(&kc, Duration::from_secs(30), "v1 rolling out again", |v| {
        v["canaryVersion"] == "v1" && v["phase"] == "Paused"
    });
    // The user's template exactly, so the same revision (and ReplicaSet) as before:
    // the labels Baton added to its pods are not carried back.
    assert_eq!(again["canaryRevision"], v1_revision, "{again}");
    // The same binary as the kubectl plugin: the cluster by default.
    let plugin = dir.path().join("kubectl-baton");
    std::os::unix::fs::symlink(common::baton_bin(), &plugin).expect("symlink");
    let out = Command::new(&plugin)
        .args(["abort", "web"])
        .env("KUBECONFIG", &kc)
        .output()
        .expect("plugin runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&kc, Duration::from_secs(30), "aborted back to v2", |v| {
        v["phase"] == "Degraded" && v["stableVersion"] == "v2"
    });

    // The web dashboard for the cluster: log in with the printed one-time link, read
    // the Rollouts, act on one (the operator does it).
    let dash_addr = common::free_addr();
    let mut dash = Operator(
        Command::new(common::baton_bin())
            .args([
                "-n",
                "default",
                "dashboard",
                "--listen",
                &dash_addr.to_string(),
            ])
            .env("KUBECONFIG", &kc)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("baton dashboard starts"),
    );
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = dash.0.stdout.take().expect("stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("login link");
    }
    let link = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a login link")
        .to_string();
    let path = link
        .trim_start_matches(&format!("http://{dash_addr}"))
        .to_string();
    let (code, headers, _) = http(dash_addr, "GET", &path, &[], "");
    assert_eq!(code, 303, "{headers}");
    let cookie = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_string();
    let (code, _, body) = http(
        dash_addr,
        "GET",
        "/ui/api/rollouts",
        &[("cookie", &cookie)],
        "",
    );
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(list["rollouts"][0]["name"], "web", "{list}");
    assert_eq!(list["rollouts"][0]["phase"], "Degraded", "{list}");
    let (_, _, session) = http(
        dash_addr,
        "GET",
        "/ui/api/session",
        &[("cookie", &cookie)],
        "",
    );
    let csrf = serde_json::from_str::<Value>(&session).expect("session")["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    let (code, _, _) = http(
        dash_addr,
        "POST",
        "/ui/api/rollouts/web/retry",
        &[("cookie", &cookie)],
        "",
    );
    assert_eq!(code, 403, "no CSRF token, no action");
    let (code, _, body) = http(
        dash_addr,
        "POST",
        "/ui/api/rollouts/web/retry",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("the operator acted on it"), "{body}");
    wait(&kc, Duration::from_secs(30), "v1 retried", |v| {
        v["canaryVersion"] == "v1" && v["phase"] != "Degraded"
    });
    drop(dash);

    // A wrong name is a clear error, and changes nothing.
    let (ok, _, err) = baton(&kc, &["-n", "default", "promote", "nope"]);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");

    let get = |addr: std::net::SocketAddr, path: &str| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    };
    assert!(get(health, "/healthz").starts_with("HTTP/1.1 200"));
    let m = get(metrics, "/metrics");
    assert!(m.contains("baton_operator_leader 1"), "{m}");
    assert!(m.contains("baton_operator_reconciles_total"), "{m}");
    // The driver's rollout metrics, the same as `baton up` serves: v2 was promoted, and
    // the next canary aborted by a person.
    let web = r#"namespace="default",rollout="web""#;
    assert!(
        m.contains(&format!("baton_rollouts_promoted_total{{{web}}} 1")),
        "{m}"
    );
    assert!(
        m.contains(
            r#"baton_rollouts_aborted_total{namespace="default",reason="user",rollout="web"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"baton_rollout_phase{namespace="default",phase="Degraded",rollout="web"} 0"#),
        "{m}"
    );
    let body = m.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let listed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/monitoring/metrics.txt"),
    )
    .expect("deploy/monitoring/metrics.txt");
    for name in listed.lines().filter(|n| n.starts_with("baton_operator_")) {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} not served: {body}"
        );
    }
    if let Some(f) = common::promtool_findings(body) {
        panic!("promtool check metrics: {f}\n{body}");
    }
}

/// `baton validate -f` on `yaml`, written to `name` in `dir`.
fn validate_yaml(dir: &std::path::Path, name: &str, yaml: &str) -> std::process::Output {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write");
    Command::new(common::baton_bin())
        .args(["validate", "-f"])
        .arg(&path)
        .output()
        .expect("validate")
}

#[test]
fn validate_checks_rollouts_written_for_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/overlays/exchange-trade/rollout.yaml");
    let out = Command::new(common::baton_bin())
        .args(["validate", "-f"])
        .arg(&good)
        .output()
        .expect("validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("for the Kubernetes operator"));
    let out = validate_yaml(
        dir.path(),
        "bad.yaml",
        "apiVersion: baton.dev/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  workloadRef: {name: web}\n  strategy:\n    canary:\n      trafficRouting: {gatewayApi: {httpRoute: web}}\n      steps: [{setWeight: 500}]\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.strategy.canary.trafficRouting") && err.contains("gatewayApi"),
        "{err}"
    );
    // Gates only `baton up` can measure are refused, not failed at every measurement.
    let out = validate_yaml(
        dir.path(),
        "local-only.yaml",
        "apiVersion: baton.dev/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  workloadRef: {name: web}\n  strategy:\n    canary:\n      trafficRouting: {gatewayAPI: {httpRoute: web}}\n      steps: [{setWeight: 50}, {analysis: {gates: [errors, api]}}]\n  analysis:\n    gates:\n      - {name: errors, metric: {builtin: error_rate}, successCondition: 'result < 0.01'}\n      - {name: api, metric: {smoke: [{path: /readyz}]}}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("spec.analysis.gates[0].metric")
            && err.contains("set spec.analysis.requestMetrics"),
        "{err}"
    );
    assert!(
        err.contains("spec.analysis.gates[1].metric") && err.contains("smoke"),
        "{err}"
    );
    // With the router's metrics in Prometheus, builtin gates have their cluster form
    // (the template follows the router); a custom template needs both queries.
    let with_metrics = |metrics: &str| {
        validate_yaml(
            dir.path(),
            "metrics.yaml",
            &format!(
                "apiVersion: baton.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  workloadRef: {{name: web}}\n  strategy:\n    canary:\n      stableService: web-stable\n      canaryService: web-canary\n      trafficRouting: {{gatewayAPI: {{httpRoute: web}}}}\n      steps: [{{setWeight: 50}}, {{analysis: {{gates: [errors]}}}}]\n  analysis:\n    requestMetrics: {metrics}\n    gates:\n      - {{name: errors, metric: {{builtin: error_rate}}, successCondition: 'result < 0.01'}}\n"
            ),
        )
    };
    let out = with_metrics("{address: 'http://prometheus.monitoring:9090'}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_metrics(
        "{address: 'http://prometheus.monitoring:9090', template: custom, requests: 'sum by (code) (x)'}",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("spec.analysis.requestMetrics.latency") && err.contains("custom"),
        "{err}"
    );
    // Mirroring happens in a router, and only with methods that exist.
    let out = validate_yaml(
        dir.path(),
        "mirrored.yaml",
        "apiVersion: baton.dev/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  workloadRef: {name: web}\n  strategy:\n    canary:\n      stableService: web\n      mirrorPercent: 10\n      mirrorMethods: [GET, get]\n      steps: [{setWeight: 50}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("spec.strategy.canary.mirrorPercent") && err.contains("trafficRouting"),
        "{err}"
    );
    assert!(
        err.contains("spec.strategy.canary.mirrorMethods[1]"),
        "{err}"
    );
}

#[test]
fn the_readmes_cluster_rollout_validates() {
    let readme = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md"),
    )
    .expect("README");
    let section = &readme[readme.find("## Kubernetes").expect("a Kubernetes section")..];
    let start = section.find("```yaml\n").expect("a YAML example") + "```yaml\n".len();
    let example = &section[start..start + section[start..].find("```").expect("its end")];
    for shown in [
        "progressive:",
        "statistical:",
        "burnRate:",
        "notifications:",
        "requestMetrics:",
    ] {
        assert!(example.contains(shown), "the example shows {shown}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollout.yaml");
    std::fs::write(&path, example).expect("write");
    let out = Command::new(common::baton_bin())
        .args(["validate", "-f"])
        .arg(&path)
        .output()
        .expect("validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn convert_turns_a_flagger_canary_into_a_rollout_that_validates() {
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/tests/fixtures/flagger/istio-canary.yaml");
    let out = Command::new(common::baton_bin())
        .args(["convert", "-f"])
        .arg(&fixture)
        .output()
        .expect("convert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(
        notes.contains("storefront: not carried over: webhook traffic"),
        "{notes}"
    );
    let mut validate = Command::new(common::baton_bin())
        .args(["validate", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("validate");
    use std::io::Write;
    validate
        .stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("write");
    let v = validate.wait_with_output().expect("validate output");
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        String::from_utf8_lossy(&v.stdout)
            .contains("rollout storefront is valid (for the Kubernetes operator)")
    );
}

/// `baton smoke`, what a cluster's smoke Job runs: the checks as JSON data, sent to a
/// URL; a header value with shell quotes in it is sent as written.
#[test]
fn baton_smoke_runs_the_checks_it_is_given_as_data() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let heads = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let answer = if head.starts_with("GET /readyz ") {
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nready"
            } else {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            };
            heads.lock().expect("lock").push(head);
            let mut stream = stream;
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let smoke = |tests: &str| {
        Command::new(common::baton_bin())
            .args([
                "smoke",
                "--url",
                &format!("http://{addr}"),
                "--tests",
                tests,
            ])
            .output()
            .expect("baton smoke")
    };
    let out = smoke(
        r#"[{"path": "/readyz", "headers": {"X-Probe": "it's $(fine)"}, "expectBodyContains": "ready"}]"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .any(|h| h.contains("it's $(fine)")),
        "the header went as written"
    );
    let out = smoke(r#"[{"path": "/readyz"}, {"path": "/orders"}]"#);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("smoke test failed") && err.contains("/orders"),
        "{err}"
    );
    let out = smoke("not json");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_image_changes_a_cluster_rollouts_template_and_nothing_else() {
    let api = FakeApi::start().await.expect("fake api");
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: default}}}}]\ncurrent-context: fake\n",
            api.url()
        ),
    )
    .expect("kubeconfig");
    let pod = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
        {"name": "web", "image": "web:v1"}, {"name": "sidecar", "image": "proxy:1"}]}});
    post(
        &api,
        "/apis/baton.dev/v1alpha1/namespaces/default/rollouts",
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": pod},
        }),
    )
    .await;
    post(
        &api,
        "/apis/baton.dev/v1alpha1/namespaces/default/rollouts",
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "taken"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "workloadRef": {"name": "api"}},
        }),
    )
    .await;
    let key = baton_kube_fake::Key::new("baton.dev/v1alpha1", "rollouts", Some("default"), "web");
    let images = || {
        let ro = api.store.get(&key).expect("rollout");
        ro["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["image"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };

    let (ok, out, err) = baton(&kc, &["-n", "default", "set", "image", "web", "web=web:v2"]);
    assert!(ok, "{err}");
    assert!(out.contains("web=web:v2"), "{out}");
    assert_eq!(images(), ["web:v2", "proxy:1"], "only the named container");

    for (args, says) in [
        (vec!["web", "nope=x:1"], "its containers: web, sidecar"),
        (vec!["web", "web"], "expected CONTAINER=IMAGE"),
        (vec!["taken", "api=api:2"], "workloadRef"),
    ] {
        let mut all = vec!["-n", "default", "set", "image"];
        all.extend(args);
        let (ok, _, err) = baton(&kc, &all);
        assert!(!ok && err.contains(says), "{all:?}: {err}");
    }
    assert_eq!(
        images(),
        ["web:v2", "proxy:1"],
        "a refused change changes nothing"
    );
    // On one machine there is no template to set: the spec's `run` is.
    let out = Command::new(common::baton_bin())
        .args(["--dir", dir.path().join("state").to_str().expect("utf-8")])
        .args(["set", "image", "web", "web=web:v3"])
        .env_remove("BATON_NAMESPACE")
        .output()
        .expect("baton");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("baton apply"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

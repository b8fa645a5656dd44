//! Real `kubectl` (installed here and in CI; these tests fail, never skip, without it)
//! against the `baton-kube-fake` binary. `kubectl apply` runs with `--validate=false`:
//! the fake serves no OpenAPI schemas (see the crate docs).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Cluster {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    fn start(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton-kube-fake"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start baton-kube-fake");
        // The address comes out once it listens (or stdout closes when it fails).
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read address");
        assert!(line.starts_with("http://127.0.0.1:"), "printed {line:?}");
        Cluster { child, dir }
    }

    fn crds() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
    }

    /// Runs kubectl; its stdout, or a panic with what it said.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_raw(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl")
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .output()
            .expect("kubectl is installed (it is in CI too)")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.kubectl(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    fn apply(&self, manifest: &str) -> String {
        let path = self.dir.path().join("manifest.yaml");
        std::fs::write(&path, manifest).expect("write manifest");
        self.kubectl(&[
            "apply",
            "--validate=false",
            "-f",
            path.to_str().expect("utf-8"),
        ])
    }

    fn with_crds(&self) -> String {
        let crds = Cluster::crds();
        self.kubectl(&[
            "apply",
            "--validate=false",
            "-k",
            crds.to_str().expect("utf-8"),
        ])
    }
}

const ROLLOUT: &str = "apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1
  strategy:
    canary:
      steps:
      - setWeight: 50
";

#[test]
fn apply_k_creates_the_three_crds_and_discovery_serves_them() {
    let c = Cluster::start(&[]);
    let out = c.with_crds();
    assert!(out.contains("rollouts.baton.dev created"), "{out}");
    let list = c.json(&["get", "crds", "-o", "json"]);
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "clustergatetemplates.baton.dev",
            "gatetemplates.baton.dev",
            "rollouts.baton.dev"
        ]
    );
    let resources = c.kubectl(&["api-resources", "--api-group=baton.dev", "-o", "wide"]);
    let row = resources
        .lines()
        .find(|l| l.starts_with("rollouts "))
        .unwrap_or_else(|| panic!("no rollouts in {resources}"));
    assert!(
        row.contains("brl") && row.contains("true") && row.contains("Rollout"),
        "{row}"
    );
    let cluster_scoped = resources
        .lines()
        .find(|l| l.starts_with("clustergatetemplates "))
        .unwrap_or_else(|| panic!("no clustergatetemplates in {resources}"));
    assert!(cluster_scoped.contains("false"), "{cluster_scoped}");
}

#[test]
fn a_rollout_applied_is_listed_shown_and_found_by_its_short_name() {
    let c = Cluster::start(&[]);
    c.with_crds();
    assert!(c.apply(ROLLOUT).contains("rollout.baton.dev/web created"));
    let list = c.json(&["get", "rollouts", "-o", "json"]);
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    assert_eq!(list["items"][0]["kind"], "Rollout");
    let yaml = c.kubectl(&["get", "rollout", "web", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Rollout") && yaml.contains("setWeight: 50"),
        "{yaml}"
    );
    assert!(yaml.contains("creationTimestamp:"), "{yaml}");
    assert_eq!(
        c.kubectl(&["get", "brl", "-o", "name"]).trim(),
        "rollout.baton.dev/web"
    );
    // A second apply is a no-op patch, not a conflict.
    let again = c.apply(ROLLOUT);
    assert!(again.contains("unchanged"), "{again}");
}

#[test]
fn the_table_has_the_crds_printer_columns() {
    let c = Cluster::start(&[]);
    c.with_crds();
    c.apply(ROLLOUT);
    let table = c.kubectl(&["get", "rollouts"]);
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "PHASE", "STABLE", "CANARY", "WEIGHT", "AGE"] {
        assert!(
            header.split_whitespace().any(|h| h == col),
            "{col} in {table}"
        );
    }
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with("web ")),
        "{table}"
    );
    // Built-in resources get Name and Age.
    c.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n");
    let cms = c.kubectl(&["get", "configmaps"]);
    assert!(
        cms.starts_with("NAME") && cms.contains("AGE") && cms.contains("cfg"),
        "{cms}"
    );
}

#[test]
fn a_status_patch_shows_in_get_and_in_the_table() {
    let c = Cluster::start(&[]);
    c.with_crds();
    c.apply(ROLLOUT);
    c.kubectl(&[
        "patch",
        "rollout",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Paused"}}"#,
    ]);
    let phase = c.kubectl(&["get", "rollout", "web", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Paused");
    let table = c.kubectl(&["get", "rollouts"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("Paused")),
        "{table}"
    );
}

#[test]
fn delete_waits_for_the_finalizer() {
    let c = Cluster::start(&[]);
    c.with_crds();
    c.apply(ROLLOUT);
    c.kubectl(&[
        "patch",
        "rollout",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["baton.dev/test"]}}"#,
    ]);
    // Without --wait=false kubectl waits for the object to go, as with a real server.
    c.kubectl(&["delete", "rollout", "web", "--wait=false"]);
    let obj = c.json(&["get", "rollout", "web", "-o", "json"]);
    assert!(obj["metadata"]["deletionTimestamp"].is_string(), "{obj}");
    c.kubectl(&[
        "patch",
        "rollout",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    let gone = c.kubectl_raw(&["get", "rollout", "web"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}

#[test]
fn an_empty_list_has_its_kind_from_the_crd() {
    let c = Cluster::start(&[]);
    c.with_crds();
    let raw = c.json(&[
        "get",
        "--raw",
        "/apis/baton.dev/v1alpha1/namespaces/default/rollouts",
    ]);
    assert_eq!(raw["kind"], "RolloutList");
    assert_eq!(raw["apiVersion"], "baton.dev/v1alpha1");
}

#[test]
fn with_sim_a_deployment_gets_ready_pods() {
    let c = Cluster::start(&["--sim"]);
    c.apply(
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 2
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
      - {name: app, image: nginx:1}
",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = c.json(&["get", "deployment", "app", "-o", "json"]);
        if d["status"]["readyReplicas"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {}", d["status"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_dry_run_is_refused_not_written() {
    let c = Cluster::start(&[]);
    c.with_crds();
    let path = c.dir.path().join("rollout.yaml");
    std::fs::write(&path, ROLLOUT).expect("write manifest");
    let out = c.kubectl_raw(&[
        "apply",
        "--validate=false",
        "--dry-run=server",
        "-f",
        path.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dryRun is not supported"));
    let list = c.json(&["get", "rollouts", "-o", "json"]);
    assert_eq!(list["items"], serde_json::json!([]));
}

#[test]
fn server_side_apply_creates_then_updates_and_records_its_manager() {
    let c = Cluster::start(&[]);
    c.with_crds();
    let path = c.dir.path().join("ssa.yaml");
    std::fs::write(&path, ROLLOUT).expect("write");
    let p = path.to_str().expect("utf-8");
    let out = c.kubectl(&["apply", "--server-side", "--validate=false", "-f", p]);
    assert!(out.contains("serverside-applied"), "{out}");
    std::fs::write(&path, ROLLOUT.replace("setWeight: 50", "setWeight: 20")).expect("write");
    c.kubectl(&["apply", "--server-side", "--validate=false", "-f", p]);
    let obj = c.json(&[
        "get",
        "rollout",
        "web",
        "-o",
        "json",
        "--show-managed-fields",
    ]);
    assert_eq!(
        obj["spec"]["strategy"]["canary"]["steps"][0]["setWeight"], 20,
        "{obj}"
    );
    let managers = obj["metadata"]["managedFields"].to_string();
    assert!(managers.contains("kubectl"), "{managers}");
    assert!(obj["metadata"]["generation"].as_i64() >= Some(2), "{obj}");
}

#[test]
fn set_image_changes_the_image_and_keeps_the_rest_of_the_container() {
    let c = Cluster::start(&[]);
    c.apply(
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: api
        image: api:1
        env: [{name: DB, value: sqlite}]
        ports: [{containerPort: 8080}]
",
    );
    // kubectl sends a strategic merge patch naming the container and its image only.
    c.kubectl(&["set", "image", "deployment/api", "api=api:2"]);
    let d = c.json(&["get", "deployment", "api", "-o", "json"]);
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "api:2", "{d}");
    assert_eq!(container["env"][0]["value"], "sqlite", "{d}");
    assert_eq!(container["ports"][0]["containerPort"], 8080, "{d}");
    assert!(!d.to_string().contains("$setElementOrder"), "{d}");
}

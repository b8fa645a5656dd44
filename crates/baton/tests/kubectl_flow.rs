//! The README's cluster flow without a cluster ("Trying it without a cluster"), as a
//! user runs it: the `baton-kube-fake` process with its simulated cluster, the real
//! `baton operator`, real `kubectl` and `kubectl baton` (the same binary under the
//! plugin's name). Every `kubectl` line of the README's block runs here, in its order,
//! so the README and this test cannot drift apart.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The lines of the README's block under "Trying it without a cluster", without
/// their comments.
fn readme_flow() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let section = readme
        .split("### Trying it without a cluster")
        .nth(1)
        .expect("the README has its section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in it");
    block
        .lines()
        .map(|l| l.split("  #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct User {
    kubeconfig: PathBuf,
    bin: PathBuf,
    home: PathBuf,
}

impl User {
    /// Runs one command line of the README (words split on spaces, no quoting needed).
    fn run(&self, line: &str) -> Output {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (prog, args) = words.split_first().expect("a command");
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(prog);
        // kubectl's discovery cache under a home of the test's own (a flag before a
        // plugin's name is refused).
        cmd.args(args)
            .env("HOME", &self.home)
            .current_dir(repo())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", path)
            .output()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn ok(&self, line: &str) -> String {
        let out = self.run(line);
        assert!(out.status.success(), "`{line}` failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_fake(kubeconfig: &Path) -> Kill {
    let mut child = Command::new(common::baton_bin().with_file_name("baton-kube-fake"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--sim")
        .stdout(Stdio::piped())
        .spawn()
        .expect("baton-kube-fake (built with the workspace's binaries)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("its address");
    assert!(line.starts_with("http://127.0.0.1:"), "printed {line:?}");
    Kill(child)
}

#[test]
fn the_readmes_cluster_flow_runs_with_kubectl_and_kubectl_baton() {
    let flow = readme_flow();
    // The steps a user does by hand before and between kubectl's, done here.
    assert!(flow[0].starts_with("cargo run -p baton-kube-fake -- --kubeconfig"));
    assert!(
        flow.iter()
            .any(|l| l.starts_with("baton operator --namespace default"))
    );
    assert!(flow.iter().any(|l| l.contains("kubectl-baton")));
    let kubectl: Vec<&String> = flow.iter().filter(|l| l.starts_with("kubectl ")).collect();
    assert!(kubectl.len() >= 10, "{flow:?}");

    common::hello_bin(); // builds the workspace's binaries, baton-kube-fake among them
    let dir = tempfile::tempdir().expect("tempdir");
    let user = User {
        kubeconfig: dir.path().join("fake.kubeconfig"),
        bin: dir.path().join("bin"),
        home: dir.path().join("home"),
    };
    let _fake = start_fake(&user.kubeconfig);
    std::fs::create_dir_all(&user.bin).expect("bin");
    std::os::unix::fs::symlink(common::baton_bin(), user.bin.join("kubectl-baton"))
        .expect("the plugin's name");
    std::os::unix::fs::symlink(common::baton_bin(), user.bin.join("baton")).expect("baton");
    let mut operator: Option<Kill> = None;

    for line in kubectl {
        // The operator runs once the CRDs are there, as in the README.
        if operator.is_none() && !line.contains("deploy/crds") {
            operator = Some(Kill(
                Command::new(common::baton_bin())
                    .args(["operator", "--namespace", "default"])
                    // Port 0: nothing here reads them, and a port picked in advance can be
                    // taken by another test's connection before the operator binds it.
                    .args(["--health-listen", "127.0.0.1:0"])
                    .args(["--metrics-listen", "127.0.0.1:0"])
                    .env("KUBECONFIG", &user.kubeconfig)
                    .env("BATON_AUDIT_KEY", "the flow's audit key, 16 bytes or more")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("baton operator"),
            ));
        }
        eprintln!("$ {line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["kubectl", "apply", .., "-k", "deploy/crds/"] => {
                let out = user.ok(line);
                assert!(out.contains("rollouts.baton.dev created"), "{out}");
            }
            ["kubectl", "apply", .., "-f", _] => {
                let out = user.ok(line);
                assert!(out.contains("rollout.baton.dev/web created"), "{out}");
            }
            ["kubectl", "get", "rollouts"] => {
                let out = user.run(line);
                let said = text(&out);
                if said.contains("No resources found") {
                    continue; // the last line, after the delete: checked below
                }
                // The printer columns, once the operator has made v1 stable.
                let table = wait_for(Duration::from_secs(30), "web Healthy in the table", || {
                    let t = user.ok(line);
                    t.contains("Healthy").then_some(t)
                });
                let head = table.lines().next().unwrap_or("");
                for col in ["NAME", "PHASE", "STABLE", "CANARY", "WEIGHT", "AGE"] {
                    assert!(head.contains(col), "{table}");
                }
                assert!(table.contains("web") && table.contains("v1"), "{table}");
            }
            ["kubectl", "baton", "status", "web"] => {
                let out = user.ok(line);
                assert!(out.contains("web") && out.contains("v1"), "{out}");
            }
            ["kubectl", "baton", "set", "image", ..] => {
                user.ok(line);
            }
            ["kubectl", "baton", "wait", "web", "--for", "paused"] => {
                user.ok(&format!("{line} --timeout 30s"));
                let out = user.ok("kubectl baton status web -o json");
                let v: serde_json::Value = serde_json::from_str(&out).expect("json");
                assert_eq!(v["phase"], "Paused", "{v}");
                assert_eq!(v["canaryWeight"], 50, "{v}");
                assert_eq!(v["canaryVersion"], "v2", "{v}");
            }
            ["kubectl", "baton", "promote", "web"] => {
                let out = user.ok(line);
                assert!(out.contains("promote"), "{out}");
            }
            ["kubectl", "baton", "wait", "web"] => {
                user.ok(&format!("{line} --timeout 30s"));
                let out = user.ok("kubectl baton status web -o json");
                let v: serde_json::Value = serde_json::from_str(&out).expect("json");
                assert_eq!(v["phase"], "Healthy", "{v}");
                assert_eq!(v["stableVersion"], "v2", "{v}");
            }
            ["kubectl", "baton", "history", "web"] => {
                let out = user.ok(line);
                assert!(out.contains("v1") && out.contains("v2"), "{out}");
            }
            ["kubectl", "get", "rollout", "web", "-o", "yaml"] => {
                let out = user.ok(line);
                assert!(out.contains("kind: Rollout"), "{out}");
                assert!(out.contains("phase: Healthy"), "{out}");
                assert!(out.contains("baton.dev/example-hello:v2"), "{out}");
            }
            ["kubectl", "delete", "rollout", "web"] => {
                let out = user.ok(line);
                assert!(out.contains("deleted"), "{out}");
                // Gone once the operator let its finalizer go (if it holds one).
                wait_for(Duration::from_secs(30), "the rollout gone", || {
                    let t = text(&user.run("kubectl get rollouts"));
                    t.contains("No resources found").then_some(t)
                });
            }
            other => {
                panic!("the README's flow has a kubectl line this test does not know: {other:?}")
            }
        }
    }
}

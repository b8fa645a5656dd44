//! Helpers for end-to-end tests: the real `baton` binary, the real `hello` service, a
//! state directory of their own, and cleanup that stops every process they started.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use baton::api::ApiClient;
use baton::paths::Paths;
use serde_json::Value;

pub fn baton_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

/// The `hello` example, built beside `baton`. Built once per test process, so a
/// changed example is never tested stale (cargo makes this a no-op when up to date);
/// with the workspace, as `scripts/test` builds it, since `-p hello` unifies features
/// differently and rebuilt it every time.
pub fn hello_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = baton_bin().with_file_name("hello");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "--workspace", "--bins"]);
            if baton_bin().components().any(|c| c.as_os_str() == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo runs");
            assert!(status.success(), "building hello failed");
            assert!(path.exists(), "{} missing after build", path.display());
            path
        })
        .clone()
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr")
}

/// A canary spec of `hello` with the given steps (YAML list items, indented 8).
pub fn canary_spec(listen: SocketAddr, version: &str, extra_env: &str, steps: &str) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: hello }}
spec:
  replicas: 2
  run:
    command: ["{hello}", "--port", "{{port}}"]
    env: {{ APP_VERSION: {version}{extra_env} }}
  probes:
    readiness: {{ httpGet: {{ path: /readyz }}, periodSeconds: 0.2, failureThreshold: 2 }}
    liveness: {{ httpGet: {{ path: /healthz }}, periodSeconds: 1, failureThreshold: 3 }}
  minReadySeconds: 1
  shutdown: {{ preStopSeconds: 0.5, drainTimeoutSeconds: 5 }}
  traffic: {{ listen: "{listen}" }}
  strategy:
    canary:
      steps:
{steps}
  analysis:
    gates:
      - name: errors
        metric: {{ builtin: error_rate }}
        successCondition: "result <= 0.01"
        interval: 1s
        minRequests: 20
      - name: p99
        metric: {{ builtin: latency_p99 }}
        successCondition: "result < 0.8"
        interval: 1s
        minRequests: 20
"#,
        hello = hello_bin().display()
    )
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub paths: Paths,
    pub up: Option<Child>,
    /// Environment variables for `baton up` only.
    pub up_env: Vec<(String, String)>,
    /// A file-descriptor limit for `baton up` only (run under `prlimit`).
    pub up_nofile: Option<u64>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(dir.path().join(".baton"));
        Env {
            dir,
            paths,
            up: None,
            up_env: Vec::new(),
            up_nofile: None,
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write spec");
        p
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(baton_bin());
        c.arg("--dir")
            .arg(&self.paths.root)
            .current_dir(self.dir.path())
            // The audit trail's head and key go under the test's own state home.
            .env("XDG_STATE_HOME", self.state_home())
            .env_remove("BATON_AUDIT_KEY")
            .env_remove("BATON_AUDIT_KEY_FILE")
            .env_remove("BATON_AUDIT_HEAD");
        c
    }

    /// `$XDG_STATE_HOME` of every command run here.
    pub fn state_home(&self) -> PathBuf {
        self.dir.path().join("state-home")
    }

    /// Runs a CLI command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("baton runs")
    }

    /// Starts `baton up` with these extra arguments and waits for its API.
    pub fn start_up(&mut self, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .expect("log");
        let mut cmd = match self.up_nofile {
            Some(n) => {
                // prlimit sets the limit and execs baton: the pid stays the same.
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(baton_bin())
                    .arg("--dir")
                    .arg(&self.paths.root)
                    .current_dir(self.dir.path());
                c
            }
            None => self.cmd(),
        };
        let child = cmd
            .arg("up")
            .args(args)
            .envs(self.up_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("baton up starts");
        let pid = child.id();
        self.up = Some(child);
        // The API address file is rewritten by every controller: wait for this one's.
        wait_until(Duration::from_secs(30), "the controller's API", || {
            let mine = std::fs::read_to_string(self.paths.controller_pid())
                .is_ok_and(|t| t.starts_with(&format!("{pid}:")));
            mine && std::fs::read_to_string(self.paths.api_addr()).is_ok()
        });
    }

    /// Starts `baton up` and waits until `rollout` is Healthy; returns the API client.
    pub async fn start_healthy(&mut self, args: &[&str], rollout: &str) -> ApiClient {
        self.start_up(args);
        let client = self.client();
        wait_status(
            &client,
            rollout,
            Duration::from_secs(30),
            "the first revision to be healthy",
            |v| v["phase"] == "Healthy",
        )
        .await;
        client
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::from_paths(&self.paths).expect("api client")
    }

    pub fn up_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .arg("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.up.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Nothing of ours may outlive the test.
        let _ = self
            .cmd()
            .arg("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the rollout's status until `done` holds; panics with the last status otherwise.
pub async fn wait_status(
    client: &ApiClient,
    name: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok((200, v)) = client.get(&format!("/v1/rollouts/{name}")).await {
            if done(&v) {
                return v;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "timed out after {limit:?} waiting for {what}; last status:\n{}",
        serde_json::to_string_pretty(&last).unwrap_or_default()
    );
}

/// Waits until `version` (its APP_VERSION) is the stable revision of a Healthy rollout.
pub async fn wait_stable(client: &ApiClient, name: &str, version: &str, limit: Duration) -> Value {
    let what = format!("{version} stable");
    wait_status(client, name, limit, &what, |v| {
        v["phase"] == "Healthy" && stable_version(v).as_deref() == Some(version)
    })
    .await
}

pub fn revision<'a>(v: &'a Value, app_version: &str) -> Option<&'a Value> {
    v["revisions"]
        .as_array()?
        .iter()
        .find(|r| r["appVersion"] == app_version)
}

pub fn weight(v: &Value, app_version: &str) -> u64 {
    revision(v, app_version)
        .and_then(|r| r["weight"].as_u64())
        .unwrap_or(0)
}

pub fn stable_version(v: &Value) -> Option<String> {
    let name = v["stableRevision"].as_str()?;
    v["revisions"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)?["appVersion"]
        .as_str()
        .map(str::to_string)
}

pub fn acked(v: &Value) -> bool {
    v["routerAcked"].as_u64() >= v["routeVersion"].as_u64()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn pids(v: &Value) -> Vec<u64> {
    let mut p: Vec<u64> = v["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["instances"].as_array().into_iter().flatten())
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    p.sort();
    p
}

/// Whether `pid` runs: a zombie (exited, not yet reaped) has no command line left.
pub fn alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `GET path` on a fresh connection; the body as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = s.send_request(req).await.expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// `POST path` with a JSON body on a fresh connection: the status and the body.
pub async fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .expect("request");
    let resp = s.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `promtool check metrics` on a scrape: its lint findings, if any (the rollout
/// metrics tests on both platforms).
pub fn promtool_findings(scrape: &str) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

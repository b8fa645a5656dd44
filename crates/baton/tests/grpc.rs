//! gRPC end to end: the tonic example (`examples/grpc-hello`) rolled out with
//! `traffic.backendProtocol: h2c`, under the reference client (Python's grpcio) making
//! unary calls and holding server streams open.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Env, free_addr, hello_bin, path_str, stderr, wait_stable, wait_status};
use serde_json::Value;

fn grpc_hello_bin() -> PathBuf {
    // Built with the workspace's binaries, as `hello` is.
    hello_bin().with_file_name("grpc-hello")
}

/// A canary of the gRPC example: two steps, then promoted, unless the builtin error
/// rate (read from the grpc-status of each answer) fails it.
fn spec(listen: SocketAddr, version: &str, extra_env: &str) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: greeter }}
spec:
  replicas: 2
  run:
    command: ["{bin}", "--port", "{{port}}"]
    env: {{ APP_VERSION: {version}{extra_env} }}
  probes:
    readiness: {{ httpGet: {{ path: /readyz }}, periodSeconds: 0.2, failureThreshold: 2 }}
    liveness: {{ httpGet: {{ path: /healthz }}, periodSeconds: 1, failureThreshold: 3 }}
  minReadySeconds: 1
  shutdown: {{ preStopSeconds: 0.5, drainTimeoutSeconds: 5 }}
  traffic: {{ listen: "{listen}", backendProtocol: h2c }}
  strategy:
    canary:
      steps:
        - setWeight: 20
        - pause: {{ duration: 2s }}
        - setWeight: 50
        - pause: {{ duration: 2s }}
  analysis:
    gates:
      - name: errors
        metric: {{ builtin: error_rate }}
        successCondition: "result <= 0.01"
        interval: 1s
        minRequests: 20
  rollback: {{ onFailure: true }}
"#,
        bin = grpc_hello_bin().display()
    )
}

/// The Python that has grpcio: the test venv `scripts/deps` makes, else the PATH's.
fn python() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    let venv = cache.join("baton-test-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The grpcio client, running until `finish`.
struct Client(Child);

impl Client {
    fn start(listen: SocketAddr) -> Client {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_client.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(listen.to_string())
            .args(["4", "2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python runs (scripts/deps installs grpcio in the test venv)");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut first)
            .expect("client output");
        assert_eq!(
            first.trim(),
            "started",
            "the grpcio client did not start (pip install grpcio; scripts/test does)"
        );
        Client(child)
    }

    /// Stops the load and returns what it saw.
    fn finish(mut self) -> Value {
        drop(self.0.stdin.take());
        let mut out = String::new();
        BufReader::new(self.0.stdout.as_mut().expect("stdout"))
            .read_line(&mut out)
            .expect("client report");
        let _ = self.0.wait();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("client report {out:?}: {e}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_fails_no_call_and_a_failing_version_is_rolled_back_by_grpc_status() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "greeter").await;

    // v1 → v2 under unary calls and open streams: no call fails.
    let load = Client::start(listen);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v2 = env.write("v2.yaml", &spec(listen, "v2", ""));
    let applied = env.run(&["apply", "-f", path_str(&v2)]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    wait_stable(&client, "greeter", "v2", Duration::from_secs(60)).await;
    // Past v1's drain (preStop 0.5 s, then its streams end), and a little v2 alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A proxy hot restart under the same load: calls in flight finish on the old
    // process, new ones go to the new one, open streams end with UNAVAILABLE and
    // reconnect.
    let out = env.run(&["restart-proxy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.finish();
    eprintln!("v1 → v2 over gRPC: {seen}");
    assert!(count(&seen, "calls") > 200, "too few calls: {seen}");
    assert_eq!(
        count(&seen, "ok"),
        count(&seen, "calls"),
        "calls failed across a good canary: {seen}"
    );
    for v in ["v1", "v2"] {
        assert!(
            count(&seen["versions"], v) > 0,
            "{v} never answered: {seen}"
        );
    }
    assert!(count(&seen, "ticks") > 0, "no stream ticked: {seen}");
    assert_eq!(
        seen["stream_errors"],
        serde_json::json!({}),
        "streams may only end cleanly (UNAVAILABLE while draining): {seen}"
    );
    assert!(
        count(&seen["tick_versions"], "v2") > 0,
        "the watchers reconnected to v2: {seen}"
    );
    assert_eq!(
        count(&seen["stream_ends"], "proxy restarting"),
        2,
        "both watchers' streams were ended by the restart, cleanly: {seen}"
    );

    // v3 answers INTERNAL to half its calls, with HTTP status 200: the builtin error
    // rate reads the grpc-status, fails the canary, and v2 stays.
    let load = Client::start(listen);
    let v3 = env.write("v3.yaml", &spec(listen, "v3", ", FAIL_RATE: \"0.5\""));
    let applied = env.run(&["apply", "-f", path_str(&v3)]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    let rolled = wait_status(
        &client,
        "greeter",
        Duration::from_secs(60),
        "v3 rolled back",
        |v| v["phase"] == "Degraded" && common::weight(v, "v3") == 0 && common::acked(v),
    )
    .await;
    let seen = load.finish();
    eprintln!("v3 over gRPC: {seen}\nstatus: {rolled}");
    assert_eq!(common::stable_version(&rolled).as_deref(), Some("v2"));
    assert!(
        count(&seen["errors"], "INTERNAL") > 0,
        "v3's failures reached no one? {seen}"
    );
    let msg = rolled["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("gate errors"),
        "the error-rate gate failed it: {msg}"
    );
    let messages = seen["error_messages"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        messages.keys().all(|m| m == "v3 fails on purpose"),
        "only v3's own answers failed: {seen}"
    );
    assert_eq!(
        seen["stream_errors"],
        serde_json::json!({}),
        "streams may only end cleanly: {seen}"
    );
}

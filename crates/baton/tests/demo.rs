//! `baton demo` stopped midway (Ctrl-C, SIGTERM) still stops what it started. Its
//! proxy and instances outlive a controller by design (a controller crash must not
//! take traffic down), so nothing else would: a timed-out test once left a whole
//! exchange running.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{alive, path_str, pids, wait_until};

#[tokio::test]
async fn a_demo_stopped_midway_stops_its_proxy_and_instances() {
    let hello = common::hello_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo");
    let state = work.join(".baton");
    let log = std::fs::File::create(dir.path().join("demo.log")).expect("log");
    let mut demo = Command::new(common::baton_bin())
        .args(["demo", "--example", "hello", "--rate", "50", "--hello"])
        .arg(&hello)
        .arg("--workdir")
        .arg(&work)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("baton demo starts");

    // Whatever happens below, nothing of this test outlives it.
    struct Cleanup<'a>(&'a mut std::process::Child, &'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = Command::new(common::baton_bin())
                .arg("--dir")
                .arg(self.1)
                .arg("down")
                .output();
        }
    }
    let pid = demo.id();
    let demo = Cleanup(&mut demo, &state);
    let status = |name: &str| {
        let out = Command::new(common::baton_bin())
            .args(["--dir", path_str(&state), "status", name, "-o", "json"])
            .output()
            .expect("baton status runs");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let mut instances = Vec::new();
    wait_until(
        Duration::from_secs(60),
        "the demo's v1 to be healthy",
        || match status("hello") {
            Some(v) if v["phase"] == "Healthy" => {
                instances = pids(&v);
                !instances.is_empty()
            }
            _ => false,
        },
    );
    let proxy = baton_proxy::ProxyClient::new(baton::paths::Paths::new(&state).proxy_socket());
    let (proxy_pid, _) = proxy.ping().await.expect("the demo's proxy answers");
    let proxy = vec![u64::from(proxy_pid)];
    assert!(instances.iter().chain(&proxy).all(|p| alive(*p)));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the demo");
    let mut exit = None;
    wait_until(Duration::from_secs(30), "the demo to exit", || {
        exit = demo.0.try_wait().expect("wait");
        exit.is_some()
    });
    let text = std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    assert!(
        !exit.expect("exited").success(),
        "a stopped demo is not a success:\n{text}"
    );
    assert!(text.contains("stopped (SIGTERM)"), "{text}");
    let left: Vec<u64> = instances
        .iter()
        .chain(&proxy)
        .copied()
        .filter(|p| alive(*p))
        .collect();
    assert!(
        left.is_empty(),
        "still running after the demo stopped: {left:?}\n{text}"
    );
}

//! Gates before traffic: a command run once the new revision's instances are ready and
//! before it gets a request (a migration, a signature check). A failing one means the
//! revision never serves.

mod common;

use std::time::Duration;

use baton::load::Load;
use common::*;

fn spec(listen: std::net::SocketAddr, version: &str, check: &str) -> String {
    canary_spec(
        listen,
        version,
        "",
        "        - setWeight: 50\n        - pause: { duration: 1s }",
    )
    .replace(
        "  analysis:\n    gates:\n",
        &format!(
            "  analysis:\n    preTraffic: [migrate]\n    gates:\n      - name: migrate\n        metric: {{ command: {{ command: {check} }} }}\n        interval: 1s\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_traffic_gate_runs_once_before_traffic_and_a_failing_one_never_serves() {
    let mut env = Env::new();
    let listen = free_addr();
    let log = env.dir.path().join("migrations.log");
    let migrate = format!(
        r#"["sh", "-c", "echo $BATON_REVISION >> {}"]"#,
        log.display()
    );
    let v1 = env.write("v1.yaml", &spec(listen, "v1", &migrate));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let load = Load::start(listen, 2, 100);

    // A migration that works: run once, then the canary goes on.
    let v2 = env.write("v2.yaml", &spec(listen, "v2", &migrate));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let done = wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    let v2_rev = revision(&done, "v2")
        .and_then(|r| r["name"].as_str())
        .map(str::to_string)
        .expect("v2's revision");
    assert_eq!(
        ran.lines().filter(|l| *l == v2_rev).count(),
        1,
        "the migration ran once for v2: {ran:?}"
    );

    // A check that fails: v3 is aborted and never answers a request.
    let v3 = env.write("v3.yaml", &spec(listen, "v3", r#"["false"]"#));
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    let bad = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v3 aborted before traffic",
        |v| v["phase"] == "Degraded",
    )
    .await;
    let msg = bad["message"].as_str().unwrap_or("");
    assert!(msg.contains("before traffic: gate migrate failed"), "{msg}");
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    assert!(
        !r.by_version.contains_key("v3"),
        "v3 served no request: {:?}",
        r.by_version.keys()
    );
    assert!(r.by_version.contains_key("v2"), "v2 did serve");
    let audit = stdout(&env.run(&["audit", "--rollout", "hello"]));
    assert!(
        audit.contains("before traffic: gate migrate failed"),
        "{audit}"
    );
}

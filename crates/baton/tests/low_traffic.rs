//! Low traffic: a healthy canary with a few slow requests is not rolled back; a
//! canary that is slow throughout is, on the same traffic, by the statistical judge.

mod common;

use std::time::Duration;

use baton::load::Load;
use common::*;

/// The gates: errors, and latency judged against stable by statistics — not the p99
/// threshold of the shared spec, which a few slow requests in a small window trip.
fn spec(listen: std::net::SocketAddr, version: &str, extra_env: &str) -> String {
    canary_spec(listen, version, extra_env, "        - setWeight: 50\n        - analysis: { gates: [errors, latency] }")
        .replace(
            "      - name: p99\n        metric: { builtin: latency_p99 }\n        successCondition: \"result < 0.8\"\n        interval: 1s\n        minRequests: 20\n",
            "",
        )
        .replace(
            "  analysis:\n    gates:\n",
            r#"  analysis:
    gates:
      - name: latency
        metric: { builtin: latency_p99 }
        statistical: { confidence: 0.99, tolerance: 0.1 }
        interval: 1s
        minRequests: 300
        count: 1
"#,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_slow_requests_do_not_roll_back_a_healthy_canary() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    // Fifty requests a second in all: about twenty-five to the canary.
    let load = Load::start(listen, 2, 50);

    // Each v2 instance answers its first request in 0.8 s: two slow requests, enough
    // to trip a p99 threshold over a small window.
    let v2 = env.write(
        "v2.yaml",
        &spec(listen, "v2", ", SLOW_REQUESTS: \"1\", SLOW_MS: \"800\""),
    );
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_stable(&client, "hello", "v2", Duration::from_secs(90)).await;
    let audit = stdout(&env.run(&["audit", "--rollout", "hello"]));
    assert!(
        audit.contains("gate latency: latency_p99"),
        "the statistical gate judged v2: {audit}"
    );

    // The same traffic, a canary slow throughout: rolled back.
    let v3 = env.write("v3.yaml", &spec(listen, "v3", ", LATENCY_MS: \"300\""));
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    let bad = wait_status(
        &client,
        "hello",
        Duration::from_secs(90),
        "v3 rolled back",
        |v| v["phase"] == "Degraded",
    )
    .await;
    let msg = bad["message"].as_str().unwrap_or("");
    // By the window's statistics or, as soon as the evidence allows, by the
    // sequential test of the p99 against stable's.
    assert!(
        msg.contains("gate latency failed")
            && (msg.contains("HIGH") || msg.contains("sequential test 99 % sure the latency_p99")),
        "{msg}"
    );
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

/// The sequential test acts before the gate's interval: a canary failing every request
/// is rolled back long before the first window of a `60s` gate could be judged, and
/// the reason names the sequential test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_every_request_is_rolled_back_before_its_first_interval() {
    let mut env = Env::new();
    let listen = free_addr();
    let slow_gate = |version: &str, extra_env: &str| {
        canary_spec(
            listen,
            version,
            extra_env,
            "        - setWeight: 20\n        - pause: { duration: 120s }",
        )
        .replace(
            "        successCondition: \"result <= 0.01\"\n        interval: 1s\n",
            "        successCondition: \"result <= 0.01\"\n        interval: 60s\n",
        )
    };
    let v1 = env.write("v1.yaml", &slow_gate("v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let load = Load::start(listen, 2, 50);
    let v2 = env.write("v2.yaml", &slow_gate("v2", ", FAIL_RATE: \"1\""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    // From the moment v2 serves (router-confirmed 20 %), the first window of a 60 s
    // gate is judged 60 s later at the earliest.
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;
    let serving = std::time::Instant::now();
    let bad = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 rolled back",
        |v| v["phase"] == "Degraded" && weight(v, "v2") == 0 && acked(v),
    )
    .await;
    let took = serving.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    let msg = bad["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("gate errors failed") && msg.contains("sequential test 99 % sure"),
        "{msg}"
    );
    let r = load.stop().await;
    assert!(
        r.failures_not_from("v2").is_empty(),
        "only v2's own answers failed: {:?}",
        r.failures_not_from("v2")
    );
    let v2_failed = r.by_version.get("v2").map_or(0, |c| c.failed);
    assert!(
        (1..=60).contains(&v2_failed),
        "v2 served a handful of requests before it was out: {v2_failed}"
    );
}

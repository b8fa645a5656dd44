//! Faults a user meets, end to end: what Baton reports done is what the data plane does.

mod common;

use std::time::Duration;

use baton_proxy::ProxyClient;
use common::*;

const PAUSED: &str = "        - setWeight: 20
        - pause: {}";

fn audit_reasons(env: &Env, rollout: &str) -> Vec<String> {
    let out = env.run(&["audit", "--rollout", rollout, "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// A rollout whose listener another process holds fails alone: the others move on, an
/// abort is served (not only reported), status shows served beside desired weights,
/// the refusal is audited once, and the rollout recovers when the port frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbindable_listener_fails_only_its_own_rollout() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", PAUSED));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;

    // Another program holds the port a second rollout asks for.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr");
    let other = canary_spec(taken, "v1", "", PAUSED)
        .replace("metadata: { name: hello }", "metadata: { name: other }");
    let other = env.write("other.yaml", &other);
    let out = env.run(&["apply", "-f", path_str(&other)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = wait_status(
        &client,
        "other",
        Duration::from_secs(30),
        "the refusal in other's status",
        |v| {
            v["routingError"]
                .as_str()
                .is_some_and(|e| e.contains("cannot listen"))
        },
    )
    .await;
    let served: Vec<u64> = refused["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["servedWeight"].as_u64())
        .collect();
    assert!(
        served.iter().all(|w| *w == 0),
        "nothing of other is served: {refused:#}"
    );

    // The first rollout still moves: an abort is confirmed by the proxy and served.
    let out = env.run(&["abort", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the abort served",
        |v| {
            weight(v, "v2") == 0
                && acked(v)
                && revision(v, "v2").is_some_and(|r| r["servedWeight"] == 0)
        },
    )
    .await;
    assert_eq!(
        revision(&v, "v1").map(|r| r["servedWeight"].clone()),
        Some(100.into()),
        "{v:#}"
    );
    for _ in 0..40 {
        assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");
    }

    // The proxy is asked again every 2 s; the refusal is recorded once.
    let proxy = ProxyClient::new(env.paths.proxy_socket());
    let (_, first) = proxy.ping().await.expect("ping");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy.ping().await.expect("ping").1 < first + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy was not asked again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons = audit_reasons(&env, "other");
    let told = reasons
        .iter()
        .filter(|r| r.contains("cannot serve this rollout's new route"))
        .count();
    assert_eq!(told, 1, "{reasons:#?}");

    // The port frees: other is served as asked.
    drop(squatter);
    wait_status(
        &client,
        "other",
        Duration::from_secs(30),
        "other served",
        |v| v["routingError"].is_null() && acked(v) && v["phase"] == "Healthy",
    )
    .await;
    assert_eq!(http_get(taken, "/").await.trim(), "hello from v1");
}

/// A restarted controller knows the route the proxy already serves: an aborted canary,
/// stopped long ago, is not started again (and stopped) on every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_start_an_aborted_revision_again() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", PAUSED));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;
    assert!(env.run(&["abort", "hello"]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the aborted canary's instances gone",
        |v| acked(v) && revision(v, "v2").is_none_or(|r| r["instances"] == serde_json::json!([])),
    )
    .await;
    let started = |env: &Env| {
        audit_reasons(env, "hello")
            .iter()
            .filter(|r| r.starts_with("started instance") && r.contains("of revision"))
            .count()
    };
    let before = started(&env);

    let mut up = env.up.take().expect("controller");
    up.kill().expect("kill");
    up.wait().expect("reaped");
    let proxy = ProxyClient::new(env.paths.proxy_socket());
    let (_, table) = proxy
        .ping()
        .await
        .expect("the proxy outlives the controller");
    env.start_up(&[]);
    // The new controller's first tick reconciles instances, then pushes its table.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.ping().await.expect("ping").1 <= table {
        assert!(
            std::time::Instant::now() < deadline,
            "no table from the new controller"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = wait_status(
        &env.client(),
        "hello",
        Duration::from_secs(10),
        "status",
        |v| v["phase"] == "Degraded",
    )
    .await;
    assert_eq!(
        started(&env),
        before,
        "an instance was started after the restart: {v:#}"
    );
}

//! Blue-green, rolling, and instance crashes, end to end.

mod common;

use std::time::{Duration, Instant};

use baton::load::Load;
use common::*;

fn blue_green_spec(
    listen: std::net::SocketAddr,
    preview: std::net::SocketAddr,
    version: &str,
    extra_env: &str,
    auto: bool,
) -> String {
    format!(
        r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: shop }}
spec:
  replicas: 2
  run:
    command: ["{hello}", "--port", "{{port}}"]
    env: {{ APP_VERSION: {version}{extra_env} }}
  probes:
    readiness: {{ httpGet: {{ path: /readyz }}, periodSeconds: 0.2 }}
  shutdown: {{ preStopSeconds: 0.5, drainTimeoutSeconds: 5 }}
  traffic: {{ listen: "{listen}" }}
  strategy:
    blueGreen:
      previewListen: "{preview}"
      autoPromote: {auto}
      smoke:
        - path: /readyz
        - path: /
          expectBodyContains: "hello from"
      retainPrevious: 1h
"#,
        hello = hello_bin().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_previews_switches_and_undoes_instantly() {
    let mut env = Env::new();
    let (listen, preview) = (free_addr(), free_addr());
    let v1 = env.write(
        "v1.yaml",
        &blue_green_spec(listen, preview, "v1", "", false),
    );
    let client = env.start_healthy(&["-f", path_str(&v1)], "shop").await;
    let load = Load::start(listen, 4, 300);

    let v2 = env.write(
        "v2.yaml",
        &blue_green_spec(listen, preview, "v2", "", false),
    );
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let waiting = wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "v2 previewed and smoke-tested",
        |v| v["phase"] == "Paused" && acked(v),
    )
    .await;
    assert_eq!(
        weight(&waiting, "v2"),
        0,
        "no user traffic before the switch"
    );
    assert_eq!(http_get(preview, "/").await.trim(), "hello from v2");
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");

    assert!(env.run(&["promote", "shop"]).status.success());
    let switched = wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "the switch",
        |v| v["phase"] == "Healthy" && stable_version(v).as_deref() == Some("v2") && acked(v),
    )
    .await;
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v2");
    let previous = revision(&switched, "v1").expect("v1 retained");
    assert_eq!(previous["role"], "previous");
    assert_eq!(
        previous["readyReplicas"], 2,
        "the previous stack keeps running"
    );
    let v1_pids: Vec<u64> = previous["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();

    // Undo goes back to the retained stack: a switch, no start-up.
    let started = Instant::now();
    let out = env.run(&["undo", "shop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("rolling back to #1"),
        "{}",
        stdout(&out)
    );
    // The undo re-applies v1 with autoPromote false: it waits for promote after smoke.
    wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "v1 previewed again",
        |v| v["phase"] == "Paused",
    )
    .await;
    assert!(env.run(&["promote", "shop"]).status.success());
    let back = wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "back on v1",
        |v| v["phase"] == "Healthy" && stable_version(v).as_deref() == Some("v1") && acked(v),
    )
    .await;
    eprintln!("undo to the retained stack took {:?}", started.elapsed());
    let now_pids: Vec<u64> = revision(&back, "v1").expect("v1")["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    assert_eq!(
        now_pids, v1_pids,
        "the retained instances serve again, none restarted"
    );

    // A v3 that fails its smoke tests never gets user traffic.
    let v3 = env.write(
        "v3.yaml",
        &blue_green_spec(listen, preview, "v3", ", FAIL_RATE: \"1\"", true),
    );
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    let failed = wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "v3 refused",
        |v| v["phase"] == "Degraded",
    )
    .await;
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or("")
            .contains("smoke tests failed"),
        "{}",
        failed["message"]
    );
    assert_eq!(weight(&failed, "v3"), 0);
    let r = load.stop().await;
    eprintln!("blue-green: {} requests, {} failed", r.sent, r.failed);
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    assert_eq!(
        r.by_version.get("v3").map_or(0, |c| c.ok + c.failed),
        0,
        "v3 never served users"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_replaces_every_instance_without_a_failure() {
    let mut env = Env::new();
    let listen = free_addr();
    let spec = |version: &str| {
        format!(
            r#"apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: {{ name: api }}
spec:
  replicas: 3
  run: {{ command: ["{hello}", "--port", "{{port}}"], env: {{ APP_VERSION: {version} }} }}
  probes: {{ readiness: {{ httpGet: {{ path: /readyz }}, periodSeconds: 0.2 }} }}
  shutdown: {{ preStopSeconds: 0.5, drainTimeoutSeconds: 5 }}
  traffic: {{ listen: "{listen}" }}
  strategy: {{ rolling: {{ maxSurge: 1, maxUnavailable: 0 }} }}
"#,
            hello = hello_bin().display()
        )
    };
    let v1 = env.write("v1.yaml", &spec("v1"));
    env.start_up(&["-f", path_str(&v1)]);
    let client = env.client();
    wait_status(&client, "api", Duration::from_secs(30), "v1 healthy", |v| {
        v["phase"] == "Healthy"
    })
    .await;
    let load = Load::start(listen, 4, 400);
    let v2 = env.write("v2.yaml", &spec("v2"));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = client.get("/v1/rollouts/api").await.expect("status");
        let running: u64 = v["revisions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["desiredReplicas"].as_u64().unwrap_or(0))
            .sum();
        most = most.max(running);
        if v["phase"] == "Healthy"
            && stable_version(&v).as_deref() == Some("v2")
            && revision(&v, "v1").is_none()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rolling update did not finish: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= 4,
        "never more than replicas + maxSurge desired (saw {most})"
    );
    let r = load.stop().await;
    eprintln!(
        "rolling: {} requests, {} failed, by version {:?}",
        r.sent,
        r.failed,
        r.by_version.keys().collect::<Vec<_>>()
    );
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    assert!(r.by_version.contains_key("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_replaced_and_no_request_fails() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write(
        "v1.yaml",
        &canary_spec(listen, "v1", "", "        - setWeight: 50"),
    );
    env.start_up(&["-f", path_str(&v1)]);
    let client = env.client();
    let before = wait_status(&client, "hello", Duration::from_secs(30), "healthy", |v| {
        v["phase"] == "Healthy"
    })
    .await;
    let load = Load::start(listen, 4, 400);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = pids(&before)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let after = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "a replacement",
        |v| {
            let p = pids(v);
            p.len() == 2
                && !p.contains(&victim)
                && revision(v, "v1").is_some_and(|r| r["readyReplicas"] == 2)
        },
    )
    .await;
    let restarts = revision(&after, "v1").and_then(|r| r["instances"][0]["restarts"].as_u64());
    assert_eq!(restarts, Some(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = load.stop().await;
    eprintln!("crash: {} requests, {} failed", r.sent, r.failed);
    assert_eq!(
        r.failed, 0,
        "idempotent requests to the dead instance are retried: {:?}",
        r.failures
    );
    assert!(
        env.up_log().contains("exited unexpectedly"),
        "{}",
        env.up_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_liveness_restarts_with_growing_backoff() {
    let mut env = Env::new();
    let listen = free_addr();
    let spec = canary_spec(
        listen,
        "v1",
        ", UNHEALTHY_AFTER_MS: \"300\"",
        "        - setWeight: 50",
    )
    .replace("replicas: 2", "replicas: 1")
    .replace(
        "liveness: { httpGet: { path: /healthz }, periodSeconds: 1, failureThreshold: 3 }",
        "liveness: { httpGet: { path: /healthz }, periodSeconds: 0.1, failureThreshold: 2 }",
    );
    let v1 = env.write("v1.yaml", &spec);
    env.start_up(&["-f", path_str(&v1)]);
    // Each instance turns unhealthy 300 ms after start: killed, replaced, again.
    wait_until(Duration::from_secs(30), "three liveness restarts", || {
        env.up_log().matches("replacing it in").count() >= 3
    });
    let log = env.up_log();
    assert!(
        log.matches("failed liveness").count() <= log.matches("exited unexpectedly").count() + 1,
        "each failing instance is killed once: {log}"
    );
    let delays: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("replacing it in ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(delays.len() >= 2, "{log}");
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "backoff grows: {delays:?}"
    );
    let (_, v) = env
        .client()
        .get("/v1/rollouts/hello")
        .await
        .expect("status");
    let restarts = revision(&v, "v1")
        .and_then(|r| r["restarts"].as_u64())
        .unwrap_or(0);
    assert!(restarts >= 2, "{v}");
}

/// A blue-green judged after the switch: v2 passes its smoke tests (its first answer on
/// each instance is good), then fails half of its users' requests; the gate, still
/// judging the new stack, switches traffic back to v1's warm instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_back_when_the_new_stack_fails_after_the_switch() {
    let mut env = Env::new();
    let (listen, preview) = (free_addr(), free_addr());
    let spec = |version: &str, extra_env: &str| {
        blue_green_spec(listen, preview, version, extra_env, true).replace(
            "      retainPrevious: 1h\n",
            "      retainPrevious: 1h\n      postPromotionAnalysis: 60s\n  analysis:\n    gates:\n      - name: errors\n        metric: { builtin: error_rate }\n        successCondition: \"result < 0.01\"\n        interval: 5s\n",
        )
    };
    let v1 = env.write("v1.yaml", &spec("v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "shop").await;
    let before = pids(&wait_stable(&client, "shop", "v1", Duration::from_secs(30)).await);
    let load = Load::start(listen, 4, 200);
    let v2 = env.write("v2.yaml", &spec("v2", ", FAIL_RATE: \"0.5\""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "the switch",
        |v| stable_version(v).as_deref() == Some("v2") && acked(v),
    )
    .await;
    let back = wait_status(
        &client,
        "shop",
        Duration::from_secs(30),
        "switched back to v1",
        |v| v["phase"] == "Degraded" && stable_version(v).as_deref() == Some("v1") && acked(v),
    )
    .await;
    let msg = back["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("after the switch: gate errors failed") && msg.contains("switched back to"),
        "{msg}"
    );
    assert_eq!(weight(&back, "v1"), 100);
    let r = load.stop().await;
    assert!(
        r.failures_not_from("v2").is_empty(),
        "only v2's own answers failed: {:?}",
        r.failures_not_from("v2")
    );
    // The same v1 instances served before and after: a switch, not a redeploy.
    let after = pids(&back);
    assert!(
        before.iter().all(|p| after.contains(p)),
        "v1's warm instances: {before:?} then {after:?}"
    );
}

/// A canary with `retainPrevious`: after the cutover the previous revision keeps
/// running, and `undo` is a switch to those same processes, without steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_undo_within_its_retain_window_switches_to_the_warm_revision() {
    let mut env = Env::new();
    let listen = free_addr();
    let spec = |version: &str| {
        canary_spec(
            listen,
            version,
            "",
            "        - setWeight: 20\n        - pause: { duration: 1h }",
        )
        .replace("      steps:\n", "      retainPrevious: 1h\n      steps:\n")
    };
    let v1 = env.write("v1.yaml", &spec("v1"));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let before = pids(&wait_stable(&client, "hello", "v1", Duration::from_secs(30)).await);
    let load = Load::start(listen, 4, 200);
    let v2 = env.write("v2.yaml", &spec("v2"));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;
    assert!(env.run(&["promote", "hello", "--full"]).status.success());
    let promoted = wait_stable(&client, "hello", "v2", Duration::from_secs(30)).await;
    let kept = revision(&promoted, "v1").expect("v1 kept");
    assert_eq!(kept["readyReplicas"], 2, "v1 kept warm: {kept}");

    let undo = std::time::Instant::now();
    assert!(env.run(&["undo", "hello"]).status.success());
    let back = wait_stable(&client, "hello", "v1", Duration::from_secs(30)).await;
    let took = undo.elapsed();
    // Through the steps it would hold an hour at 20 %.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let after = pids(&back);
    assert!(
        before.iter().all(|p| after.contains(p)),
        "the same v1 processes: {before:?} then {after:?}"
    );
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

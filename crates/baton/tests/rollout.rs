//! End to end: the real `baton` binary, the real `hello` service, real load.

mod common;

use std::time::Duration;

use baton::load::Load;
use common::*;

const STEPS_TO_PAUSE: &str = "        - setWeight: 10
        - pause: { duration: 2s }
        - analysis: { gates: [errors, p99] }
        - setWeight: 50
        - analysis: { gates: [errors, p99] }
        - pause: {}";

/// v1 → v2 on a canary under continuous load without one failed request, then a broken
/// v3 rolled back on its own, its bad answers the only failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_under_load_then_automatic_rollback() {
    let mut env = Env::new();
    let listen = free_addr();
    let metrics = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", STEPS_TO_PAUSE));
    let client = env
        .start_healthy(
            &[
                "-f",
                path_str(&v1),
                "--metrics-listen",
                &metrics.to_string(),
            ],
            "hello",
        )
        .await;

    let load = Load::start(listen, 16, 2500);
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", STEPS_TO_PAUSE));
    let applied = env.run(&["apply", "-f", path_str(&v2)]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(stdout(&applied).contains("rollout hello configured"));
    let sent_before = load.report().sent;

    // Through the weights and analyses to the final pause.
    let paused = wait_status(
        &client,
        "hello",
        Duration::from_secs(60),
        "the canary's final pause",
        |v| v["phase"] == "Paused",
    )
    .await;
    assert_eq!(weight(&paused, "v2"), 50);
    assert_eq!(weight(&paused, "v1"), 50);
    // Stay there until at least 20,000 requests went through this canary.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while load.report().sent < sent_before + 20_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "load too slow: {:?}",
            load.report().sent
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = env.run(&["promote", "hello"]);
    assert!(promoted.status.success(), "{}", stderr(&promoted));
    let done = wait_stable(&client, "hello", "v2", Duration::from_secs(30)).await;
    assert_eq!(weight(&done, "v2"), 100);
    let r = load.report();
    let during = r.sent - sent_before;
    eprintln!(
        "v1 → v2: {during} requests during the canary, {} failed; by version {:?}",
        r.failed, r.by_version
    );
    assert!(during >= 20_000);
    assert_eq!(
        r.failed, 0,
        "failures during a good rollout: {:?}",
        r.failures
    );
    assert!(r.by_version.get("v1").is_some_and(|c| c.ok > 1000));
    assert!(r.by_version.get("v2").is_some_and(|c| c.ok > 1000));

    // The proxy's metrics, as Prometheus would scrape them.
    let text = http_get(metrics, "/metrics").await;
    let v2_name = revision(&done, "v2")
        .and_then(|r| r["name"].as_str())
        .expect("v2 name")
        .to_string();
    assert!(
        text.contains(&format!(
            "http_requests_total{{service=\"hello\",version=\"{v2_name}\",code=\"2xx\"}}"
        )),
        "{text}"
    );
    assert!(text.contains("http_request_duration_seconds_bucket{service=\"hello\""));

    // A broken v3: half its answers are 500s.
    let v3 = env.write(
        "v3.yaml",
        &canary_spec(listen, "v3", ", FAIL_RATE: \"0.5\"", STEPS_TO_PAUSE),
    );
    let applied = env.run(&["apply", "-f", path_str(&v3)]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    let rolled = wait_status(
        &client,
        "hello",
        Duration::from_secs(60),
        "v3 rolled back",
        |v| v["phase"] == "Degraded" && weight(v, "v3") == 0 && acked(v),
    )
    .await;
    let rolled_back_at = baton::now_ms();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = load.stop().await;

    assert_eq!(stable_version(&rolled).as_deref(), Some("v2"));
    assert_eq!(weight(&rolled, "v2"), 100);
    let out = env.run(&["status", "hello", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(status["phase"], "Degraded");
    let msg = status["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("gate errors") || msg.contains("gate p99"),
        "reason names the gate: {msg}"
    );
    let v3c = r.by_version.get("v3").cloned().unwrap_or_default();
    eprintln!(
        "v3: {} answers, {} bad; first bad → rollback confirmed in {} ms; total failed {}",
        v3c.ok + v3c.failed,
        v3c.failed,
        v3c.first_failure_ms.map_or(0, |f| rolled_back_at - f),
        r.failed
    );
    assert!(v3c.failed > 0, "v3 took traffic and failed some of it");
    for f in &r.failures {
        assert_eq!(f.version, "v3", "a failure not from v3: {f:?}");
        assert_eq!(f.status, Some(500), "{f:?}");
        assert!(
            f.at_ms <= rolled_back_at,
            "v3 failed a request after the rollback: {f:?}"
        );
    }
    assert_eq!(r.failed, v3c.failed);
    let history = env.run(&["history", "hello"]);
    assert!(stdout(&history).contains("aborted"), "{}", stdout(&history));
}

/// The controller dies mid-canary: traffic flows on; a new controller adopts the proxy
/// and the instances and resumes at the same step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_crash_mid_canary_loses_nothing() {
    let mut env = Env::new();
    let listen = free_addr();
    let steps = "        - setWeight: 20
        - pause: {}
        - setWeight: 60
        - pause: { duration: 1s }";
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", steps));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let load = Load::start(listen, 8, 800);
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", steps));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let before = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the pause at 20 %",
        |v| v["phase"] == "Paused" && weight(v, "v2") == 20 && acked(v),
    )
    .await;
    let proxy = baton_proxy::ProxyClient::new(env.paths.proxy_socket());
    let (proxy_pid, _) = proxy.ping().await.expect("proxy answers");
    let instance_pids = pids(&before);
    assert_eq!(instance_pids.len(), 4);

    // SIGKILL: no chance to clean up.
    let mut up = env.up.take().expect("controller");
    up.kill().expect("kill");
    up.wait().expect("reaped");
    let at_kill = load.report();
    // Status still answers, from the state directory.
    let out = env.run(&["status", "hello", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(offline["controller"], "down");
    assert_eq!(offline["phase"], "Paused");
    assert_eq!(weight(&offline, "v2"), 20);
    assert_eq!(pids(&offline), instance_pids);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_dead = load.report();
    assert!(
        while_dead.sent > at_kill.sent + 500,
        "load kept flowing: {} → {}",
        at_kill.sent,
        while_dead.sent
    );
    assert_eq!(
        while_dead.failed, 0,
        "failures while the controller was dead: {:?}",
        while_dead.failures
    );
    assert!(
        while_dead.by_version["v2"].ok > at_kill.by_version["v2"].ok,
        "the canary kept its share"
    );

    // What the release before the driver wrote: the engine's status alone, with no
    // outbox and no event count. The new controller reads it and goes on.
    {
        let db = rusqlite::Connection::open(env.paths.db()).expect("state db");
        let stored: String = db
            .query_row(
                "SELECT status FROM rollouts WHERE name = 'hello'",
                [],
                |r| r.get(0),
            )
            .expect("stored status");
        let mut old: serde_json::Value = serde_json::from_str(&stored).expect("json");
        let o = old.as_object_mut().expect("object");
        assert!(o.remove("events").is_some(), "the driver counts events");
        o.remove("outbox");
        assert_eq!(o["stepIndex"], 1);
        db.execute(
            "UPDATE rollouts SET status = ?1 WHERE name = 'hello'",
            [old.to_string()],
        )
        .expect("write the old format");
    }
    env.start_up(&[]);
    let client = env.client();
    let after = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the resumed rollout",
        |v| v["phase"] == "Paused" && acked(v),
    )
    .await;
    assert_eq!(
        after["step"]["index"], before["step"]["index"],
        "resumed at the same step"
    );
    assert_eq!(weight(&after, "v2"), 20);
    assert_eq!(pids(&after), instance_pids, "the same instances, adopted");
    assert_eq!(
        proxy.ping().await.expect("proxy").0,
        proxy_pid,
        "the same proxy, adopted"
    );
    assert!(
        env.up_log().contains("adopted instance"),
        "{}",
        env.up_log()
    );

    assert!(env.run(&["promote", "hello"]).status.success());
    wait_stable(&client, "hello", "v2", Duration::from_secs(30)).await;
    let r = load.stop().await;
    eprintln!(
        "{} requests across the controller crash, {} failed",
        r.sent, r.failed
    );
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_canary_holds_its_step_past_a_timed_pause_until_resumed_and_wait_tells() {
    let mut env = Env::new();
    let listen = free_addr();
    let steps = "        - setWeight: 20
        - pause: { duration: 2s }
        - setWeight: 60";
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", steps));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", steps));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;
    let out = env.run(&["pause", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused at step"), "{}", stdout(&out));
    let again = env.run(&["pause", "hello"]);
    assert!(!again.status.success(), "pausing twice is refused");
    assert!(
        stderr(&again).contains("already paused"),
        "{}",
        stderr(&again)
    );
    // Twice the timed pause: held, at the same weight.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, v) = client.get("/v1/rollouts/hello").await.expect("status");
    assert_eq!(v["phase"], "Paused", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("paused by user"),
        "{v}"
    );
    assert_eq!(weight(&v, "v2"), 20, "{v}");
    // `wait` says where it stands with its exit status: held, so not healthy in time.
    let waited = env.run(&["wait", "hello", "--timeout", "1s"]);
    assert_eq!(waited.status.code(), Some(2), "{}", stderr(&waited));
    let out = env.run(&["resume", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let waited = env.run(&["wait", "hello", "--for", "healthy", "--timeout", "60s"]);
    assert!(waited.status.success(), "{}", stderr(&waited));
    let v = wait_stable(&client, "hello", "v2", Duration::from_secs(5)).await;
    assert_eq!(v["specRevision"], v["stableRevision"], "{v}");
    let waited = env.run(&["wait", "hello", "--for", "degraded", "--timeout", "30s"]);
    assert_eq!(waited.status.code(), Some(1), "healthy is another verdict");
    let audit = env.run(&["audit", "--rollout", "hello", "--output", "json"]);
    let text = stdout(&audit);
    assert!(
        text.contains("\"pause\"") && text.contains("\"resume\""),
        "pause and resume are audited: {text}"
    );
}

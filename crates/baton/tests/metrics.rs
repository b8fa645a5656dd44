//! The rollout metrics on a live `baton up`: served on the proxy's `--metrics-listen`
//! address beside its request metrics, moving as a canary is promoted and as a broken
//! one is rolled back, and clean by `promtool check metrics`.

mod common;

use std::time::{Duration, Instant};

use baton::load::Load;
use baton_driver::metrics::sample;
use common::*;

const STEPS: &str = "        - setWeight: 20
        - analysis: { gates: [errors] }
        - setWeight: 50
        - analysis: { gates: [errors] }";

/// Scrapes until `ok` holds of the text, or fails naming `what` with the last scrape.
async fn scrape_until(addr: std::net::SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = http_get(addr, "/metrics").await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: last scrape:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_metrics_move_with_a_promotion_and_a_rollback() {
    let mut env = Env::new();
    let (listen, metrics) = (free_addr(), free_addr());
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", STEPS));
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
    let load = Load::start(listen, 4, 400);
    let rollout = r#"rollout="hello""#;

    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", STEPS));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let done = wait_stable(&client, "hello", "v2", Duration::from_secs(90)).await;
    let v2_rev = revision(&done, "v2").expect("v2")["name"]
        .as_str()
        .expect("name")
        .to_string();
    let text = scrape_until(metrics, "v2 promoted and served", |t| {
        sample(t, &format!("baton_rollouts_promoted_total{{{rollout}}}")) == Some(1.0)
            && sample(
                t,
                &format!(r#"baton_rollout_served_weight{{{rollout},revision="{v2_rev}"}}"#),
            ) == Some(100.0)
    })
    .await;
    assert_eq!(
        sample(&text, &format!("baton_rollouts_started_total{{{rollout}}}")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Healthy"}}"#)
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            &format!(r#"baton_gate_verdicts_total{{{rollout},gate="errors",result="pass"}}"#)
        )
        .is_some_and(|n| n >= 2.0),
        "both analysis steps passed: {text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"baton_rollout_duration_seconds_count{{{rollout},result="promoted"}}"#)
        ),
        Some(1.0)
    );
    // One scrape target per machine: the proxy's request metrics are there too.
    assert!(
        text.contains("http_requests_total{service=\"hello\""),
        "{text}"
    );
    if let Some(f) = promtool_findings(&text) {
        panic!("promtool check metrics: {f}\n{text}");
    }

    // A broken v3: half its answers are 500s, so the error gate rolls it back.
    let v3 = env.write(
        "v3.yaml",
        &canary_spec(listen, "v3", ", FAIL_RATE: \"0.5\"", STEPS),
    );
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(90),
        "v3 rolled back",
        |v| v["phase"] == "Degraded" && weight(v, "v3") == 0 && acked(v),
    )
    .await;
    let text = scrape_until(metrics, "the rollback timed", |t| {
        sample(
            t,
            &format!("baton_rollout_time_to_rollback_seconds_count{{{rollout}}}"),
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            &format!(r#"baton_rollouts_rolled_back_total{{{rollout},reason="gate"}}"#)
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("baton_rollouts_started_total{{{rollout}}}")),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Degraded"}}"#)
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            &format!(r#"baton_gate_verdicts_total{{{rollout},gate="errors",result="fail"}}"#)
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"baton_rollout_served_weight{{{rollout},revision="{v2_rev}"}}"#)
        ),
        Some(100.0),
        "all traffic confirmed back on v2: {text}"
    );
    let took = sample(
        &text,
        &format!("baton_rollout_time_to_rollback_seconds_sum{{{rollout}}}"),
    )
    .expect("a rollback time");
    eprintln!("time to rollback as the metric reports it: {took} s");
    assert!(took > 0.0 && took < 30.0, "{took}");
    if let Some(f) = promtool_findings(&text) {
        panic!("promtool check metrics: {f}\n{text}");
    }
    // Every metric the shipped dashboard and alerts may use (deploy/monitoring checks
    // they use no other) is served here, but the operator's (the cluster test's).
    let listed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/monitoring/metrics.txt"),
    )
    .expect("deploy/monitoring/metrics.txt");
    let missing: Vec<&str> = listed
        .lines()
        .filter(|n| !n.is_empty() && !n.starts_with("baton_operator_"))
        .filter(|n| !text.contains(&format!("# TYPE {n} ")))
        .collect();
    assert!(missing.is_empty(), "not served: {missing:?}\n{text}");
    drop(load);
}

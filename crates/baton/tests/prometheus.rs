//! Gates on PromQL against a real Prometheus that scrapes the proxy's `/metrics`: the
//! classic alert query `histogram_quantile(0.99, rate(http_request_duration_seconds_bucket[30s])) > 0.800`
//! as written, with label filters added and the comparison as the gate's condition.

mod common;

use std::time::Duration;

use baton::load::Load;
use baton_kube_fake::prometheus::Prometheus;
use common::*;

fn spec(
    listen: std::net::SocketAddr,
    prom: std::net::SocketAddr,
    version: &str,
    extra_env: &str,
) -> String {
    canary_spec(listen, version, extra_env, "        - setWeight: 50\n        - analysis: { gates: [p99-prom] }")
        .replace(
            "  analysis:\n    gates:\n",
            &format!(
                r#"  analysis:
    gates:
      - name: p99-prom
        metric:
          prometheus:
            address: "http://{prom}"
            query: 'histogram_quantile(0.99, rate(http_request_duration_seconds_bucket{{service="{{{{service}}}}",version="{{{{revision}}}}"}}[30s]))'
        failureCondition: "result > 0.800"
        interval: 1s
        count: 3
"#
            ),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promql_gate_promotes_a_good_canary_and_rolls_back_a_slow_one() {
    let mut env = Env::new();
    let (listen, metrics) = (free_addr(), free_addr());
    let prom = Prometheus::start(env.dir.path(), &[metrics])
        .expect("the prometheus server is installed (Debian package `prometheus`; scripts/test installs it)");
    let v1 = env.write("v1.yaml", &spec(listen, prom.addr, "v1", ""));
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
    let load = Load::start(listen, 8, 300);

    let v2 = env.write("v2.yaml", &spec(listen, prom.addr, "v2", ""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_stable(&client, "hello", "v2", Duration::from_secs(90)).await;
    let audit = stdout(&env.run(&["audit", "--rollout", "hello"]));
    assert!(
        audit.contains("gate p99-prom: result"),
        "the PromQL gate judged v2: {audit}"
    );

    // v3 answers in a second: over the classic alert's 800 ms.
    let v3 = env.write(
        "v3.yaml",
        &spec(listen, prom.addr, "v3", ", LATENCY_MS: \"1000\""),
    );
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    let bad = wait_status(
        &client,
        "hello",
        Duration::from_secs(90),
        "v3 rolled back",
        |v| v["phase"] == "Degraded" && weight(v, "v3") == 0,
    )
    .await;
    let msg = bad["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("gate p99-prom failed")
            && msg.contains("meets failureCondition `result > 0.800`"),
        "{msg}"
    );
    assert_eq!(stable_version(&bad).as_deref(), Some("v2"));
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "slow is not failed: {:?}", r.failures);
}

//! Alertmanager as a trigger: a real Alertmanager (Debian's `prometheus-alertmanager`)
//! delivers a firing alert to the control API's webhook, and the rollout it names is
//! aborted, audited with the alert's name.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Alertmanager(Child);
impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alertmanager_alert_naming_a_rollout_aborts_it() {
    let mut env = Env::new();
    let listen = free_addr();
    let steps = "        - setWeight: 20\n        - pause: {}";
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", steps));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", steps));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 paused at 20 %",
        |v| weight(v, "v2") == 20 && acked(v) && v["phase"] == "Paused",
    )
    .await;

    // Alertmanager, its webhook pointed at the control API with the API's token.
    let token = std::fs::read_to_string(env.paths.token()).expect("token");
    let api = std::fs::read_to_string(env.paths.api_addr()).expect("api address");
    let am = free_addr();
    let dir = env.dir.path().join("alertmanager");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            r#"route:
  receiver: baton
  group_by: [alertname, rollout]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: baton
    webhook_configs:
      - url: http://{api}/v1/alerts
        send_resolved: false
        http_config:
          authorization: {{ credentials: "{token}" }}
"#,
            api = api.trim(),
            token = token.trim()
        ),
    )
    .expect("config");
    let _am = Alertmanager(
        Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={am}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager (apt-get install prometheus-alertmanager)"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = tokio::net::TcpStream::connect(am).await.is_ok()
            && http_get(am, "/-/ready").await.contains("OK");
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alertmanager never ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An alert about another rollout, and one about hello, as Prometheus would send.
    let (status, body) = post_json(
        am,
        "/api/v2/alerts",
        r#"[{"labels":{"alertname":"HelloErrorBudget","rollout":"hello","severity":"page"},"annotations":{"summary":"hello burns its error budget"}},
            {"labels":{"alertname":"OtherErrors","rollout":"other"}}]"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let aborted = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "hello aborted by the alert",
        |v| v["phase"] == "Degraded" && weight(v, "v2") == 0 && acked(v),
    )
    .await;
    assert_eq!(stable_version(&aborted).as_deref(), Some("v1"));
    let audit = stdout(&env.run(&["audit", "--rollout", "hello"]));
    assert!(
        audit.contains("alert:HelloErrorBudget"),
        "the audit trail names the alert: {audit}"
    );
    // The alert about a rollout that does not exist changed nothing and is recorded
    // nowhere as an abort.
    assert!(!audit.contains("OtherErrors"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_webhook_refuses_what_is_not_a_delivery_and_asks_for_the_token() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write(
        "v1.yaml",
        &canary_spec(listen, "v1", "", "        - setWeight: 20"),
    );
    env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let api: std::net::SocketAddr = std::fs::read_to_string(env.paths.api_addr())
        .expect("api address")
        .trim()
        .parse()
        .expect("address");
    // No token: refused before the body is read.
    let (status, _) = post_json(api, "/v1/alerts", r#"{"version":"4","alerts":[]}"#).await;
    assert_eq!(status, 401);
    let token = std::fs::read_to_string(env.paths.token()).expect("token");
    let post = |body: &'static str| {
        let token = token.trim().to_string();
        async move {
            let out = Command::new("curl")
                .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
                .arg("-H")
                .arg(format!("Authorization: Bearer {token}"))
                .args(["-d", body])
                .arg(format!("http://{api}/v1/alerts"))
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let bad = post(r#"{"version":"3","alerts":[]}"#).await;
    assert!(
        bad.ends_with("400") && bad.contains("version \\\"3\\\""),
        "{bad}"
    );
    let resolved = post(
        r#"{"version":"4","alerts":[{"status":"resolved","labels":{"alertname":"A","rollout":"hello"}}]}"#,
    )
    .await;
    assert!(
        resolved.ends_with("200") && resolved.contains("\"resolved\": 1"),
        "{resolved}"
    );
    // Nothing rolls out: an abort has nothing to do, and says so.
    let idle = post(
        r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"A","rollout":"hello"}}]}"#,
    )
    .await;
    assert!(
        idle.ends_with("200") && idle.contains("\"aborted\": false"),
        "{idle}"
    );
}

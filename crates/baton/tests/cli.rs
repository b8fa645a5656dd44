//! Bad input changes nothing and says what is wrong.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn validate_names_every_bad_field() {
    let env = Env::new();
    let good = canary_spec(free_addr(), "v1", "", "        - setWeight: 10");
    let ok = env.write("good.yaml", &good);
    let out = env.run(&["validate", "-f", path_str(&ok)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("rollout hello is valid"));

    let bad = good
        .replace("replicas: 2", "replicas: 0")
        .replace("setWeight: 10", "setWeight: 300")
        .replace("result <= 0.01", "result <=");
    let bad = env.write("bad.yaml", &bad);
    let out = env.run(&["validate", "-f", path_str(&bad)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for field in [
        "spec.replicas",
        "spec.strategy.canary.steps[0].setWeight",
        "spec.analysis.gates[0].successCondition",
    ] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    let out = env.run(&["validate", "-f", path_str(&bad), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(3));

    // Type errors too, every one with its path, and the range errors beside them.
    let typed = good.replace("replicas: 2", "replicas: -2").replace(
        "setWeight: 10",
        "setWeight: 150\n        - pause: { duration: soon }",
    );
    let command = typed
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with("command:"))
        .expect("a command")
        .to_string();
    let typed = typed.replacen(&command, "command: []", 1);
    let typed = env.write("typed.yaml", &typed);
    let out = env.run(&["validate", "-f", path_str(&typed)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for line in [
        "spec.replicas: must be at least 1, got -2",
        "spec.run.command: must not be empty",
        "spec.strategy.canary.steps[0].setWeight: must be at most 100, got 150",
        "spec.strategy.canary.steps[1].pause.duration: invalid duration \"soon\"",
    ] {
        assert!(err.contains(line), "{line} missing from: {err}");
    }
    let out = env.run(&["validate", "-f", path_str(&typed), "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["valid"], false);
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.replicas",
            "spec.run.command",
            "spec.strategy.canary.steps[0].setWeight",
            "spec.strategy.canary.steps[1].pause.duration"
        ]
    );
    assert!(!env.paths.root.exists(), "validate wrote nothing");
}

#[test]
fn wrong_flags_and_missing_files_are_errors() {
    let env = Env::new();
    let out = env.run(&["status", "--output", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--output"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("yaml"),
        "names the valid ones: {}",
        stderr(&out)
    );
    // A timeout past what the clock can count is an error, not a crash.
    let out = env.run(&["wait", "web", "--timeout", "500000000000y"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--timeout") && !stderr(&out).contains("panicked"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["validate", "-f", "/nonexistent/spec.yaml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/spec.yaml"));
    let out = env.run(&["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("baton up"),
        "tells what to do: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_apply_changes_nothing() {
    let mut env = Env::new();
    let listen = free_addr();
    let spec = canary_spec(
        listen,
        "v1",
        "",
        "        - setWeight: 50\n        - pause: {}",
    );
    let v1 = env.write("v1.yaml", &spec);
    env.start_up(&["-f", path_str(&v1)]);
    let client = env.client();
    let before = wait_status(&client, "hello", Duration::from_secs(30), "healthy", |v| {
        v["phase"] == "Healthy"
    })
    .await;

    let bad = env.write(
        "bad.yaml",
        &spec
            .replace("APP_VERSION: v1", "APP_VERSION: v2")
            .replace(&listen.to_string(), "nowhere"),
    );
    let out = env.run(&["apply", "-f", path_str(&bad)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.traffic.listen"),
        "{}",
        stderr(&out)
    );
    // The API refuses it too, with the field list.
    let text = std::fs::read_to_string(&bad).expect("read");
    let (code, body) = client.post("/v1/apply", Some(text)).await.expect("api");
    assert_eq!(code, 400);
    assert_eq!(body["errors"][0]["field"], "spec.traffic.listen");
    // A second rollout on the same listener is refused, however the address is written.
    let port = listen.port();
    for same in [
        listen.to_string(),
        format!("0.0.0.0:{port}"),
        format!("127.0.0.1:0{port}"),
    ] {
        let clash = env.write(
            "clash.yaml",
            &spec
                .replace("name: hello", "name: other")
                .replace(&listen.to_string(), &same),
        );
        let out = env.run(&["apply", "-f", path_str(&clash)]);
        assert!(!out.status.success(), "{same} was accepted");
        assert!(
            stderr(&out).contains("of rollout hello"),
            "{same}: {}",
            stderr(&out)
        );
    }
    // Commands on unknown rollouts or with nothing to act on.
    let out = env.run(&["promote", "nosuch"]);
    assert!(
        stderr(&out).contains("no rollout named \"nosuch\""),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["abort", "hello"]);
    assert!(
        stderr(&out).contains("nothing to abort"),
        "{}",
        stderr(&out)
    );
    // Unauthenticated API calls get nothing.
    let anon = baton::api::ApiClient::new(client.addr, "wrong".into());
    let (code, _) = anon.get("/v1/rollouts").await.expect("api");
    assert_eq!(code, 401);

    let after = wait_status(&client, "hello", Duration::from_secs(5), "status", |_| true).await;
    assert_eq!(after["stableRevision"], before["stableRevision"]);
    assert_eq!(after["canaryRevision"], serde_json::Value::Null);
    assert_eq!(after["phase"], "Healthy");
    let list = client.get("/v1/rollouts").await.expect("list").1;
    assert_eq!(list["rollouts"].as_array().map(Vec::len), Some(1));
}

/// `baton down` with no controller running stops the proxy and the instances itself,
/// and says so in the audit trail, as the controller would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_without_a_controller_stops_everything_and_is_audited() {
    let mut env = Env::new();
    let listen = free_addr();
    let spec = env.write(
        "v1.yaml",
        &canary_spec(listen, "v1", "", "        - setWeight: 10"),
    );
    let client = env.start_healthy(&["-f", path_str(&spec)], "hello").await;
    let pids =
        pids(&wait_status(&client, "hello", Duration::from_secs(5), "status", |_| true).await);
    assert!(!pids.is_empty());
    let mut up = env.up.take().expect("controller");
    up.kill().expect("kill");
    up.wait().expect("reap");
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");

    let out = env.run(&["down"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no controller was running"),
        "{}",
        stdout(&out)
    );
    wait_until(Duration::from_secs(15), "the instances to stop", || {
        pids.iter().all(|p| !alive(*p))
    });
    let audit = stdout(&env.run(&["audit"]));
    assert!(audit.contains("(no controller was running)"), "{audit}");
    let verify = env.run(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

//! `--log-format json`: every line `baton up` and the proxy it starts write is one JSON
//! object, and a rollout's events carry their fields.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const STEPS: &str = "        - setWeight: 50";

/// Every non-empty line of `text` as JSON, or the first that is not.
fn json_lines(text: &str) -> Result<Vec<Value>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| l.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_rollouts_fields() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", STEPS));
    let client = env
        .start_healthy(&["--log-format", "json", "-f", path_str(&v1)], "hello")
        .await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", STEPS));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    let done = wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;

    let up = json_lines(&env.up_log()).unwrap_or_else(|l| panic!("not JSON: {l}"));
    for e in &up {
        for field in ["timestamp", "level", "message"] {
            assert!(e.get(field).is_some(), "no {field}: {e}");
        }
    }
    assert!(
        up.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("baton up: control API"))),
        "the banner is logged too: {up:?}"
    );
    let promoted = up
        .iter()
        .find(|e| e["target"] == "baton::event" && e["reason"] == "Promoted")
        .unwrap_or_else(|| panic!("no Promoted event: {up:?}"));
    assert_eq!(promoted["rollout"], "hello", "{promoted}");
    assert_eq!(promoted["level"], "INFO", "{promoted}");
    assert_eq!(promoted["actor"], "baton", "{promoted}");
    let rev = revision(&done, "v2").expect("v2")["name"].clone();
    assert_eq!(promoted["revision"], rev, "{promoted}");

    // The proxy `baton up` started logs the same way.
    let proxy = std::fs::read_to_string(env.paths.proxy_log()).expect("proxy log");
    let proxy = json_lines(&proxy).unwrap_or_else(|l| panic!("proxy line not JSON: {l}"));
    assert!(
        proxy.iter().any(|e| e["message"] == "proxy ready"),
        "{proxy:?}"
    );
}

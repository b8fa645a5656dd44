//! `baton restart`: the stable revision's instances replaced one at a time under load,
//! each replacement ready before an old one stops, without one failed request.

mod common;

use std::time::{Duration, Instant};

use baton::load::Load;
use common::*;

const STEPS: &str = "        - setWeight: 50";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replaces_every_instance_one_at_a_time_without_a_failure() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", STEPS));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let status = async || match client.get("/v1/rollouts/hello").await {
        Ok((200, v)) => v,
        other => panic!("status: {other:?}"),
    };
    let before = pids(&status().await);
    assert_eq!(before.len(), 2, "{before:?}");
    let load = Load::start(listen, 8, 1000);

    let out = env.run(&["restart", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restarting"), "{}", stdout(&out));
    // A second restart while one runs is refused, and changes nothing.
    let again = env.run(&["restart", "hello"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already restarting"),
        "{}",
        stderr(&again)
    );

    // Never fewer than two ready instances, and never more than three, throughout.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        let v = status().await;
        let rev = revision(&v, "v1").expect("v1").clone();
        let ready = rev["readyReplicas"].as_u64().unwrap_or(0);
        // Instances on their way out (Terminating, Stopping) drain and do not count.
        let running = rev["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| matches!(i["state"].as_str(), Some("Starting" | "Ready" | "NotReady")))
            .count();
        assert!(ready >= 2, "capacity dropped: {v}");
        most = most.max(running);
        let now = pids(&v);
        // Progressing while the restart runs; Healthy once every instance is new.
        if now.len() == 2 && now.iter().all(|p| !before.contains(p)) && v["phase"] == "Healthy" {
            break;
        }
        if !now.iter().all(|p| !before.contains(p)) {
            assert_eq!(v["phase"], "Progressing", "{v}");
        }
        assert!(
            Instant::now() < deadline,
            "not every instance replaced: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most <= 3, "a surge of one, not more: {most}");
    for p in &before {
        wait_until(Duration::from_secs(10), "the old instance stopped", || {
            !alive(*p)
        });
    }
    let audit = stdout(&env.run(&["audit", "--rollout", "hello"]));
    assert!(audit.contains("restart requested by user"), "{audit}");
    assert!(audit.contains("every instance replaced"), "{audit}");
    let r = load.report();
    eprintln!("restart: {} requests, {} failed", r.sent, r.failed);
    assert!(r.sent > 500, "{}", r.sent);
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

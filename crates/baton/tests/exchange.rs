//! The example exchange under Baton, end to end: `baton demo` starts the user, trade
//! and notification services, runs the trader (several clients placing orders with
//! idempotency keys and retries, each following its WebSocket feed), rolls trade and
//! notification v1→v2 on canaries and user through blue-green, then rolls out broken
//! v3s of trade and notification that the analysis must roll back. The trader then
//! checks the books.

mod common;

use std::process::Command;

/// The exchange's binaries, built beside `baton` (a no-op when up to date). Built as
/// part of the workspace, as `scripts/test` builds them: `-p exchange` unifies
/// features differently, so it rebuilt a dozen crates and the binaries on every run.
fn exchange_bins() -> std::path::PathBuf {
    let dir = common::baton_bin().parent().expect("bin dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "--workspace", "--bins"]);
    if dir.components().any(|c| c.as_os_str() == "release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("cargo runs").success(),
        "building the exchange failed"
    );
    dir
}

#[test]
fn exchange_rollouts_lose_and_double_nothing() {
    let bins = exchange_bins();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(common::baton_bin())
        .args([
            "demo",
            "--example",
            "exchange",
            "--rate",
            "120",
            "--output",
            "json",
            "--workdir",
        ])
        .arg(dir.path().join("demo"))
        .arg("--bin-dir")
        .arg(&bins)
        .output()
        .expect("run baton demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // The work dir goes with the test: keep what explains a failure.
        let tail = |name: &str| {
            let text = std::fs::read_to_string(dir.path().join("demo/.baton").join(name))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let audit = Command::new(common::baton_bin())
            .args(["audit", "--dir"])
            .arg(dir.path().join("demo/.baton"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let audit: Vec<&str> = audit.lines().collect();
        panic!(
            "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nproxy.log (tail):\n{}\naudit (tail):\n{}",
            tail("proxy.log"),
            audit[audit.len().saturating_sub(30)..].join("\n")
        );
    }
    let s: serde_json::Value = serde_json::from_str(&stdout).expect("summary json");
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {s}"))
    };

    // Nothing lost, nothing doubled.
    assert!(
        n("ordersAccepted") > 1000,
        "too little load to prove anything: {s}"
    );
    assert_eq!(n("ordersLost"), 0);
    assert_eq!(n("duplicateOrders"), 0);
    assert!(n("fillsExpected") > 100);
    assert_eq!(n("fillsMissed"), 0);
    assert!(n("notificationsExpected") > 1000);
    assert_eq!(n("notificationsMissed"), 0);
    assert_eq!(n("notificationsDuplicated"), 0);
    // The only failed requests are the broken versions' own answers.
    assert_eq!(
        n("failedByRollouts"),
        0,
        "failures: {}",
        s["trader"]["failures"]
    );
    for f in s["trader"]["failures"].as_array().expect("failures") {
        assert_eq!(f["version"], "v3", "{f}");
        // Orders carry idempotency keys, so the proxy shields traders from trade v3.
        assert_ne!(f["op"], "place order", "a trader saw trade v3's error: {f}");
    }
    let exposed = s["rollouts"][3]["exposedMs"]
        .as_u64()
        .expect("trade v3 exposure");
    assert!(exposed < 60_000, "{s}");
    // Feeds on the replaced notification instances were told to reconnect (1012),
    // never cut abnormally, and resumed.
    assert!(n("wsReconnects") > 0, "{s}");
    assert!(s["wsCloseCodes"]["1012"].as_u64().unwrap_or(0) > 0, "{s}");
    assert_eq!(s["trader"]["wsAbnormal"], 0);

    let outcomes: Vec<(String, String, String)> = s["rollouts"]
        .as_array()
        .expect("rollouts")
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap_or("").to_string(),
                r["to"].as_str().unwrap_or("").to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expect = |svc: &str, to: &str, o: &str| (svc.to_string(), to.to_string(), o.to_string());
    assert_eq!(
        outcomes,
        vec![
            expect("trade", "v2", "promoted"),
            expect("notification", "v2", "promoted"),
            expect("user", "v2", "promoted"),
            expect("trade", "v3", "rolled back"),
            expect("notification", "v3", "rolled back"),
        ]
    );
    assert!(
        s["rollouts"][3]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("gate errors"),
        "{s}"
    );
    assert!(
        s["rollouts"][4]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("gate api"),
        "{s}"
    );
}

//! The audit trail, history and notifications, end to end.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

const QUICK: &str = "        - setWeight: 50
        - pause: {}";

#[derive(Clone, Debug)]
struct Received {
    uri: String,
    authorization: String,
    body: serde_json::Value,
}

/// A webhook receiver on `addr` that records what it gets; with `hold`, it answers
/// nothing until the gate opens.
async fn receiver(addr: SocketAddr, hold: Option<Arc<Notify>>) -> Arc<Mutex<Vec<Received>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let l = TcpListener::bind(addr).await.expect("bind receiver");
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (g, hold) = (g.clone(), hold.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (g, hold) = (g.clone(), hold.clone());
                    async move {
                        let uri = req.uri().to_string();
                        let authorization = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        g.lock().expect("lock").push(Received {
                            uri,
                            authorization,
                            body,
                        });
                        if let Some(h) = hold {
                            h.notified().await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    got
}

fn events(got: &Arc<Mutex<Vec<Received>>>) -> Vec<String> {
    got.lock()
        .expect("lock")
        .iter()
        .filter_map(|r| r.body["event"].as_str().map(str::to_string))
        .collect()
}

fn audit_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out = env.run(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("audit json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_are_audited_and_tampering_is_named() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", QUICK));
    // A second identity, alice, with her own token.
    std::fs::create_dir_all(&env.paths.root).expect("dir");
    std::fs::write(
        env.paths.root.join("tokens"),
        "alice 0123456789abcdef0123456789abcdef\n",
    )
    .expect("tokens");
    env.start_up(&["-f", path_str(&v1)]);
    let client = env.client();
    wait_status(&client, "hello", Duration::from_secs(30), "healthy", |v| {
        v["phase"] == "Healthy"
    })
    .await;
    // Enough traffic for the gates to judge the canary.
    let load = baton::load::Load::start(listen, 4, 300);
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", QUICK));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "paused with a gate verdict",
        |v| {
            v["phase"] == "Paused"
                && v["gates"]
                    .as_array()
                    .is_some_and(|g| g.iter().any(|g| g["passes"].as_u64() > Some(0)))
        },
    )
    .await;
    let alice = baton::api::ApiClient::new(client.addr, "0123456789abcdef0123456789abcdef".into());
    let (code, _) = alice
        .post("/v1/rollouts/hello/promote", None)
        .await
        .expect("promote");
    assert_eq!(code, 200);
    wait_stable(&client, "hello", "v2", Duration::from_secs(30)).await;
    assert_eq!(load.stop().await.failed, 0);

    // History: what changed between the two revisions.
    let diff = env.run(&["history", "hello", "--diff", "1", "2"]);
    assert!(diff.status.success(), "{}", stderr(&diff));
    let text = stdout(&diff);
    assert!(
        text.contains("-      APP_VERSION: v1") && text.contains("+      APP_VERSION: v2"),
        "{text}"
    );
    let hist = env.run(&["history", "hello", "--output", "json"]);
    let hist: serde_json::Value = serde_json::from_slice(&hist.stdout).expect("history json");
    assert_eq!(hist["revisions"][0]["outcome"], "superseded");
    assert_eq!(hist["revisions"][1]["outcome"], "stable");

    let entries = audit_json(&env, &["--rollout", "hello"]);
    let list = entries.as_array().expect("entries");
    let user = baton::api::local_user();
    let find = |action: &str, actor: &str| {
        list.iter()
            .any(|e| e["action"] == action && e["actor"] == actor)
    };
    assert!(
        find("apply", &format!("admin/{user}")),
        "the CLI's apply is the admin's, on behalf of {user}"
    );
    assert!(
        find("promote", &format!("alice/{user}")),
        "alice's promote is hers: {entries:#}"
    );
    assert!(find("step", "baton") && find("traffic", "baton") && find("gate", "baton"));
    assert!(
        list.iter()
            .all(|e| e["specDigest"].as_str().is_some_and(|d| d.len() == 64))
    );
    assert_eq!(
        audit_json(&env, &["--limit", "3"]).as_array().map(Vec::len),
        Some(3)
    );
    let verified = env.run(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    assert!(stdout(&verified).contains("intact"));

    // Stop everything, then tamper with the file in every way.
    assert!(env.run(&["down"]).status.success());
    let db = env.paths.db();
    let n = list.len() as i64;
    let last: i64 = rusqlite::Connection::open(&db)
        .expect("db")
        .query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0))
        .expect("max");
    let cases = [
        (format!("UPDATE audit SET actor = 'mallory' WHERE seq = {}", n / 2), format!("entry {} was altered", n / 2)),
        ("DELETE FROM audit WHERE seq = 5".to_string(), "entry 5 was removed".to_string()),
        ("UPDATE audit SET seq = -1 WHERE seq = 7; UPDATE audit SET seq = 7 WHERE seq = 8; UPDATE audit SET seq = 8 WHERE seq = -1".to_string(), "entry 7".to_string()),
        (format!("DELETE FROM audit WHERE seq >= {}", last - 2), "truncated".to_string()),
    ];
    let pristine = env.dir.path().join("pristine.db");
    std::fs::copy(&db, &pristine).expect("copy");
    for (tamper, want) in cases {
        std::fs::copy(&pristine, &db).expect("restore");
        rusqlite::Connection::open(&db)
            .expect("db")
            .execute_batch(&tamper)
            .expect("tamper");
        let out = env.run(&["audit", "verify"]);
        assert!(!out.status.success(), "{tamper} went unnoticed");
        assert!(stderr(&out).contains(&want), "{tamper}: {}", stderr(&out));
    }
    truncation_and_forgery_do_not_heal(&env, &pristine, last);
}

/// What protects the trail is outside the state directory, and the next append
/// neither hides a truncation nor blesses a forged entry.
fn truncation_and_forgery_do_not_heal(env: &Env, pristine: &std::path::Path, last: i64) {
    let db = env.paths.db();
    assert!(
        !env.paths.root.join("audit.head").exists(),
        "no head inside the state directory"
    );
    let homes: Vec<_> = std::fs::read_dir(env.state_home().join("baton"))
        .expect("the state home")
        .filter_map(|d| d.ok().map(|d| d.path()))
        .collect();
    let [home] = homes.as_slice() else {
        panic!("one directory per state directory: {homes:?}");
    };
    assert!(home.join("audit.head").exists());
    let key = std::fs::metadata(home.join("audit.key")).expect("the audit key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let verify = || {
        let out = env.run(&["audit", "verify"]);
        (out.status.success(), stdout(&out) + &stderr(&out))
    };
    // Truncated, then something is recorded (`down` without a controller appends).
    std::fs::copy(pristine, &db).expect("restore");
    rusqlite::Connection::open(&db)
        .expect("db")
        .execute_batch(&format!("DELETE FROM audit WHERE seq > {}", last - 3))
        .expect("truncate");
    let down = env.run(&["down"]);
    assert!(
        stderr(&down).contains("nothing appended") && stderr(&down).contains("truncated"),
        "{}",
        stderr(&down)
    );
    let (ok, text) = verify();
    assert!(!ok && text.contains("truncated"), "healed: {text}");

    // An entry forged after the recorded head, chained right but without the key.
    std::fs::copy(pristine, &db).expect("restore");
    let conn = rusqlite::Connection::open(&db).expect("db");
    let prev = conn
        .query_row(
            "SELECT seq, at, actor, action, rollout, revision, spec_digest, reason, prev_hash, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok(baton_audit::Entry {
                    seq: r.get::<_, i64>(0)? as u64,
                    at: r.get::<_, i64>(1)? as u64,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    rollout: r.get(4)?,
                    revision: r.get(5)?,
                    spec_digest: r.get(6)?,
                    reason: r.get(7)?,
                    prev_hash: r.get(8)?,
                    hash: r.get(9)?,
                    mac: None,
                })
            },
        )
        .expect("last entry");
    let forged = baton_audit::Entry::after(
        Some(&prev),
        baton_audit::NewEntry {
            actor: "admin".into(),
            action: "promote".into(),
            rollout: "hello".into(),
            revision: None,
            spec_digest: None,
            reason: "approved by the change board".into(),
        },
        prev.at + 1,
        None,
    );
    conn.execute(
        "INSERT INTO audit (seq, at, actor, action, rollout, reason, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rusqlite::params![
            forged.seq as i64,
            forged.at as i64,
            forged.actor,
            forged.action,
            forged.rollout,
            forged.reason,
            forged.prev_hash,
            forged.hash
        ],
    )
    .expect("forge");
    drop(conn);
    let (ok, text) = verify();
    assert!(
        !ok && text.contains(&format!("entry {} carries no MAC", forged.seq)),
        "{text}"
    );
    // The untouched trail verifies, its MACs checked with the key.
    std::fs::copy(pristine, &db).expect("restore");
    let (ok, text) = verify();
    assert!(ok && text.contains("MACs checked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_sent_retried_and_never_block() {
    let mut env = Env::new();
    let listen = free_addr();
    let (json_addr, slack_addr, late_addr, dead_addr) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let gate = Arc::new(Notify::new());
    // JSON receiver holds every answer until the rollout is done: it cannot block it.
    let json = receiver(json_addr, Some(gate.clone())).await;
    let slack = receiver(slack_addr, None).await;
    let secret = "s3cr3t-0f-the-hook";
    let notifications = format!(
        r#"  notifications:
    - name: oncall
      url: "http://{json_addr}/hook?token=${{HOOK_SECRET}}"
      headers: {{ Authorization: "Bearer ${{HOOK_SECRET}}" }}
    - name: chat
      url: "http://{slack_addr}/slack"
      format: slack
      events: [promoted, rolledBack]
    - name: late
      url: "http://{late_addr}/late"
      events: [started]
    - name: dead
      url: "http://{dead_addr}/never"
      events: [started]
"#
    );
    let spec = |v: &str| {
        format!(
            "{}{notifications}",
            canary_spec(
                listen,
                v,
                "",
                "        - setWeight: 50\n        - pause: { duration: 1s }"
            )
        )
    };
    let v1 = env.write("v1.yaml", &spec("v1"));
    // The secret lives only in the controller's environment.
    env.up_env.push(("HOOK_SECRET".into(), secret.into()));
    env.start_up(&["-f", path_str(&v1)]);
    let client = env.client();
    wait_status(&client, "hello", Duration::from_secs(30), "healthy", |v| {
        v["phase"] == "Healthy"
    })
    .await;
    let v2 = env.write("v2.yaml", &spec("v2"));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    // The late receiver comes up a second after the rollout starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = receiver(late_addr, None).await;
    wait_stable(&client, "hello", "v2", Duration::from_secs(30)).await;
    // Only now does the JSON receiver answer.
    gate.notify_waiters();
    wait_until(Duration::from_secs(20), "all notifications", || {
        let e = events(&json);
        ["started", "stepPassed", "promoted"]
            .iter()
            .all(|w| e.iter().any(|x| x == w))
            && !events(&late).is_empty()
    });
    let first = json.lock().expect("lock")[0].clone();
    assert_eq!(first.authorization, format!("Bearer {secret}"));
    assert!(
        first.uri.ends_with(&format!("token={secret}")),
        "{}",
        first.uri
    );
    assert_eq!(first.body["rollout"], "hello");
    assert_eq!(first.body["appVersion"], "v2");
    let texts: Vec<String> = slack
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|r| r.body["text"].as_str().map(str::to_string))
        .collect();
    assert!(
        texts.iter().any(|t| t.starts_with("*hello* promoted (v2)")),
        "{texts:?}"
    );
    assert!(
        events(&late).contains(&"started".to_string()),
        "retried until the late receiver was up"
    );
    // The dead webhook gives up after its retries; the failure is recorded, redacted.
    wait_until(
        Duration::from_secs(20),
        "the dead webhook's failure",
        || {
            stdout(&env.run(&["audit", "--rollout", "hello"]))
                .contains("notification dead (started)")
        },
    );
    let audit = stdout(&env.run(&["audit", "--output", "json"]));
    assert!(audit.contains(&format!("http://{dead_addr}/…")), "{audit}");
    assert!(
        !audit.contains("/never"),
        "URL paths never reach the audit trail"
    );
    for text in [audit, env.up_log()] {
        assert!(!text.contains(secret), "the secret leaked: {text}");
    }
}

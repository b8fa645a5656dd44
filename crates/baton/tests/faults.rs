//! Faults a user meets, end to end: what Baton reports done is what the data plane does.

mod common;

use std::time::Duration;

use baton_proxy::ProxyClient;
use common::*;

const PAUSED: &str = "        - setWeight: 20
        - pause: {}";

fn audit_reasons(env: &Env, rollout: &str) -> Vec<String> {
    let out = env.run(&["audit", "--rollout", rollout, "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// `hello` v1 stable and v2 a canary the proxy serves 20 % of, paused.
async fn canary_paused_at_20() -> (Env, std::net::SocketAddr, baton::api::ApiClient) {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", PAUSED));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "v2 at 20 %",
        |v| weight(v, "v2") == 20 && acked(v),
    )
    .await;
    (env, listen, client)
}

/// A rollout whose listener another process holds fails alone: the others move on, an
/// abort is served (not only reported), status shows served beside desired weights,
/// the refusal is audited once, and the rollout recovers when the port frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbindable_listener_fails_only_its_own_rollout() {
    let (env, listen, client) = canary_paused_at_20().await;

    // Another program holds the port a second rollout asks for.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr");
    let other = canary_spec(taken, "v1", "", PAUSED)
        .replace("metadata: { name: hello }", "metadata: { name: other }");
    let other = env.write("other.yaml", &other);
    let out = env.run(&["apply", "-f", path_str(&other)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = wait_status(
        &client,
        "other",
        Duration::from_secs(30),
        "the refusal in other's status",
        |v| {
            v["routingError"]
                .as_str()
                .is_some_and(|e| e.contains("cannot listen"))
        },
    )
    .await;
    let served: Vec<u64> = refused["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["servedWeight"].as_u64())
        .collect();
    assert!(
        served.iter().all(|w| *w == 0),
        "nothing of other is served: {refused:#}"
    );

    // The first rollout still moves: an abort is confirmed by the proxy and served.
    let out = env.run(&["abort", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the abort served",
        |v| {
            weight(v, "v2") == 0
                && acked(v)
                && revision(v, "v2").is_some_and(|r| r["servedWeight"] == 0)
        },
    )
    .await;
    assert_eq!(
        revision(&v, "v1").map(|r| r["servedWeight"].clone()),
        Some(100.into()),
        "{v:#}"
    );
    for _ in 0..40 {
        assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");
    }

    // The proxy is asked again every 2 s; the refusal is recorded once.
    let proxy = ProxyClient::new(env.paths.proxy_socket());
    let (_, first) = proxy.ping().await.expect("ping");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy.ping().await.expect("ping").1 < first + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy was not asked again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons = audit_reasons(&env, "other");
    let told = reasons
        .iter()
        .filter(|r| r.contains("cannot serve this rollout's new route"))
        .count();
    assert_eq!(told, 1, "{reasons:#?}");

    // The port frees: other is served as asked.
    drop(squatter);
    wait_status(
        &client,
        "other",
        Duration::from_secs(30),
        "other served",
        |v| v["routingError"].is_null() && acked(v) && v["phase"] == "Healthy",
    )
    .await;
    assert_eq!(http_get(taken, "/").await.trim(), "hello from v1");
}

/// A restarted controller knows the route the proxy already serves: an aborted canary,
/// stopped long ago, is not started again (and stopped) on every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_start_an_aborted_revision_again() {
    let (mut env, _, client) = canary_paused_at_20().await;
    assert!(env.run(&["abort", "hello"]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the aborted canary's instances gone",
        |v| acked(v) && revision(v, "v2").is_none_or(|r| r["instances"] == serde_json::json!([])),
    )
    .await;
    let started = |env: &Env| {
        audit_reasons(env, "hello")
            .iter()
            .filter(|r| r.starts_with("started instance") && r.contains("of revision"))
            .count()
    };
    let before = started(&env);

    let mut up = env.up.take().expect("controller");
    up.kill().expect("kill");
    up.wait().expect("reaped");
    let proxy = ProxyClient::new(env.paths.proxy_socket());
    let (_, table) = proxy
        .ping()
        .await
        .expect("the proxy outlives the controller");
    env.start_up(&[]);
    // The new controller's first tick reconciles instances, then pushes its table.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.ping().await.expect("ping").1 <= table {
        assert!(
            std::time::Instant::now() < deadline,
            "no table from the new controller"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = wait_status(
        &env.client(),
        "hello",
        Duration::from_secs(10),
        "status",
        |v| v["phase"] == "Degraded",
    )
    .await;
    assert_eq!(
        started(&env),
        before,
        "an instance was started after the restart: {v:#}"
    );
}

/// Idle connections to the control API cannot starve the controller: with 1,100 of
/// them against a 400-descriptor limit, its probes keep working, no healthy instance is
/// killed and the canary is promoted; each idle connection is cut within the read
/// timeout, and a spec over 1 MiB is refused with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_api_connections_cannot_starve_the_controller() {
    let mut env = Env::new();
    env.up_nofile = Some(400);
    let listen = free_addr();
    let steps = "        - setWeight: 20
        - pause: { duration: 4s }
        - setWeight: 50
        - pause: { duration: 4s }";
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", steps));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let load = baton::load::Load::start(listen, 4, 200);
    let v2 = env.write("v2.yaml", &canary_spec(listen, "v2", "", steps));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());

    let api: std::net::SocketAddr = std::fs::read_to_string(env.paths.api_addr())
        .expect("api address")
        .trim()
        .parse()
        .expect("address");
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = tokio::net::TcpStream::connect(api).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 1000, "connected {}", idle.len());
    // Every idle connection is closed by the controller: over the cap at once, the
    // others when the read timeout (10 s) passes.
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    for mut s in idle {
        use tokio::io::AsyncReadExt;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut b = [0u8; 1];
        let closed = tokio::time::timeout(left, s.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was still open after the read timeout"
        );
    }
    let v = wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;
    let restarts: u64 = v["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["restarts"].as_u64())
        .sum();
    assert_eq!(restarts, 0, "an instance was killed: {v:#}");
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    let log = env.up_log();
    assert!(!log.contains("failed its probe"), "{log}");

    // A spec over the limit is refused by the CLI, naming the limit, not "Broken pipe".
    let big = format!(
        "{}\n#{}\n",
        std::fs::read_to_string(&v2).expect("spec"),
        "x".repeat(2 << 20)
    );
    let big = env.write("big.yaml", &big);
    let out = env.run(&["apply", "-f", path_str(&big)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at most 1 MiB"), "{}", stderr(&out));
    // And by the API, from the declared length, before any byte of the body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let token = std::fs::read_to_string(env.paths.token()).expect("token");
    let mut s = tokio::net::TcpStream::connect(api).await.expect("connect");
    let head = format!(
        "POST /v1/apply HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 52428800\r\n\r\n",
        token.trim()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("an answer before the body")
        .expect("read");
    let head = String::from_utf8_lossy(&head).into_owned();
    assert_eq!(head, "HTTP/1.1 413");
}

/// A proxy that stops answering (SIGSTOP: its sockets still accept) is killed and
/// replaced within 3 s, and the service answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_proxy_is_replaced_within_3_s() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let proxy = ProxyClient::new(env.paths.proxy_socket()).with_timeout(Duration::from_millis(200));
    let (old, _) = proxy.ping().await.expect("proxy");
    let stopped = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop the proxy");
    let new = loop {
        if let Ok((pid, _)) = proxy.ping().await
            && pid != old
        {
            break pid;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "no new proxy within 3 s:\n{}",
            env.up_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("replaced after {:?}", stopped.elapsed());
    assert_ne!(new, old);
    wait_until(Duration::from_secs(5), "the hung proxy gone", || {
        !alive(old as u64)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");
}

/// Rough edges of the control API and the state directory: tokens are reloaded when
/// their file changes, a short token is refused with a message, refused requests and
/// applies are audited, an existing `--dir` keeps its mode, and a controller that
/// cannot serve its API port leaves no proxy behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reload_refusals_are_audited_and_a_failed_start_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = Env::new();
    std::fs::create_dir_all(&env.paths.root).expect("dir");
    std::fs::set_permissions(&env.paths.root, std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    let admin = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let mode = std::fs::metadata(&env.paths.root)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750, "an existing --dir was chmodded");

    let api: std::net::SocketAddr = std::fs::read_to_string(env.paths.api_addr())
        .expect("api address")
        .trim()
        .parse()
        .expect("address");
    let as_user = |t: &str| baton::api::ApiClient::new(api, t.to_string());
    let alice = "alice-token-0123456789";
    let viewer = "viewer-token-0123456789";
    assert_eq!(
        as_user(alice).get("/v1/rollouts").await.expect("api").0,
        401
    );
    // Added while the controller runs: no restart needed.
    std::fs::write(
        env.paths.root.join("tokens"),
        format!("alice {alice} operator\nbob short operator\nvera {viewer} viewer\n"),
    )
    .expect("tokens");
    assert_eq!(
        as_user(alice).get("/v1/rollouts").await.expect("api").0,
        200
    );
    assert_eq!(
        as_user("short").get("/v1/rollouts").await.expect("api").0,
        401
    );
    let (code, _) = as_user(viewer)
        .post("/v1/rollouts/hello/abort", None)
        .await
        .expect("api");
    assert_eq!(code, 403);
    let (code, _) = admin
        .post("/v1/apply", Some("kind: Rollout\nspec: {}\n".into()))
        .await
        .expect("api");
    assert_eq!(code, 400);
    wait_until(Duration::from_secs(10), "the refusals audited", || {
        let out = env.run(&["audit", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let reasons: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["action"] == "refused")
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect();
        reasons.iter().any(|r| r.contains("missing or wrong token"))
            && reasons.iter().any(|r| r.contains("a viewer may not act"))
            && reasons.iter().any(|r| r.starts_with("apply refused"))
    });
    assert!(env.up_log().contains("fewer than 16"), "{}", env.up_log());

    // A second directory whose API port is taken: `up` fails and starts no proxy.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = Env::new();
    let out = other
        .cmd()
        .args(["up", "-f", path_str(&v1), "--api-listen"])
        .arg(taken.local_addr().expect("addr").to_string())
        .output()
        .expect("baton up");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("control API"), "{}", stderr(&out));
    let proxy = ProxyClient::new(other.paths.proxy_socket());
    assert!(proxy.ping().await.is_err(), "a proxy was left behind");
}

/// The state database lost while instances run: a new controller finds them by their
/// mark, adopts them (no request fails, no new instance is needed), and `down` stops
/// them — nothing runs that Baton cannot name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_database_loses_no_instance() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &canary_spec(listen, "v1", "", PAUSED));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let before = wait_status(&client, "hello", Duration::from_secs(30), "ready", |v| {
        pids(v).len() == 2 && acked(v)
    })
    .await;
    let old = pids(&before);
    let load = baton::load::Load::start(listen, 4, 200);
    let mut up = env.up.take().expect("controller");
    up.kill().expect("kill");
    up.wait().expect("reaped");
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(env.paths.root.join(f));
    }
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let v = wait_stable(&client, "hello", "v1", Duration::from_secs(30)).await;
    assert_eq!(pids(&v), old, "the running instances were adopted: {v:#}");
    // Requests keep flowing through the adopted instances.
    let at = load.report().sent;
    wait_until(Duration::from_secs(20), "200 more requests", || {
        load.report().sent > at + 200
    });
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    let out = env.run(&["down"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(
        Duration::from_secs(20),
        "the adopted instances stopped",
        || old.iter().all(|p| !alive(*p)),
    );
}

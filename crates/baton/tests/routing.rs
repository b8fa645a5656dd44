//! Sticky clients, header routing and a canary users are shielded from, end to end.

mod common;

use std::time::Duration;

use baton::load::Load;
use common::*;

const STEPS: &str = "        - setWeight: 10
        - pause: { duration: 1s }
        - setWeight: 30
        - pause: { duration: 1s }
        - setWeight: 60
        - pause: { duration: 1s }";

fn spec(listen: std::net::SocketAddr, version: &str, extra_env: &str) -> String {
    canary_spec(listen, version, extra_env, STEPS).replace(
        &format!("  traffic: {{ listen: \"{listen}\" }}"),
        &format!(
            "  traffic:\n    listen: \"{listen}\"\n    stickiness: {{ header: X-Client-Id }}\n    canaryHeader: {{ name: X-Canary, value: always }}\n    shieldCanary: true"
        ),
    )
}

async fn get_with(addr: std::net::SocketAddr, header: (&str, &str)) -> String {
    use http_body_util::BodyExt;
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", addr.to_string())
        .header(header.0, header.1)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tx.send_request(req).await.expect("response");
    String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_clients_never_flip_and_a_shielded_broken_canary_fails_no_one() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    assert!(
        std::fs::read_to_string(&v1)
            .expect("spec")
            .contains("shieldCanary: true")
    );
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    // 8 workers × 25 clients: 200 sticky clients.
    let load = Load::start_clients(listen, 8, 800, 25);

    let v2 = env.write("v2.yaml", &spec(listen, "v2", ""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_status(
        &client,
        "hello",
        Duration::from_secs(30),
        "the canary at 10 %",
        |v| weight(v, "v2") == 10 && acked(v),
    )
    .await;
    // A tester reaches the canary on demand; others stay where they are.
    assert_eq!(
        get_with(listen, ("x-canary", "always")).await.trim(),
        "hello from v2"
    );
    wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;
    // A second for every client to be asked once more, now that v2 has all traffic.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = load.report();
    eprintln!(
        "v1 → v2: {} requests, {} clients moved, {} flip-flops",
        r.sent, r.clients_moved, r.flip_flops
    );
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    assert_eq!(
        r.flip_flops, 0,
        "a sticky client went back to a revision it had left"
    );
    assert!(
        r.clients_moved >= 190,
        "clients moved onto v2 as it grew: {}",
        r.clients_moved
    );

    // A v3 that fails half its answers: shielded, users see stable's answers.
    let before = load.report();
    let v3 = env.write("v3.yaml", &spec(listen, "v3", ", FAIL_RATE: \"0.5\""));
    assert!(env.run(&["apply", "-f", path_str(&v3)]).status.success());
    let bad = wait_status(
        &client,
        "hello",
        Duration::from_secs(60),
        "v3 rolled back",
        |v| v["phase"] == "Degraded" && weight(v, "v3") == 0 && acked(v),
    )
    .await;
    let msg = bad["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("gate errors failed"),
        "the analysis still saw v3's failures: {msg}"
    );
    let r = load.stop().await;
    eprintln!(
        "v3: {} requests during its canary, {} failed",
        r.sent - before.sent,
        r.failed
    );
    assert_eq!(
        r.failed, 0,
        "a shielded canary fails no user request: {:?}",
        r.failures
    );
}

/// A WebSocket client across a rollout: its instance closes it with 1012 when it
/// drains; the client reconnects and lands on the new revision. Nothing abnormal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_move_to_the_new_revision_with_a_clean_close() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        tokio_tungstenite::client_async(format!("ws://{listen}/ws"), tcp)
            .await
            .expect("handshake")
            .0
    };
    let mut ws = connect().await;
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("answer").expect("ok"),
        Message::text("v1: hi")
    );

    let v2 = env.write("v2.yaml", &spec(listen, "v2", ""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;
    // v1's instances drain: the session ends with a clean close, not a dropped socket.
    let end = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("closed in time");
    match end {
        Some(Ok(Message::Close(Some(f)))) => {
            let code = u16::from(f.code);
            assert!(code == 1012 || code == 1001, "close code {code}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    let mut again = connect().await;
    again.send(Message::text("hi")).await.expect("send");
    assert_eq!(
        again.next().await.expect("answer").expect("ok"),
        Message::text("v2: hi")
    );
}

/// `baton restart-proxy` under load: a new proxy process, not one failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_dies_while_nothing_changes_is_replaced() {
    let mut env = Env::new();
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");
    let proxy = baton_proxy::ProxyClient::new(env.paths.proxy_socket());
    let (old_pid, _) = proxy.ping().await.expect("proxy");
    // A crash: no draining, no handover, the rollout Healthy with nothing to push.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the proxy");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let new_pid = loop {
        match proxy.ping().await {
            Ok((pid, _)) if pid != old_pid => break pid,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new proxy within 10 s:\n{}",
            env.up_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(new_pid, old_pid);
    // It was given the routing table: the service answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new proxy does not listen on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(listen, "/").await.trim(), "hello from v1");
    let audit = stdout(&env.run(&["audit"]));
    assert!(audit.contains("started a new one"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_proxy_under_load_fails_no_request() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut env = Env::new();
    // Settings given to `baton up` only: the restarted proxy must keep them.
    env.up_env = vec![
        ("BATON_PROXY_WORKERS".into(), "1".into()),
        ("BATON_PROXY_CPU_AFFINITY".into(), "auto".into()),
    ];
    let listen = free_addr();
    let v1 = env.write("v1.yaml", &spec(listen, "v1", ""));
    let client = env.start_healthy(&["-f", path_str(&v1)], "hello").await;
    let proxy = baton_proxy::ProxyClient::new(env.paths.proxy_socket());
    let (old_pid, _) = proxy.ping().await.expect("proxy");
    let settings = proxy.settings().await.expect("proxy").expect("settings");
    assert_eq!(
        (settings.workers, settings.cpu_affinity),
        (1, baton_proxy::CpuAffinity::Auto)
    );
    let load = Load::start(listen, 8, 800);
    // A WebSocket open across the restart: the old process closes it with 1001.
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        tokio_tungstenite::client_async(format!("ws://{listen}/ws"), tcp)
            .await
            .expect("handshake")
            .0
    };
    let mut ws = connect().await;
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("answer").expect("ok"),
        Message::text("v1: hi")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = env.run(&["restart-proxy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("proxy restarted"), "{}", stdout(&out));
    let audit = stdout(&env.run(&["audit"]));
    assert!(audit.contains("proxy restarted: pid"), "{audit}");
    let (new_pid, _) = proxy.ping().await.expect("proxy");
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        proxy.settings().await.expect("proxy"),
        Some(settings),
        "the new proxy runs as the old one did"
    );
    // The old process drains and goes.
    wait_until(Duration::from_secs(15), "the old proxy to exit", || {
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = load.stop().await;
    eprintln!(
        "{} requests across the proxy restart, {} failed",
        r.sent, r.failed
    );
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    match tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("closed in time")
    {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    let mut again = connect().await;
    again.send(Message::text("back")).await.expect("send");
    assert_eq!(
        again.next().await.expect("answer").expect("ok"),
        Message::text("v1: back")
    );
    // The controller keeps steering the new proxy.
    let v2 = env.write("v2.yaml", &spec(listen, "v2", ""));
    assert!(env.run(&["apply", "-f", path_str(&v2)]).status.success());
    wait_stable(&client, "hello", "v2", Duration::from_secs(60)).await;
}

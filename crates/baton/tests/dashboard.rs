//! The web dashboard in a real headless Chromium (Debian `chromium` and
//! `chromium-driver`, driven over WebDriver): an unauthenticated visit sees only the
//! login page; after logging in, a canary moves from step to step on the page without
//! a reload, and a focused button and a text selection survive its updates (the page
//! is patched in place); another rollout is aborted from its page (with confirmation)
//! and is seen rolled back; forged actions (no CSRF token, a foreign Origin, a viewer's
//! session) are refused and change nothing; a rollout whose listener is taken shows
//! the routing error and its served weight against the desired one. A screenshot of a
//! rollout page mid-canary is saved under the test's output directory.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Env, canary_spec, free_addr, wait_status};
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// chromedriver in a process group of its own, with the browser it starts: dropping it
/// (a test's end, or its panic) stops them all — killing chromedriver alone left the
/// browser running.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = free_addr().port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver; scripts/test installs it)");
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-crash-reporter", "--disable-breakpad", "--window-size=1280,1700"]}),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Polls the page until `f` returns Some, or fails with `what` at the deadline.
async fn eventually<T>(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// How many status events the page has applied (`#app[data-updates]`).
async fn updates(c: &Client) -> Option<u64> {
    c.execute(
        "return Number(document.getElementById('app').dataset.updates || 0);",
        vec![],
    )
    .await
    .ok()?
    .as_u64()
}

/// A raw HTTP request to the dashboard, as a forger would send it.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Vec<String>) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tx.send_request(req).await.expect("response");
    let code = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let text = resp.into_body().collect().await.expect("body").to_bytes();
    (code, String::from_utf8_lossy(&text).into_owned(), cookies)
}

fn named(spec: String, name: &str) -> String {
    spec.replace(
        "metadata: { name: hello }",
        &format!("metadata: {{ name: {name} }}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_rollouts_live_and_acts_safely() {
    let mut env = Env::new();
    let viewer_token = "viewer-token-0123456789abcdef";
    let (web, api) = (free_addr(), free_addr());
    let web_steps = "        - setWeight: 20\n        - pause: { duration: 3s }\n        - setWeight: 50\n        - pause: { duration: 3s }\n        - setWeight: 80\n        - pause: {}";
    let api_steps = "        - setWeight: 30\n        - pause: {}";
    let spec = |v: &str| {
        format!(
            "{}---\n{}",
            named(canary_spec(web, v, "", web_steps), "web"),
            named(canary_spec(api, v, "", api_steps), "api")
        )
    };
    let file = env.write("spec.yaml", &spec("v1"));
    std::fs::create_dir_all(&env.paths.root).expect("state dir");
    std::fs::write(
        env.paths.root.join("tokens"),
        format!("watcher {viewer_token} viewer\n"),
    )
    .expect("tokens");
    let client = env
        .start_healthy(&["-f", file.to_str().expect("path")], "web")
        .await;
    wait_status(
        &client,
        "api",
        Duration::from_secs(30),
        "api healthy",
        |v| v["phase"] == "Healthy",
    )
    .await;
    let addr: SocketAddr = std::fs::read_to_string(env.paths.api_addr())
        .expect("api addr")
        .trim()
        .parse()
        .expect("addr");
    let token = std::fs::read_to_string(env.paths.token())
        .expect("token")
        .trim()
        .to_string();
    let base = format!("http://{addr}");
    let load = baton::load::Load::start(web, 4, 120);

    // Without a session nothing but the login page is readable.
    let (code, body, _) = raw(addr, "GET", "/ui/api/rollouts", &[], "").await;
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("web"), "{body}");
    let (code, _, _) = raw(addr, "GET", "/ui/events", &[], "").await;
    assert_eq!(code, 401);

    let (_driver, c) = browser().await;
    c.goto(&format!("{base}/ui/")).await.expect("goto");
    let url = c.current_url().await.expect("url");
    assert_eq!(
        url.path(),
        "/ui/login",
        "an unauthenticated visit lands on the login page"
    );
    let source = c.source().await.expect("source");
    assert!(
        source.contains("login-form") && !source.contains("rollouts"),
        "{source}"
    );

    // A wrong token is refused; the right one logs in.
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys("not-the-token")
        .await
        .expect("type");
    c.find(Locator::Css("#login"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    let err = eventually(Duration::from_secs(10), "the login error", async || {
        text_of(&c, "#login-error").await
    })
    .await;
    assert!(err.contains("not valid"), "{err}");
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(&token)
        .await
        .expect("type");
    c.find(Locator::Css("#login"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    eventually(
        Duration::from_secs(10),
        "both rollouts listed",
        async || {
            let t = text_of(&c, "#rollouts").await?;
            (t.contains("web") && t.contains("api")).then_some(())
        },
    )
    .await;
    assert_eq!(text_of(&c, "#who").await.as_deref(), Some("admin (admin)"));

    // Watch web's canary move from step to step on one page load.
    c.goto(&format!("{base}/ui/#/r/web")).await.expect("goto");
    eventually(Duration::from_secs(10), "the rollout page", async || {
        text_of(&c, "#rollout-name").await
    })
    .await;
    c.execute("window.__sameLoad = 'yes'; return null;", vec![])
        .await
        .expect("mark the page");
    // A keyboard user sits on a button, with the rollout's name selected, while the
    // canary runs: updates patch the page in place, so neither is lost.
    let promote = c
        .find(Locator::Css("#act-promote"))
        .await
        .expect("the promote button");
    let promote_ref = serde_json::to_value(&promote).expect("element reference");
    c.execute(
        "const r = document.createRange(); r.selectNodeContents(document.getElementById('rollout-name')); \
         const s = window.getSelection(); s.removeAllRanges(); s.addRange(r); \
         arguments[0].focus(); return null;",
        vec![promote_ref.clone()],
    )
    .await
    .expect("focus and select");
    let updates_before = eventually(Duration::from_secs(5), "the update counter", async || {
        updates(&c).await
    })
    .await;
    env.write("spec.yaml", &spec("v2"));
    let out = env.run(&["apply", "-f", file.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = BTreeSet::new();
    let screenshot_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&screenshot_dir).expect("output dir");
    let mut shot = false;
    // [focus on the same button, the selected text], read once the page shows a step
    // (it showed none before) and has applied two status events since the focus.
    let mut kept: Option<Result<serde_json::Value, String>> = None;
    eventually(
        Duration::from_secs(60),
        "the page to show steps 1, 3 and 5 of web's canary",
        async || {
            let current = c.find(Locator::Css("#steps li.current")).await.ok()?;
            let index = current.attr("data-index").await.ok()??;
            seen.insert(index.clone());
            if kept.is_none() && updates(&c).await? >= updates_before + 2 {
                let read = c
                    .execute(
                        "return [document.activeElement === arguments[0], window.getSelection().toString()];",
                        vec![promote_ref.clone()],
                    )
                    .await
                    .map_err(|e| e.to_string());
                let id = promote.attr("id").await.map_err(|e| e.to_string());
                kept = Some(read.and_then(|v| Ok(serde_json::json!([v, id?]))));
                // The screenshot shows the page as it is seen, not as it was tested.
                c.execute(
                    "document.activeElement.blur(); window.getSelection().removeAllRanges(); return null;",
                    vec![],
                )
                .await
                .ok()?;
            }
            if index == "3" && !shot && kept.is_some() {
                // Mid-canary: 50 % on v2, charts filling.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let png = c.screenshot().await.ok()?;
                std::fs::write(screenshot_dir.join("rollout-mid-canary.png"), &png).ok()?;
                if let Ok(extra) = std::env::var("BATON_DASHBOARD_SCREENSHOT") {
                    std::fs::write(extra, &png).ok()?;
                }
                shot = true;
            }
            (seen.contains("1") && seen.contains("3") && seen.contains("5")).then_some(())
        },
    )
    .await;
    assert_eq!(
        kept.expect("focus read during the canary")
            .expect("the focused button is still on the page (its reference is not stale)"),
        serde_json::json!([[true, "web"], "act-promote"]),
        "[[focus still on the promote button, the selected text], its id] after the updates"
    );
    assert!(shot, "the mid-canary screenshot was taken");
    let same = c
        .execute("return window.__sameLoad || null;", vec![])
        .await
        .expect("read mark");
    assert_eq!(
        same,
        serde_json::json!("yes"),
        "the page was never reloaded"
    );
    eventually(Duration::from_secs(15), "the weights at 80 %", async || {
        let weights = text_of(&c, "#weights").await?;
        weights.contains("80 %").then_some(())
    })
    .await;
    // The bars are drawn to scale: the canary's fills 80 % of its track (once its
    // width has slid there: the same bar is resized, with a short transition).
    let mut share = 0.0;
    eventually(
        Duration::from_secs(5),
        "the canary bar at 80 % of its track",
        async || {
            share = c
                .execute(
                    "const b = document.querySelector('#weights .role-canary'); return b.firstChild.getBoundingClientRect().width / b.getBoundingClientRect().width;",
                    vec![],
                )
                .await
                .ok()?
                .as_f64()?;
            ((share - 0.8).abs() < 0.02).then_some(())
        },
    )
    .await;
    assert!(share > 0.0, "canary bar fills {share} of its track");
    // Latency points come once a second from the proxy's counters: a loaded machine
    // may not have drawn the first ones yet.
    eventually(
        Duration::from_secs(15),
        "p50 and p99 lines on the latency chart",
        async || {
            let paths = c.find_all(Locator::Css("#chart-latency path")).await.ok()?;
            let mut kinds = BTreeSet::new();
            for p in &paths {
                kinds.insert(p.attr("data-line").await.ok().flatten().unwrap_or_default());
            }
            (kinds.contains("p99") && kinds.contains("p50")).then_some(())
        },
    )
    .await;

    // Forged actions change nothing.
    let cookies = c.get_all_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|k| k.name() == "baton_session")
        .expect("session cookie");
    assert_eq!(session.http_only(), Some(true));
    let cookie = format!("baton_session={}", session.value());
    let (code, body, _) = raw(
        addr,
        "POST",
        "/ui/api/rollouts/web/abort",
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(code, 403, "no CSRF token: {body}");
    let (code, _, _) = raw(
        addr,
        "POST",
        "/ui/api/rollouts/web/abort",
        &[("cookie", &cookie), ("x-csrf-token", "guess")],
        "",
    )
    .await;
    assert_eq!(code, 403, "a wrong CSRF token");
    let csrf = c
        .execute("return state.session.csrf;", vec![])
        .await
        .expect("csrf");
    let csrf = csrf.as_str().expect("csrf string").to_string();
    let (code, _, _) = raw(
        addr,
        "POST",
        "/ui/api/rollouts/web/abort",
        &[
            ("cookie", &cookie),
            ("x-csrf-token", &csrf),
            ("origin", "http://evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(code, 403, "a foreign origin");
    // A viewer may watch, not act.
    let (code, _, set) = raw(
        addr,
        "POST",
        "/ui/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("token={viewer_token}"),
    )
    .await;
    assert_eq!(code, 303);
    let viewer_cookie = set
        .iter()
        .find_map(|c| c.split(';').next())
        .expect("viewer cookie")
        .to_string();
    let (_, session_json, _) = raw(
        addr,
        "GET",
        "/ui/api/session",
        &[("cookie", &viewer_cookie)],
        "",
    )
    .await;
    let vs: serde_json::Value = serde_json::from_str(&session_json).expect("session");
    assert_eq!(vs["role"], "viewer");
    let (code, body, _) = raw(
        addr,
        "POST",
        "/ui/api/rollouts/web/abort",
        &[
            ("cookie", &viewer_cookie),
            ("x-csrf-token", vs["csrf"].as_str().unwrap_or("")),
        ],
        "",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let v = wait_status(
        &client,
        "web",
        Duration::from_secs(5),
        "web untouched",
        |v| v["phase"] == "Paused",
    )
    .await;
    assert_eq!(v["aborted"], false, "no forged action took effect");

    // Abort api from its page, with confirmation, and see it rolled back.
    wait_status(
        &client,
        "api",
        Duration::from_secs(30),
        "api paused on its canary",
        |v| v["phase"] == "Paused",
    )
    .await;
    c.goto(&format!("{base}/ui/#/r/api")).await.expect("goto");
    eventually(Duration::from_secs(10), "api's page", async || {
        (text_of(&c, "#rollout-name").await? == "api").then_some(())
    })
    .await;
    // Updates patch the page in place: the button found is the one clicked.
    c.find(Locator::Css("#act-abort"))
        .await
        .expect("the abort button")
        .click()
        .await
        .expect("a click on abort");
    let dialog_text = eventually(Duration::from_secs(5), "the confirmation", async || {
        let t = text_of(&c, "#confirm-title").await?;
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert!(dialog_text.contains("Abort api"), "{dialog_text}");
    c.find(Locator::Css("#confirm-ok"))
        .await
        .expect("confirm")
        .click()
        .await
        .expect("click");
    eventually(
        Duration::from_secs(20),
        "api shown rolled back",
        async || {
            let phase = text_of(&c, "#phase").await?;
            let weights = text_of(&c, "#weights").await?;
            (phase == "Degraded" && weights.contains("100 %")).then_some(())
        },
    )
    .await;
    let v = wait_status(&client, "api", Duration::from_secs(5), "api aborted", |v| {
        v["aborted"] == true
    })
    .await;
    assert_eq!(common::weight(&v, "v1"), 100);
    // The audit trail names who did it, from where.
    eventually(
        Duration::from_secs(10),
        "the abort in the page's audit trail",
        async || {
            let t = text_of(&c, "#audit").await?;
            t.contains("admin/dashboard").then_some(())
        },
    )
    .await;
    let report = load.stop().await;
    assert_eq!(
        report.failed, 0,
        "nothing the dashboard did failed a request"
    );

    // A rollout whose listener another program holds: the router serves nothing of
    // it, and the page says so and why.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr");
    let blocked = env.write(
        "blocked.yaml",
        &named(canary_spec(taken, "v1", "", api_steps), "blocked"),
    );
    let out = env.run(&["apply", "-f", blocked.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.goto(&format!("{base}/ui/#/")).await.expect("goto");
    let warning = eventually(
        Duration::from_secs(30),
        "the routing error on blocked's row",
        async || {
            let t = text_of(&c, "tr[data-rollout=blocked] .routing-error").await?;
            t.contains("cannot listen").then_some(t)
        },
    )
    .await;
    assert!(warning.contains("Not served as asked"), "{warning}");
    assert_eq!(
        text_of(&c, "tr[data-rollout=web] .routing-error")
            .await
            .as_deref(),
        Some(""),
        "no warning where the route is served"
    );
    c.goto(&format!("{base}/ui/#/r/blocked"))
        .await
        .expect("goto");
    eventually(
        Duration::from_secs(30),
        "blocked's page: the warning, nothing served of the 100 % desired",
        async || {
            let warning = text_of(&c, "#routing-error").await?;
            let weights = text_of(&c, "#weights").await?;
            (warning.contains("cannot listen") && weights.contains("0 % → desired 100 %"))
                .then_some(())
        },
    )
    .await;
    // Where served and desired agree, only one weight is shown.
    c.goto(&format!("{base}/ui/#/r/web")).await.expect("goto");
    eventually(Duration::from_secs(10), "web's weights", async || {
        let weights = text_of(&c, "#weights").await?;
        let warning = text_of(&c, "#routing-error").await?;
        (weights.contains("80 %") && !weights.contains("desired") && warning.is_empty())
            .then_some(())
    })
    .await;
    drop(squatter);
}

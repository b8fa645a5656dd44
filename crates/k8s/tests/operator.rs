//! Whole rollouts through the real controller loop (kube-runtime's Controller and
//! watchers over the real kube client) against the in-memory API server, with the
//! simulated cluster playing kubelet, ReplicaSet controller and Gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_k8s::controller::{self, Context, REQUEST_ANNOTATION};
use baton_k8s::crd::Rollout;
use baton_kube_fake::{FakeApi, Key, sim};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

struct Cluster {
    api: FakeApi,
    client: Client,
    _sim: tokio::task::JoinHandle<()>,
}

async fn cluster() -> Cluster {
    let api = FakeApi::start().await.expect("fake api");
    let sim = sim::start(api.store.clone(), sim::SimConfig::default());
    let config = kube::Config::new(api.url().parse().expect("url"));
    let client = Client::try_from(config).expect("client");
    Cluster {
        api,
        client,
        _sim: sim,
    }
}

/// The image and the one service account (`deployer`) the tests' operator allows Jobs.
const JOB_IMAGE: &str = "registry.example/baton:test";

fn operator(c: &Cluster, id: &str) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    let jobs = baton_k8s::jobs::Settings {
        image: Some(JOB_IMAGE.into()),
        accounts: ["deployer".to_string()].into(),
    };
    let ctx = Context::configured(
        c.client.clone(),
        id,
        baton_k8s::audit::Seal::default(),
        jobs,
    );
    let task = tokio::spawn(controller::run(
        ctx.clone(),
        Some("default".into()),
        std::future::pending(),
    ));
    (ctx, task)
}

/// Stops an operator and waits until its task is gone (an abort alone returns before).
async fn stop(op: tokio::task::JoinHandle<()>) {
    op.abort();
    let _ = op.await;
}

/// Rewrites the engine's stored status with `edit`. A write the stopped operator had
/// already sent can still land between the read and the replace: then read again.
async fn rewrite_engine_status(
    api: &Api<Rollout>,
    edit: impl Fn(&mut serde_json::Map<String, Value>),
) {
    wait_for(
        Duration::from_secs(10),
        "the status rewritten",
        async || {
            let mut ro = api.get("web").await.expect("rollout");
            let engine = ro
                .status
                .as_mut()
                .and_then(|st| st.engine.as_mut())
                .and_then(|e| e.as_object_mut())
                .expect("engine");
            edit(engine);
            ro.metadata.managed_fields = None;
            match api.replace_status("web", &PostParams::default(), &ro).await {
                Ok(_) => Some(()),
                Err(kube::Error::Api(e)) if e.code == 409 => None,
                Err(e) => panic!("write: {e}"),
            }
        },
    )
    .await;
}

/// A loopback HTTP/1.1 server: every request's body goes to `answer`, whose text is
/// the answer.
async fn loopback<F>(answer: F) -> std::net::SocketAddr
where
    F: Fn(bytes::Bytes) -> String + Clone + Send + Sync + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(answer(body))),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A metric endpoint for `web` gates: answers `{"value": 0.001}`, or 0.5 once `bad`.
async fn metric_server(bad: Arc<AtomicBool>) -> String {
    let addr = loopback(move |_| {
        let v = if bad.load(Ordering::SeqCst) {
            0.5
        } else {
            0.001
        };
        json!({"value": v}).to_string()
    })
    .await;
    format!("http://{addr}/metric?revision={{{{revision}}}}")
}

fn template(image: &str) -> Value {
    json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": image}]}})
}

async fn create<K>(api: &Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create")
}

async fn wait_for<T>(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        // A call that never answers fails here, naming what it waited for, rather than
        // at the runner's kill with nothing said (one run hung 240 s, unexplained).
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left + Duration::from_secs(5), f()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("a call hung past {limit:?} while waiting for {what}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; the last status read: {}",
            LAST_STATUS.lock().map(|s| s.clone()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last Rollout status a test read, for `wait_for`'s timeout message: a wait that
/// ran out says where the rollout stood (nextest runs each test in its own process).
static LAST_STATUS: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

async fn status(api: &Api<Rollout>, name: &str) -> Value {
    let ro = api.get(name).await.expect("rollout");
    let s = serde_json::to_value(&ro.status).expect("json");
    if let Ok(mut last) = LAST_STATUS.lock() {
        *last = format!(
            "{name} (generation {:?}, resourceVersion {:?}): {s}",
            ro.metadata.generation, ro.metadata.resource_version
        );
    }
    s
}

/// The `web` HTTPRoute as the fake API stores it.
fn route(c: &Cluster) -> std::sync::Arc<Value> {
    c.api
        .store
        .get(&Key::new(
            "gateway.networking.k8s.io/v1",
            "httproutes",
            Some("default"),
            "web",
        ))
        .expect("route")
}

async fn route_weights(c: &Cluster) -> (u64, u64) {
    let route = route(c);
    // The weighted rule (the canary-header rule, when there, names only the canary).
    let rules = route["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let weighted = rules
        .iter()
        .find(|r| r["name"] != "baton-canary-header")
        .cloned()
        .unwrap_or_default();
    let refs = weighted["backendRefs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let w = |n: &str| {
        refs.iter()
            .find(|r| r["name"] == n)
            .and_then(|r| r["weight"].as_u64())
            .unwrap_or(0)
    };
    (w("web-stable"), w("web-canary"))
}

/// The stable and canary Services a canary's router points at.
async fn canary_services(c: &Cluster) {
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    for name in ["web-stable", "web-canary"] {
        create(&services, json!({"metadata": {"name": name}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})).await;
    }
}

async fn gateway_fixture(c: &Cluster) {
    canary_services(c).await;
    let routes: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &baton_k8s::router::gateway::api_resource(),
    );
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "web-stable", "port": 80}]}]},
    }))
    .expect("route");
    routes
        .create(&PostParams::default(), &route)
        .await
        .expect("create route");
}

fn canary_rollout(metric_url: &str, steps: Value) -> Value {
    json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": template("registry.example/web:v1"),
            "strategy": {"canary": {
                "stableService": "web-stable", "canaryService": "web-canary",
                "trafficRouting": {"gatewayAPI": {"httpRoute": "web"}},
                "steps": steps,
            }},
            "analysis": {"gates": [{
                "name": "errors",
                "metric": {"web": {"url": metric_url, "jsonPath": "value"}},
                "successCondition": "result < 0.01",
                "interval": "200ms",
            }]},
        },
    })
}

/// Waits until `web` is Healthy with `version` stable.
async fn wait_healthy(api: &Api<Rollout>, version: &str) {
    wait_for(
        Duration::from_secs(20),
        &format!("{version} healthy"),
        async || {
            let s = status(api, "web").await;
            (s["phase"] == "Healthy" && s["stableVersion"] == version).then_some(())
        },
    )
    .await;
}

async fn set_image(api: &Api<Rollout>, image: &str) {
    let patch = json!({"spec": {"template": template(image)}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch template");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_through_gateway_api_weights_to_full_promotion() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 20}, {"analysis": {"gates": ["errors"]}}, {"setWeight": 50}, {"pause": {"duration": "300ms"}}, {"setWeight": 80}]);
    let mut ro = canary_rollout(&url, steps);
    ro["spec"]["strategy"]["canary"]["canaryHeader"] =
        json!({"name": "X-Canary", "value": "always"});
    ro["spec"]["strategy"]["canary"]["mirrorPercent"] = json!(10);
    ro["spec"]["strategy"]["canary"]["mirrorMethods"] = json!(["GET"]);
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "test-0");
    wait_healthy(&rollouts, "v1").await;

    set_image(&rollouts, "registry.example/web:v2").await;
    // Watch the route: the canary's share only ever grows through the steps, and the
    // route never gives the canary a share before its pods are ready.
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let mut seen = Vec::new();
    let mut saw_header = false;
    let mut saw_mirror = false;
    wait_for(Duration::from_secs(30), "v2 promoted", async || {
        let (_, canary) = route_weights(&c).await;
        let route = route(&c);
        // GETs copied to the canary by a rule of their own (a method match is more
        // specific than the weighted rule's), with the weighted rule's backends.
        saw_mirror |= route["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| {
                r["name"] == "baton-mirror"
                    && r["matches"] == json!([{"method": "GET"}])
                    && r["filters"][0]["requestMirror"]
                        == json!({"backendRef": {"name": "web-canary", "port": 80}, "percent": 10})
            });
        if route["spec"]["rules"][0]["name"] == "baton-canary-header"
            && route["spec"]["rules"][0]["matches"][0]["headers"][0]["name"] == "X-Canary"
        {
            saw_header = true;
        }
        if seen.last() != Some(&canary) {
            seen.push(canary);
        }
        let s = status(&rollouts, "web").await;
        if canary > 0 && canary < 100 {
            let rev = s["canaryRevision"].as_str().unwrap_or("");
            if let Ok(rs) = rs_api.get(&format!("web-{rev}")).await {
                let ready = rs.status.and_then(|s| s.ready_replicas).unwrap_or(0);
                assert!(ready > 0, "the canary had {canary}% with no ready pod");
            }
        }
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2").then_some(())
    })
    .await;
    assert!(
        saw_header,
        "testers could reach the canary by header during the rollout"
    );
    assert!(
        saw_mirror,
        "GETs were mirrored to the canary during the rollout"
    );
    let shares: Vec<u64> = seen.iter().copied().filter(|w| *w > 0).collect();
    assert_eq!(
        shares,
        vec![20, 50, 80, 100],
        "the route went through each step, then all to the canary before promotion: {seen:?}"
    );
    // The status is written before the operator acts on it: the route follows.
    wait_for(
        Duration::from_secs(10),
        "all traffic on the stable Service and the header rule gone after promotion",
        async || {
            let rules = route(&c)["spec"]["rules"].clone();
            let baton_rule = rules
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["name"] == "baton-canary-header" || r["name"] == "baton-mirror");
            (!baton_rule && route_weights(&c).await == (100, 0)).then_some(())
        },
    )
    .await;
    let s = status(&rollouts, "web").await;
    let stable_rev = s["stableRevision"].as_str().expect("stable").to_string();
    let svc: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let sel = svc
        .get("web-stable")
        .await
        .expect("svc")
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default();
    assert_eq!(
        sel.get("baton.dev/revision"),
        Some(&stable_rev),
        "the stable Service points at v2's pods"
    );
    // v1 goes to zero once the route serves v2 alone (verified, then scaled).
    wait_for(
        Duration::from_secs(10),
        "v2 at 3 replicas and v1 scaled away",
        async || {
            let rss = rs_api.list(&Default::default()).await.ok()?.items;
            let scaled: Vec<(String, i32)> = rss
                .iter()
                .map(|r| {
                    (
                        r.name_any(),
                        r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                    )
                })
                .collect();
            let stable = format!("web-{stable_rev}");
            (scaled.iter().any(|(n, r)| *n == stable && *r == 3)
                && scaled.iter().all(|(n, r)| *n == stable || *r == 0))
            .then_some(())
        },
    )
    .await;
    let conditions = s["conditions"].as_array().cloned().unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True"),
        "{conditions:?}"
    );
    let (events, _) = c
        .api
        .store
        .list("events.k8s.io/v1", "events", Some("default"));
    assert!(
        events.iter().any(|e| e["reason"] == "Promoted"),
        "an Event for the promotion: {events:?}"
    );
    // The operator's writes name it, so a GitOps tool can leave its fields alone.
    let managers = |gv: &str, resource: &str, name: &str| {
        let obj = c
            .api
            .store
            .get(&Key::new(gv, resource, Some("default"), name))
            .expect("object");
        obj["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["manager"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let route = managers("gateway.networking.k8s.io/v1", "httproutes", "web");
    assert!(route.iter().any(|m| m == "baton-operator"), "{route:?}");
    let stable = managers("v1", "services", "web-stable");
    assert!(stable.iter().any(|m| m == "baton-operator"), "{stable:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_analysis_rolls_back_and_an_operator_restart_resumes_at_the_same_step() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let bad = Arc::new(AtomicBool::new(false));
    let url = metric_server(bad.clone()).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 20}, {"pause": {}}, {"analysis": {"gates": ["errors"]}}, {"setWeight": 60}]);
    create(&rollouts, canary_rollout(&url, steps)).await;
    let (ctx, op) = operator(&c, "test-a");
    wait_for(Duration::from_secs(20), "v1 healthy", async || {
        (status(&rollouts, "web").await["phase"] == "Healthy").then_some(())
    })
    .await;

    // Paused at 20 % until promoted; the operator dies there.
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(20), "paused at 20 %", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Paused" && route_weights(&c).await.1 == 20).then_some(())
    })
    .await;
    stop(op).await;
    drop(ctx);
    // What the release before the driver wrote: the engine's status alone, with no
    // outbox and no event count.
    rewrite_engine_status(&rollouts, |engine| {
        assert!(
            engine.remove("events").is_some(),
            "the driver counts events"
        );
        engine.remove("outbox");
    })
    .await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let uids = |list: Vec<ReplicaSet>| {
        let mut v: Vec<(String, String)> = list
            .into_iter()
            .map(|rs| (rs.name_any(), rs.uid().unwrap_or_default()))
            .collect();
        v.sort();
        v
    };
    let before = uids(rs_api.list(&Default::default()).await.expect("list").items);
    assert_eq!(before.len(), 2, "{before:?}");
    let (_ctx, _op) = operator(&c, "test-b");
    // A new operator (no state of its own) resumes at the same step: still paused at 20 %.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&rollouts, "web").await;
    assert_eq!(s["phase"], "Paused", "{s}");
    assert_eq!(route_weights(&c).await.1, 20);
    assert_eq!(s["engine"]["stepIndex"], 1);
    let after = uids(rs_api.list(&Default::default()).await.expect("list").items);
    assert_eq!(after, before, "the same ReplicaSets, none recreated");

    // Promote past the pause (as `baton promote` does); the analysis then fails.
    bad.store(true, Ordering::SeqCst);
    let req = json!({"metadata": {"annotations": {REQUEST_ANNOTATION: json!({"id": "r1", "command": "promote", "by": "test"}).to_string()}}});
    rollouts
        .patch("web", &PatchParams::default(), &Patch::Merge(req))
        .await
        .expect("request");
    wait_for(Duration::from_secs(20), "rolled back", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded" && route_weights(&c).await == (100, 0)).then_some(())
    })
    .await;
    let s = status(&rollouts, "web").await;
    assert_eq!(s["stableVersion"], "v1");
    assert!(
        s["message"].as_str().unwrap_or("").contains("errors"),
        "{s}"
    );
    let canary = s["canaryRevision"].as_str().unwrap_or("").to_string();
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    wait_for(
        Duration::from_secs(10),
        "the canary scaled to zero",
        async || {
            let rs = rs_api.get(&format!("web-{canary}")).await.ok()?;
            (rs.spec.and_then(|s| s.replicas) == Some(0)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switches_service_selectors_after_its_smoke_job() {
    let c = cluster().await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    for name in ["web", "web-preview"] {
        create(&services, json!({"metadata": {"name": name}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})).await;
    }
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {
                "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                "template": template("registry.example/web:v1"),
                "strategy": {"blueGreen": {"activeService": "web", "previewService": "web-preview", "smoke": [{"path": "/readyz"}], "retainPrevious": "1h"}},
            },
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "bg");
    let selector = async |svc: &str| -> Option<String> {
        services
            .get(svc)
            .await
            .ok()?
            .spec?
            .selector?
            .get("baton.dev/revision")
            .cloned()
    };
    wait_for(Duration::from_secs(20), "v1 active", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && selector("web").await.is_some()).then_some(())
    })
    .await;
    let v1 = selector("web").await.expect("v1 selector");
    set_image(&rollouts, "registry.example/web:v2").await;
    let v2 = wait_for(Duration::from_secs(30), "v2 active", async || {
        let s = status(&rollouts, "web").await;
        let active = selector("web").await?;
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2" && active != v1).then_some(active)
    })
    .await;
    assert_eq!(selector("web-preview").await.as_deref(), Some(v2.as_str()));
    let (jobs, _) = c.api.store.list("batch/v1", "jobs", Some("default"));
    assert_eq!(jobs.len(), 1, "one smoke Job for v2");
    // `baton smoke` in Baton's own image, the tests as JSON data: no shell, and the
    // namespace's default account with no token.
    let pod = &jobs[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], JOB_IMAGE);
    assert!(container.get("command").is_none(), "{container}");
    assert_eq!(
        container["args"].as_array().map(|a| a[..4].to_vec()),
        Some(vec![
            json!("smoke"),
            json!("--url"),
            json!("http://web-preview.default.svc"),
            json!("--tests")
        ]),
        "{container}"
    );
    let tests: Value =
        serde_json::from_str(container["args"][4].as_str().expect("tests")).expect("JSON data");
    assert_eq!(tests[0]["path"], "/readyz", "{tests}");
    assert_eq!(pod["serviceAccountName"], "default");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // The previous stack is retained for a switch back.
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let old = rs_api.get(&format!("web-{v1}")).await.expect("old rs");
    assert_eq!(
        old.spec.and_then(|s| s.replicas),
        Some(2),
        "retainPrevious keeps the old stack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_taken_over_without_a_moment_of_zero_ready_pods() {
    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    create(
        &deployments,
        json!({"metadata": {"name": "api"}, "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": template("registry.example/api:v7")}}),
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the Deployment ready",
        async || {
            let d = deployments.get("api").await.ok()?;
            (d.status?.ready_replicas? == 2).then_some(())
        },
    )
    .await;
    let (watching, min_ready) = min_ready_pods(&c);
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "api"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "workloadRef": {"name": "api"}, "strategy": {"canary": {"steps": []}}},
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "takeover");
    wait_for(
        Duration::from_secs(20),
        "the Deployment scaled to zero",
        async || {
            let d = deployments.get("api").await.ok()?;
            let s = status(&rollouts, "api").await;
            (d.spec?.replicas == Some(0) && s["phase"] == "Healthy" && s["stableVersion"] == "v7")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    watching.store(false, Ordering::SeqCst);
    let min = min_ready.await.expect("watcher");
    assert!(min >= 2, "ready pods fell to {min} during the takeover");
    let d = deployments.get("api").await.expect("deployment");
    assert_eq!(
        d.annotations()
            .get("baton.dev/taken-over-by")
            .map(String::as_str),
        Some("api")
    );
}

/// Counts ready pods every 10 ms until the flag is cleared; answers the fewest seen.
fn min_ready_pods(c: &Cluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let store = c.api.store.clone();
    let watching = Arc::new(AtomicBool::new(true));
    let w = watching.clone();
    let task = tokio::spawn(async move {
        let mut min = usize::MAX;
        while w.load(Ordering::SeqCst) {
            let (pods, _) = store.list("v1", "pods", Some("default"));
            let ready = pods
                .iter()
                .filter(|p| {
                    p["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .count();
            min = min.min(ready);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        min
    });
    (watching, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_surges_through_its_canary_and_an_hpa_scale_is_followed() {
    let c = cluster().await;
    // A signer-like singleton behind a PodDisruptionBudget that allows no disruption.
    let pdbs: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "policy",
            "v1",
            "PodDisruptionBudget",
        )),
    );
    let pdb: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "signer"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .expect("pdb");
    pdbs.create(&PostParams::default(), &pdb)
        .await
        .expect("create pdb");
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": template("registry.example/web:v1"),
                     "strategy": {"canary": {"steps": [{"setWeight": 50}, {"pause": {"duration": "200ms"}}]}}},
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "singleton");
    wait_for(Duration::from_secs(20), "v1 healthy", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && s["readyReplicas"] == 1).then_some(())
    })
    .await;
    let (watching, min_ready) = min_ready_pods(&c);
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(30), "v2 promoted", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2" && s["replicas"] == 1).then_some(())
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    let min = min_ready.await.expect("watcher");
    assert!(
        min >= 1,
        "the singleton had {min} ready pods during its canary: it must surge, never dip"
    );

    // An HPA scales through the scale subresource; the operator follows and leaves
    // spec.replicas alone.
    let scale = rollouts.get_scale("web").await.expect("scale");
    let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
    assert!(
        selector.contains("app=web"),
        "the scale subresource names the pods: {selector:?}"
    );
    rollouts
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("hpa scales");
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    wait_for(Duration::from_secs(20), "three ready pods", async || {
        let s = status(&rollouts, "web").await;
        (s["readyReplicas"] == 3).then_some(())
    })
    .await;
    let s = status(&rollouts, "web").await;
    let stable = s["stableRevision"].as_str().expect("stable").to_string();
    let rs = rs_api
        .get(&format!("web-{stable}"))
        .await
        .expect("stable rs");
    assert_eq!(rs.spec.and_then(|s| s.replicas), Some(3));
    let scale = rollouts.get_scale("web").await.expect("scale");
    assert_eq!(
        scale.spec.and_then(|s| s.replicas),
        Some(3),
        "the operator did not write its own replica count back"
    );
    assert_eq!(scale.status.map(|s| s.replicas), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_through_istio_virtual_service_weights_to_full_promotion() {
    let c = cluster().await;
    canary_services(&c).await;
    let vss: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &baton_k8s::router::istio::api_resource(),
    );
    let vs: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web"},
        "spec": {"hosts": ["web.example"], "http": [{"route": [{"destination": {"host": "web-stable"}}]}]},
    }))
    .expect("virtual service");
    vss.create(&PostParams::default(), &vs)
        .await
        .expect("create virtual service");
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let mut ro = canary_rollout(
        &url,
        json!([{"setWeight": 30}, {"analysis": {"gates": ["errors"]}}, {"setWeight": 60}]),
    );
    ro["spec"]["strategy"]["canary"]["trafficRouting"] =
        json!({"istio": {"virtualService": "web"}});
    ro["spec"]["strategy"]["canary"]["canaryHeader"] =
        json!({"name": "X-Canary", "value": "always"});
    ro["spec"]["strategy"]["canary"]["mirrorPercent"] = json!(20);
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "istio");
    wait_healthy(&rollouts, "v1").await;
    let vs_now = || {
        c.api
            .store
            .get(&Key::new(
                "networking.istio.io/v1",
                "virtualservices",
                Some("default"),
                "web",
            ))
            .expect("virtual service")
    };
    // The weighted route's canary share (the header route, when there, comes first).
    let canary_share = |vs: &Value| {
        vs["spec"]["http"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["name"] != "baton-canary-header")
            .flat_map(|r| r["route"].as_array().cloned().unwrap_or_default())
            .find(|d| d["destination"]["host"] == "web-canary")
            .and_then(|d| d["weight"].as_u64())
            .unwrap_or(0)
    };
    // Without a route status to wait for, steps can pass faster than a poll: read
    // every write to the VirtualService from the store's own feed instead.
    let mut feed = c.api.store.subscribe();
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(30), "v2 promoted", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2").then_some(())
    })
    .await;
    let mut seen: Vec<u64> = Vec::new();
    let mut saw_header = false;
    let mut saw_mirror = false;
    while let Ok(change) = feed.try_recv() {
        if change.key.resource != "virtualservices" {
            continue;
        }
        let vs = &change.object;
        let share = canary_share(vs);
        if seen.last() != Some(&share) {
            seen.push(share);
        }
        saw_header |= vs["spec"]["http"][0]["name"] == "baton-canary-header"
            && vs["spec"]["http"][0]["match"][0]["headers"]["x-canary"]["exact"] == "always";
        // The safe methods (the default) copied by a route placed before the weighted
        // one, since Istio takes the first route that matches.
        let http = vs["spec"]["http"].as_array().cloned().unwrap_or_default();
        let mirror = http.iter().position(|r| r["name"] == "baton-mirror");
        let weighted = http
            .iter()
            .position(|r| r["name"].is_null() && r["route"].is_array());
        saw_mirror |= mirror.zip(weighted).is_some_and(|(m, w)| {
            let r = &http[m];
            m < w
                && r["mirror"] == json!({"host": "web-canary"})
                && r["mirrorPercentage"] == json!({"value": 20})
                && r["match"]
                    == json!([{"method": {"exact": "GET"}}, {"method": {"exact": "HEAD"}}, {"method": {"exact": "OPTIONS"}}])
        });
    }
    assert!(saw_mirror, "safe methods were mirrored during the rollout");
    let shares: Vec<u64> = seen.iter().copied().filter(|w| *w > 0).collect();
    assert_eq!(
        shares,
        vec![30, 60, 100],
        "the VirtualService went through each step, then all to the canary: {seen:?}"
    );
    assert!(saw_header, "testers could reach the canary by header");
    // The status is written before the operator acts on it: the route follows.
    wait_for(
        Duration::from_secs(10),
        "no share left on the canary host and no header route",
        async || {
            let vs = vs_now();
            let baton_route = vs["spec"]["http"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["name"] == "baton-canary-header" || r["name"] == "baton-mirror");
            (canary_share(&vs) == 0 && !baton_route).then_some(())
        },
    )
    .await;
}

/// Which replica got a controller context, in order.
type Leaders = Vec<(String, Arc<Context>)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_operator_replicas_only_the_leader_acts_and_the_other_takes_over() {
    use baton_k8s::leader::{LeaseConfig, run_leading};
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let leaders: Arc<std::sync::Mutex<Leaders>> = Arc::default();
    let start = |id: &str| {
        let mut cfg = LeaseConfig::new("default", id);
        cfg.duration = Duration::from_secs(1);
        cfg.renew_every = Duration::from_millis(200);
        let (leaders, who) = (leaders.clone(), id.to_string());
        tokio::spawn(run_leading(
            c.client.clone(),
            cfg,
            Some("default".into()),
            baton_k8s::audit::Seal::default(),
            baton_k8s::jobs::Settings::default(),
            move |ctx| leaders.lock().expect("lock").push((who.clone(), ctx)),
            std::future::pending(),
        ))
    };
    let a = start("replica-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = start("replica-b");
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(&rollouts, canary_rollout(&url, json!([{"setWeight": 50}]))).await;
    wait_for(Duration::from_secs(20), "v1 healthy", async || {
        (status(&rollouts, "web").await["phase"] == "Healthy").then_some(())
    })
    .await;
    {
        let l = leaders.lock().expect("lock");
        assert_eq!(l.len(), 1, "exactly one replica leads");
        assert_eq!(l[0].0, "replica-a");
    }
    let lease = c
        .api
        .store
        .get(&Key::new(
            "coordination.k8s.io/v1",
            "leases",
            Some("default"),
            "baton-operator",
        ))
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // The leader dies without releasing its lease; the other takes over when it expires.
    a.abort();
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(
        Duration::from_secs(30),
        "v2 promoted by the new leader",
        async || {
            let s = status(&rollouts, "web").await;
            (s["phase"] == "Healthy" && s["stableVersion"] == "v2").then_some(())
        },
    )
    .await;
    let l = leaders.lock().expect("lock");
    assert_eq!(
        l.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(),
        vec!["replica-a", "replica-b"]
    );
    drop(l);
    let lease = c
        .api
        .store
        .get(&Key::new(
            "coordination.k8s.io/v1",
            "leases",
            Some("default"),
            "baton-operator",
        ))
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_change_is_undone_shared_gates_come_from_templates_and_deletion_cleans_up() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    // The gate lives in a GateTemplate, not in the Rollout.
    let templates: Api<baton_k8s::crd::GateTemplate> = Api::namespaced(c.client.clone(), "default");
    create(
        &templates,
        json!({"apiVersion": "baton.dev/v1alpha1", "kind": "GateTemplate", "metadata": {"name": "slos"},
               "spec": {"gates": [{"name": "shared-errors", "metric": {"web": {"url": url, "jsonPath": "value"}}, "successCondition": "result < 0.01", "interval": "200ms"}]}}),
    )
    .await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let mut ro = canary_rollout(
        &url,
        json!([{"setWeight": 30}, {"analysis": {"gates": ["shared-errors"]}}, {"pause": {}}]),
    );
    ro["spec"]["analysis"] = json!({"gates": [], "templates": [{"name": "slos"}]});
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "misc");
    let stable_rev = wait_for(Duration::from_secs(20), "v1 healthy", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy").then(|| s["stableRevision"].as_str().map(str::to_string))?
    })
    .await;

    // Someone scales the stable ReplicaSet to zero behind the operator's back.
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    rs_api
        .patch(
            &format!("web-{stable_rev}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("scale down");
    wait_for(
        Duration::from_secs(10),
        "the operator to restore the stable replicas",
        async || {
            let rs = rs_api.get(&format!("web-{stable_rev}")).await.ok()?;
            (rs.spec?.replicas == Some(3)).then_some(())
        },
    )
    .await;

    // The shared gate passes the canary's analysis step; then it waits at the pause.
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(
        Duration::from_secs(20),
        "past the shared gate, paused",
        async || {
            let s = status(&rollouts, "web").await;
            (s["phase"] == "Paused"
                && s["engine"]["gates"]["shared-errors"]["passes"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(route_weights(&c).await, (70, 30));

    // Deleting the Rollout mid-canary puts users back on stable before it goes, and
    // its ReplicaSets go with it.
    rollouts
        .delete("web", &Default::default())
        .await
        .expect("delete");
    wait_for(Duration::from_secs(20), "the Rollout gone", async || {
        rollouts.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    let (_, canary) = route_weights(&c).await;
    assert_eq!(canary, 0, "the finalizer reset the route");
    let (left, _) = c.api.store.list("apps/v1", "replicasets", Some("default"));
    assert!(left.is_empty(), "owned ReplicaSets are collected: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_that_cannot_be_read_is_left_alone_not_started_over() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 20}, {"pause": {}}]);
    create(&rollouts, canary_rollout(&url, steps)).await;
    let (ctx, op) = operator(&c, "test-a");
    wait_healthy(&rollouts, "v1").await;
    stop(op).await;
    drop(ctx);
    // A status this release cannot read (a field of the wrong type).
    rewrite_engine_status(&rollouts, |engine| {
        engine.insert("stepIndex".into(), json!("three"));
    })
    .await;
    let (_ctx, _op) = operator(&c, "test-b");
    set_image(&rollouts, "registry.example/web:v2").await;
    // Reconciles fail (and say why in the operator's log and metrics) rather than begin
    // the rollout anew from an empty status.
    wait_for(Duration::from_secs(10), "failed reconciles", async || {
        (_ctx
            .metrics
            .render()
            .contains("baton_operator_reconcile_errors_total")
            && !_ctx
                .metrics
                .render()
                .contains("baton_operator_reconcile_errors_total 0\n"))
        .then_some(())
    })
    .await;
    let s = status(&rollouts, "web").await;
    assert_eq!(s["engine"]["stepIndex"], "three", "left as it was: {s}");
    assert_eq!(s["stableVersion"], "v1");
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let names: Vec<String> = rs_api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert_eq!(names.len(), 1, "no new revision started: {names:?}");
}

/// A webhook receiver on loopback: every JSON body it was sent.
async fn webhook_receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let addr = loopback(move |body| {
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            sink.lock().unwrap().push(v);
        }
        String::new()
    })
    .await;
    (format!("http://{addr}/hook"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progressive_canary_runs_its_steps_and_tells_its_webhook() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let (hook, got) = webhook_receiver().await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let mut ro = canary_rollout(&url, json!([]));
    let canary = ro["spec"]["strategy"]["canary"]
        .as_object_mut()
        .expect("canary");
    canary.remove("steps");
    canary.insert(
        "progressive".into(),
        json!({"start": 25, "factor": 2, "every": "200ms"}),
    );
    ro["spec"]["notifications"] = json!([{"name": "hook", "url": hook}]);
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "test-0");
    wait_healthy(&rollouts, "v1").await;
    set_image(&rollouts, "registry.example/web:v2").await;
    let mut weights = Vec::new();
    wait_for(Duration::from_secs(30), "v2 promoted", async || {
        let w = route_weights(&c).await.1;
        if weights.last() != Some(&w) {
            weights.push(w);
        }
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2").then_some(())
    })
    .await;
    // The shorthand became 25 % then 50 %, each held and judged, then promotion.
    assert!(
        weights.contains(&25) && weights.contains(&50),
        "{weights:?}"
    );
    let got = wait_for(
        Duration::from_secs(10),
        "the promotion's webhook",
        async || {
            let got = got.lock().unwrap().clone();
            got.iter().any(|n| n["event"] == "promoted").then_some(got)
        },
    )
    .await;
    let events: Vec<&str> = got.iter().filter_map(|n| n["event"].as_str()).collect();
    assert!(events.contains(&"started"), "{events:?}");
    let steps_told: std::collections::HashSet<&str> = got
        .iter()
        .filter(|n| n["event"] == "stepPassed")
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert!(
        steps_told.len() >= 4,
        "each held and judged step is told: {events:?}"
    );
    // At least once, with a stable id: a notice told again (after a conflicting
    // write, a restart) repeats its id and content, and different events never share one.
    let mut by_id: std::collections::HashMap<&str, &Value> = std::collections::HashMap::new();
    for n in &got {
        let id = n["id"].as_str().expect("every notice has an id");
        if let Some(first) = by_id.insert(id, n) {
            assert_eq!(first, n, "one id, one event: {got:?}");
        }
    }
    assert!(got.iter().all(|n| n["rollout"] == "web"));

    // The same events, kept in the Rollout's audit trail: chained, each once.
    let trail = wait_for(
        Duration::from_secs(10),
        "the promotion audited",
        async || {
            let trails = baton_k8s::audit::trails(&c.client, "default", Some("web"))
                .await
                .ok()?;
            let (_, entries) = trails.into_iter().next()?;
            entries
                .iter()
                .any(|e| e.action == "promote")
                .then_some(entries)
        },
    )
    .await;
    assert_eq!(baton_audit::verify_entries(&trail), None, "{trail:?}");
    assert!(trail.iter().any(|e| e.action == "step"), "{trail:?}");
    let reasons: Vec<(&str, u64)> = trail.iter().map(|e| (e.reason.as_str(), e.at)).collect();
    let unique: std::collections::HashSet<&(&str, u64)> = reasons.iter().collect();
    assert_eq!(
        unique.len(),
        reasons.len(),
        "audited once each: {reasons:?}"
    );
    // An edit of an entry is named.
    let key = Key::new("v1", "configmaps", Some("default"), "baton-audit-web");
    c.api
        .store
        .modify(&key, false, |o| {
            let text = o["data"]["entries"].as_str().unwrap_or("").replacen(
                "rolling out",
                "rolling back",
                1,
            );
            o["data"]["entries"] = json!(text);
            Ok(())
        })
        .expect("tamper");
    let trails = baton_k8s::audit::trails(&c.client, "default", Some("web"))
        .await
        .expect("trails");
    let problem = baton_audit::verify_entries(&trails[0].1);
    assert!(
        matches!(problem, Some(baton_audit::Problem::Altered { .. })),
        "{problem:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rollout_gets_a_condition_naming_the_field_and_runs_nothing() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let mut ro = canary_rollout(&url, json!([]));
    let canary = ro["spec"]["strategy"]["canary"]
        .as_object_mut()
        .expect("canary");
    canary.remove("steps");
    // A factor of 1 would never reach 100 %.
    canary.insert(
        "progressive".into(),
        json!({"start": 10, "factor": 1, "every": "1s"}),
    );
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "test-0");
    let s = wait_for(
        Duration::from_secs(10),
        "the InvalidSpec condition",
        async || {
            let s = status(&rollouts, "web").await;
            s["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "InvalidSpec"))
                .then_some(s)
        },
    )
    .await;
    let cond = s["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "InvalidSpec"))
        .cloned()
        .unwrap_or_default();
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or("")
            .contains("spec.strategy.canary.progressive.factor"),
        "{cond}"
    );
    let rs_api: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    assert!(
        rs_api
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .is_empty(),
        "nothing started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_reach_the_operator_through_the_shared_vocabulary() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 20}, {"pause": {"duration": "500ms"}}, {"setWeight": 60}]);
    create(&rollouts, canary_rollout(&url, steps)).await;
    let (_ctx, _op) = operator(&c, "test-0");
    wait_healthy(&rollouts, "v1").await;
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(20), "20 % served", async || {
        (route_weights(&c).await.1 == 20).then_some(())
    })
    .await;
    let ask = async |id: &str, command: &str| {
        let req = json!({"metadata": {"annotations": {REQUEST_ANNOTATION: json!({"id": id, "command": command, "by": "test"}).to_string()}}});
        rollouts
            .patch("web", &PatchParams::default(), &Patch::Merge(req))
            .await
            .expect("request");
    };
    ask("p1", "pause").await;
    let held = wait_for(Duration::from_secs(10), "held", async || {
        let s = status(&rollouts, "web").await;
        (s["lastRequest"] == "p1" && s["phase"] == "Paused").then_some(s)
    })
    .await;
    // Well past the 500 ms pause: still held at 20 %, at the same step.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&rollouts, "web").await;
    assert_eq!(s["phase"], "Paused", "{s}");
    assert_eq!(s["engine"]["stepIndex"], held["engine"]["stepIndex"], "{s}");
    assert_eq!(route_weights(&c).await.1, 20);
    ask("r1", "resume").await;
    wait_healthy(&rollouts, "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_fails_every_request_is_retried_with_backoff_not_in_a_loop() {
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An API server that answers every request 500, counting the ReplicaSet watches.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let rs_requests = Arc::new(AtomicU64::new(0));
    let counted = rs_requests.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if String::from_utf8_lossy(&buf[..n]).contains("/replicasets") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                    .await;
            });
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    let client = Client::try_from(config).expect("client");
    let ctx = Context::new(client, "lonely");
    let op = tokio::spawn(controller::run(
        ctx,
        Some("default".into()),
        std::future::pending(),
    ));
    // The ReplicaSet watch (one: it fills the cache and triggers reconciles) backs off
    // from 0.8 s, with jitter: its second attempt within seconds; without a backoff,
    // thousands of attempts by then.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    while rs_requests.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rs_requests.load(Ordering::SeqCst) >= 2,
        "the watch did not try again in 15 s"
    );
    // Two seconds more: a watch retrying in a loop would make thousands.
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.abort();
    let n = rs_requests.load(Ordering::SeqCst);
    assert!(
        n < 40,
        "{n} ReplicaSet requests in {:?}: retried without backoff",
        started.elapsed()
    );
}

/// A data plane's metrics as Contour's Envoy exports them: every scrape, 200 more
/// requests split between the `web-stable` and `web-canary` clusters by the route's
/// current weights; the canary's answers are ten times slower while `slow`.
async fn envoy_exporter(c: &Cluster, slow: Arc<AtomicBool>) -> std::net::SocketAddr {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    // Istio/Envoy bounds (milliseconds); per cluster, cumulative counts per bucket.
    const LE: [f64; 9] = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
    /// Per cluster: requests, and requests per bucket (the last one +Inf).
    type Counts = BTreeMap<String, (u64, [u64; 10])>;
    let counts: Arc<Mutex<Counts>> = Arc::default();
    let store = c.api.store.clone();
    loopback(move |_| {
        let route = store
            .get(&Key::new(
                "gateway.networking.k8s.io/v1",
                "httproutes",
                Some("default"),
                "web",
            ))
            .expect("route");
        let refs = route["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] != "baton-canary-header")
            .map(|r| r["backendRefs"].clone())
            .unwrap_or_default();
        let weight = |n: &str| -> u64 {
            refs.as_array()
                .into_iter()
                .flatten()
                .find(|r| r["name"] == n)
                .map(|r| r["weight"].as_u64().unwrap_or(1))
                .unwrap_or(0)
        };
        let (ws, wc) = (weight("web-stable"), weight("web-canary"));
        let total = (ws + wc).max(1);
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        for (svc, w, is_canary) in [("web-stable", ws, false), ("web-canary", wc, true)] {
            let n = 200 * w / total;
            let entry = counts.entry(svc.to_string()).or_default();
            entry.0 += n;
            // 70 % in (10, 25] ms and 30 % in (25, 50] ms; ten times that when slow.
            let (fast, rest) = if is_canary && slow.load(Ordering::SeqCst) {
                (6, 7)
            } else {
                (3, 4)
            };
            entry.1[fast] += n * 7 / 10;
            entry.1[rest] += n - n * 7 / 10;
        }
        let mut text = String::new();
        for (svc, (n, buckets)) in counts.iter() {
            let cluster = format!("default_{svc}_80");
            text.push_str(&format!(
                "envoy_cluster_upstream_rq{{envoy_cluster_name=\"{cluster}\",envoy_response_code=\"200\"}} {n}\n"
            ));
            let mut cumulative = 0;
            for (i, le) in LE.iter().enumerate() {
                cumulative += buckets[i];
                text.push_str(&format!(
                    "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{cluster}\",le=\"{le}\"}} {cumulative}\n"
                ));
            }
            text.push_str(&format!(
                "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{cluster}\",le=\"+Inf\"}} {n}\n"
            ));
        }
        text
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_gates_judge_the_routers_metrics_from_a_real_prometheus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster().await;
    gateway_fixture(&c).await;
    let slow = Arc::new(AtomicBool::new(false));
    let exporter = envoy_exporter(&c, slow.clone()).await;
    let prom = baton_kube_fake::prometheus::Prometheus::start(dir.path(), &[exporter])
        .expect("the prometheus server is installed (Debian package `prometheus`; scripts/test installs it)");
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 50}, {"analysis": {"gates": ["latency"]}}]);
    let mut ro = canary_rollout("http://unused.invalid/", steps);
    // No template named: Gateway API implies Contour's Envoy stats.
    ro["spec"]["analysis"] = json!({
        "requestMetrics": {"address": format!("http://{}", prom.addr)},
        "gates": [{
            "name": "latency", "metric": {"builtin": "latency_p99"},
            "statistical": {"confidence": 0.99, "tolerance": 0.1},
            "minRequests": 100, "interval": "1s", "count": 2,
        }],
    });
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "prom");
    wait_healthy(&rollouts, "v1").await;

    // As fast as stable: promoted on the statistical verdict.
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(60), "v2 promoted", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Healthy" && s["stableVersion"] == "v2").then_some(())
    })
    .await;
    let audit_passed = c
        .api
        .store
        .list("v1", "configmaps", Some("default"))
        .0
        .iter()
        .any(|cm| cm.to_string().contains("gate latency"));
    assert!(audit_passed, "the gate's verdicts are in the audit trail");

    // Ten times slower: rolled back, and the route back on stable.
    slow.store(true, Ordering::SeqCst);
    set_image(&rollouts, "registry.example/web:v3").await;
    let s = wait_for(Duration::from_secs(60), "v3 rolled back", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded").then_some(s)
    })
    .await;
    assert_eq!(s["stableVersion"], "v2", "{s}");
    let last = &s["engine"]["gates"]["latency"]["last"];
    assert_eq!(last["verdict"], "Fail", "{s}");
    wait_for(
        Duration::from_secs(10),
        "the route back on stable",
        async || (route_weights(&c).await == (100, 0)).then_some(()),
    )
    .await;

    // A slow canary with too little traffic to judge is measured, never rolled back.
    rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "template": template("registry.example/web:v4"),
                "strategy": {"canary": {"steps": [{"setWeight": 1}, {"analysis": {"gates": ["latency"]}}]}},
                "analysis": {"gates": [{
                    "name": "latency", "metric": {"builtin": "latency_p99"},
                    "statistical": {"confidence": 0.99, "tolerance": 0.1},
                    "minRequests": 1000, "interval": "1s", "count": 2,
                }]},
            }})),
        )
        .await
        .expect("v4");
    let s = wait_for(
        Duration::from_secs(30),
        "v4's gate measured thrice",
        async || {
            let s = status(&rollouts, "web").await;
            (s["canaryVersion"] == "v4"
                && s["engine"]["gates"]["latency"]["inconclusive"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 3)
                .then_some(s)
        },
    )
    .await;
    assert_eq!(s["phase"], "Progressing", "{s}");
    let detail = s["engine"]["gates"]["latency"]["last"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(detail.contains("1000 needed"), "{s}");
    // Pods carry the revision where a mesh's metrics read it (Istio's canonical labels).
    let (pods, _) = c.api.store.list("v1", "pods", Some("default"));
    assert!(!pods.is_empty());
    for p in &pods {
        let labels = &p["metadata"]["labels"];
        assert_eq!(
            labels["service.istio.io/canonical-revision"], labels["baton.dev/revision"],
            "{labels}"
        );
        assert_eq!(labels["service.istio.io/canonical-name"], "web", "{labels}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_keeps_every_replica_ready_and_history_is_pruned() {
    let c = cluster().await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3, "revisionHistoryLimit": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": template("registry.example/web:v1"),
                "strategy": {"rolling": {"maxSurge": 1, "maxUnavailable": 0}},
            },
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "rolling");
    wait_healthy(&rollouts, "v1").await;
    // Ready and existing pods of every revision, as the simulated cluster has them.
    let census = || {
        let (rss, _) = c.api.store.list("apps/v1", "replicasets", Some("default"));
        rss.iter().fold((0, 0), |(ready, pods), rs| {
            (
                ready + rs["status"]["readyReplicas"].as_u64().unwrap_or(0),
                pods + rs["spec"]["replicas"].as_u64().unwrap_or(0),
            )
        })
    };
    for version in ["v2", "v3", "v4"] {
        set_image(&rollouts, &format!("registry.example/web:{version}")).await;
        let (mut min_ready, mut max_pods) = (u64::MAX, 0);
        wait_for(
            Duration::from_secs(30),
            &format!("{version} rolled"),
            async || {
                let (ready, pods) = census();
                min_ready = min_ready.min(ready);
                max_pods = max_pods.max(pods);
                let s = status(&rollouts, "web").await;
                (s["phase"] == "Healthy" && s["stableVersion"] == version).then_some(())
            },
        )
        .await;
        // maxUnavailable 0: never under three ready; maxSurge 1: never over four pods.
        assert!(min_ready >= 3, "{version}: {min_ready} ready at one point");
        assert!(max_pods <= 4, "{version}: {max_pods} pods at one point");
    }
    // The current revision and one old one (revisionHistoryLimit 1), at zero replicas.
    wait_for(Duration::from_secs(10), "history pruned", async || {
        let (rss, _) = c.api.store.list("apps/v1", "replicasets", Some("default"));
        (rss.len() == 2).then_some(())
    })
    .await;
    let (rss, _) = c.api.store.list("apps/v1", "replicasets", Some("default"));
    let zero = rss
        .iter()
        .filter(|rs| rs["spec"]["replicas"].as_u64() == Some(0))
        .count();
    assert_eq!(zero, 1, "{rss:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_gates_run_as_jobs_with_an_allowed_account_never_in_the_operator() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let gate = |command: Value| json!({"gates": [{"name": "checks", "metric": {"command": {"command": command, "timeout": "20s"}}, "interval": "200ms"}]});
    let steps = json!([{"setWeight": 20}, {"analysis": {"gates": ["checks"]}}]);
    let mut ro = canary_rollout("http://unused.invalid/", steps);
    ro["spec"]["analysis"] = gate(json!([
        "/checks/orders",
        "--against",
        "$(BATON_REVISION); rm -rf /"
    ]));
    ro["spec"]["jobs"] =
        json!({"image": "registry.example/checks:3", "serviceAccountName": "intruder"});
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "jobs");
    // An account the operator does not allow: refused, naming the field; nothing runs.
    wait_for(Duration::from_secs(10), "InvalidSpec", async || {
        let s = status(&rollouts, "web").await;
        s["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "InvalidSpec")
            .filter(|c| {
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("spec.jobs.serviceAccountName"))
            })
            .map(|_| ())
    })
    .await;
    assert!(
        c.api
            .store
            .list("batch/v1", "jobs", Some("default"))
            .0
            .is_empty()
    );

    // The allowed one: v1 goes healthy, v2's gate runs as a Job that passes.
    rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"jobs": {"serviceAccountName": "deployer"}}})),
        )
        .await
        .expect("allowed account");
    wait_healthy(&rollouts, "v1").await;
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_healthy(&rollouts, "v2").await;
    let (jobs, _) = c.api.store.list("batch/v1", "jobs", Some("default"));
    assert!(!jobs.is_empty(), "the gate ran as Jobs");
    let pod = &jobs[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The command is the container's argv, as written: no shell reads it.
    assert_eq!(
        container["command"],
        json!(["/checks/orders", "--against", "$(BATON_REVISION); rm -rf /"])
    );
    assert_eq!(container["image"], "registry.example/checks:3");
    assert_eq!(pod["serviceAccountName"], "deployer");
    assert_eq!(pod["automountServiceAccountToken"], true);
    let env = container["env"].as_array().cloned().unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e["name"] == "BATON_REVISION"
                && e["value"].as_str().is_some_and(|v| !v.is_empty())),
        "{env:?}"
    );

    // A command that fails (the simulated Job of `false`) rolls v3 back.
    rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": template("registry.example/web:v3"), "analysis": gate(json!(["false"]))}})),
        )
        .await
        .expect("v3");
    let s = wait_for(Duration::from_secs(30), "v3 rolled back", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded").then_some(s)
    })
    .await;
    assert_eq!(s["stableVersion"], "v2", "{s}");
    assert_eq!(
        s["engine"]["gates"]["checks"]["last"]["verdict"], "Fail",
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replaces_every_stable_pod_one_at_a_time_with_a_surge_of_one() {
    let c = cluster().await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": template("registry.example/web:v1"),
                "strategy": {"rolling": {"maxSurge": 1, "maxUnavailable": 0}},
            },
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "restart");
    wait_healthy(&rollouts, "v1").await;
    // The pods: (name, ready, creation second).
    let pods = || {
        let (pods, _) = c.api.store.list("v1", "pods", Some("default"));
        pods.iter()
            .map(|p| {
                let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                (
                    p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    ready,
                    p["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before: Vec<String> = pods().into_iter().map(|p| p.0).collect();
    assert_eq!(before.len(), 3, "{before:?}");
    // Creation times have whole seconds: ask in a later second than the pods'.
    let newest = pods().into_iter().map(|p| p.2).max().unwrap_or_default();
    wait_for(Duration::from_secs(3), "a new second", async || {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        (now.get(..19) > newest.get(..19)).then_some(())
    })
    .await;
    let req = json!({"metadata": {"annotations": {REQUEST_ANNOTATION: json!({"id": "x1", "command": "restart", "by": "test"}).to_string()}}});
    rollouts
        .patch("web", &PatchParams::default(), &Patch::Merge(req))
        .await
        .expect("request");
    let (mut min_ready, mut max_pods) = (usize::MAX, 0);
    let done = wait_for(Duration::from_secs(30), "every pod replaced", async || {
        let now = pods();
        min_ready = min_ready.min(now.iter().filter(|p| p.1).count());
        max_pods = max_pods.max(now.len());
        let s = status(&rollouts, "web").await;
        let replaced = now.len() == 3 && now.iter().all(|p| !before.contains(&p.0));
        (replaced && s["engine"].get("restartAt").is_none() && s["phase"] == "Healthy").then_some(s)
    })
    .await;
    assert_eq!(done["lastRequest"], "x1", "{done}");
    assert!(min_ready >= 3, "capacity dropped to {min_ready} ready pods");
    assert!(max_pods <= 4, "a surge of one, not {max_pods} pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_webhook_makes_a_requests_actor_the_authenticated_user() {
    use base64::Engine;
    let c = cluster().await;
    gateway_fixture(&c).await;
    // The webhook over TLS with a certificate for 127.0.0.1, trusted by its caBundle.
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.cert.pem()).expect("cert");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("key");
    let (addr, _hook) =
        baton_k8s::admission::serve("127.0.0.1:0".parse().expect("addr"), &cert_file, &key_file)
            .await
            .expect("webhook");
    c.api
        .store
        .create(
            &Key::new(
                "admissionregistration.k8s.io/v1",
                "mutatingwebhookconfigurations",
                None,
                "",
            ),
            json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "baton"},
                "webhooks": [{
                    "name": "rollouts.baton.dev",
                    "clientConfig": {
                        "url": format!("https://{addr}{}", baton_k8s::admission::PATH),
                        "caBundle": base64::engine::general_purpose::STANDARD.encode(cert.cert.pem()),
                    },
                    "rules": [{"apiGroups": ["baton.dev"], "apiVersions": ["*"],
                               "resources": ["rollouts"], "operations": ["CREATE", "UPDATE"]}],
                    "failurePolicy": "Fail", "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                }],
            }),
        )
        .expect("webhook configuration");

    let url = metric_server(Arc::new(AtomicBool::new(false))).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let steps = json!([{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}]);
    create(&rollouts, canary_rollout(&url, steps)).await;
    let (ctx, _op) = operator(&c, "webhook");
    ctx.trust_admission_webhook();
    wait_healthy(&rollouts, "v1").await;
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(20), "paused", async || {
        (status(&rollouts, "web").await["phase"] == "Paused").then_some(())
    })
    .await;

    // Alice asks, claiming to be mallory: the webhook records who she is.
    let as_user = |user: &str| {
        let mut config = kube::Config::new(c.api.url().parse().expect("url"));
        config.auth_info.impersonate = Some(user.to_string());
        Api::<Rollout>::namespaced(Client::try_from(config).expect("client"), "default")
    };
    let req = json!({"metadata": {"annotations": {REQUEST_ANNOTATION: json!({"id": "a1", "command": "promote", "by": "mallory"}).to_string()}}});
    as_user("alice")
        .patch("web", &PatchParams::default(), &Patch::Merge(req))
        .await
        .expect("request");
    let actor = |ro: &Rollout| {
        ro.annotations()
            .get(baton_k8s::admission::ACTOR_ANNOTATION)
            .cloned()
    };
    assert_eq!(
        actor(&rollouts.get("web").await.expect("get")).as_deref(),
        Some("alice")
    );
    wait_for(Duration::from_secs(20), "the promote taken", async || {
        (status(&rollouts, "web").await["lastRequest"] == "a1").then_some(())
    })
    .await;
    let events = wait_for(Duration::from_secs(10), "the request's Event", async || {
        let (events, _) = c
            .api
            .store
            .list("events.k8s.io/v1", "events", Some("default"));
        events
            .iter()
            .any(|e| e["reason"] == "Request")
            .then_some(events)
    })
    .await;
    let notes: Vec<&str> = events
        .iter()
        .filter(|e| e["reason"] == "Request")
        .filter_map(|e| e["note"].as_str())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("requested by user:alice")),
        "{notes:?}"
    );
    assert!(!notes.iter().any(|n| n.contains("mallory")), "{notes:?}");

    // Bob writes the actor by hand: it is put back.
    let forged =
        json!({"metadata": {"annotations": {baton_k8s::admission::ACTOR_ANNOTATION: "root"}}});
    as_user("bob")
        .patch("web", &PatchParams::default(), &Patch::Merge(forged))
        .await
        .expect("patch");
    assert_eq!(
        actor(&rollouts.get("web").await.expect("get")).as_deref(),
        Some("alice")
    );
}

/// Alertmanager's webhook on a cluster: a firing alert with `namespace` and `rollout`
/// labels aborts that Rollout through its request annotation, audited with the
/// alert's name; a wrong token and an alert without a namespace abort nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_naming_a_rollout_aborts_it_through_the_operators_webhook() {
    let c = cluster().await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": template("registry.example/web:v1"),
                     "strategy": {"canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}},
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "alerts");
    wait_for(Duration::from_secs(20), "v1 healthy", async || {
        (status(&rollouts, "web").await["phase"] == "Healthy").then_some(())
    })
    .await;
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(Duration::from_secs(20), "v2 paused at 50 %", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Paused" && s["canaryWeight"] == 50).then_some(())
    })
    .await;

    let token = "a-token-from-a-secret-0123456789";
    let (addr, _task) = baton_k8s::alerts::serve(
        "127.0.0.1:0".parse().expect("addr"),
        token.into(),
        c.client.clone(),
    )
    .await
    .expect("alerts listener");
    let post = |auth: &'static str, body: String| async move {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::post(baton_k8s::alerts::PATH)
            .header("host", addr.to_string())
            .header("authorization", auth)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let resp = s.send_request(req).await.expect("response");
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (code, String::from_utf8_lossy(&body).into_owned())
    };
    let delivery = |labels: Value| {
        json!({"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": labels}]})
            .to_string()
    };
    let (code, _) = post(
        "Bearer wrong",
        delivery(json!({"alertname": "WebErrors", "namespace": "default", "rollout": "web"})),
    )
    .await;
    assert_eq!(code, 401);
    let (code, body) = post(
        "Bearer a-token-from-a-secret-0123456789",
        delivery(json!({"alertname": "WebErrors", "rollout": "web"})),
    )
    .await;
    assert!(
        code == 200 && body.contains("no namespace label"),
        "{code} {body}"
    );
    assert_eq!(
        status(&rollouts, "web").await["phase"],
        "Paused",
        "nothing aborted"
    );

    let (code, body) = post(
        "Bearer a-token-from-a-secret-0123456789",
        delivery(json!({"alertname": "WebErrors", "namespace": "default", "rollout": "web"})),
    )
    .await;
    assert!(
        code == 200 && body.contains("\"aborted\":true"),
        "{code} {body}"
    );
    wait_for(Duration::from_secs(20), "web aborted", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded" && s["canaryWeight"] == 0).then_some(())
    })
    .await;
    let actor = wait_for(Duration::from_secs(10), "the abort audited", async || {
        let trails = baton_k8s::audit::trails(&c.client, "default", Some("web"))
            .await
            .ok()?;
        let (_, entries) = trails.into_iter().next()?;
        // The request's entry (the engine's own abort event is the controller's).
        entries
            .iter()
            .filter(|e| e.action == "abort")
            .map(|e| e.actor.clone())
            .find(|a| a != "baton")
    })
    .await;
    assert_eq!(actor, "claim:alert:WebErrors");
}

/// Gates before traffic on a cluster: run as Jobs once the new pods are ready; a
/// passing one lets the canary on, a failing one aborts it before any weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_traffic_gates_run_as_jobs_before_any_weight() {
    let c = cluster().await;
    gateway_fixture(&c).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    let analysis = |command: Value| {
        json!({"preTraffic": ["verify"],
               "gates": [{"name": "verify", "metric": {"command": {"command": command}}, "interval": "200ms"}]})
    };
    let steps = json!([{"setWeight": 20}, {"pause": {"duration": "200ms"}}]);
    let mut ro = canary_rollout("http://unused.invalid/", steps);
    ro["spec"]["analysis"] = analysis(json!(["cosign", "verify", "registry.example/web"]));
    ro["spec"]["jobs"] = json!({"image": "registry.example/cosign:2"});
    create(&rollouts, ro).await;
    let (_ctx, _op) = operator(&c, "pretraffic");
    wait_healthy(&rollouts, "v1").await;
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_healthy(&rollouts, "v2").await;
    let s = status(&rollouts, "web").await;
    assert_eq!(s["engine"]["preTrafficDone"], true, "{s}");
    let (jobs, _) = c.api.store.list("batch/v1", "jobs", Some("default"));
    assert!(
        jobs.iter().any(
            |j| j["spec"]["template"]["spec"]["containers"][0]["command"]
                == json!(["cosign", "verify", "registry.example/web"])
        ),
        "the check ran as a Job"
    );

    // A failing check: v3 is aborted before it was given any weight.
    rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": template("registry.example/web:v3"), "analysis": analysis(json!(["false"]))}})),
        )
        .await
        .expect("v3");
    let s = wait_for(Duration::from_secs(30), "v3 aborted", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded").then_some(s)
    })
    .await;
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("before traffic: gate verify failed")),
        "{s}"
    );
    assert_eq!(s["stableVersion"], "v2", "{s}");
    assert_eq!(s["engine"]["preTrafficDone"], false, "{s}");
}

/// A blue-green judged after the switch on a cluster: when the gate fails on the new
/// active revision, the active Service's selector goes back to the retained one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_failing_after_the_switch_points_the_service_back() {
    let c = cluster().await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    create(&services, json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})).await;
    let bad = Arc::new(AtomicBool::new(false));
    let url = metric_server(bad.clone()).await;
    let rollouts: Api<Rollout> = Api::namespaced(c.client.clone(), "default");
    create(
        &rollouts,
        json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "web"},
            "spec": {
                "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                "template": template("registry.example/web:v1"),
                "strategy": {"blueGreen": {"activeService": "web", "retainPrevious": "1h", "postPromotionAnalysis": "60s"}},
                "analysis": {"gates": [{"name": "errors", "metric": {"web": {"url": url, "jsonPath": "value"}},
                                        "successCondition": "result < 0.01", "interval": "200ms"}]},
            },
        }),
    )
    .await;
    let (_ctx, _op) = operator(&c, "bg-post");
    let selector = async || -> Option<String> {
        services
            .get("web")
            .await
            .ok()?
            .spec?
            .selector?
            .get("baton.dev/revision")
            .cloned()
    };
    wait_healthy(&rollouts, "v1").await;
    let v1 = selector().await.expect("v1 active");
    set_image(&rollouts, "registry.example/web:v2").await;
    wait_for(
        Duration::from_secs(30),
        "v2 active, judged after the switch",
        async || {
            let s = status(&rollouts, "web").await;
            let active = selector().await?;
            (s["stableVersion"] == "v2" && active != v1 && s["phase"] == "Progressing")
                .then_some(())
        },
    )
    .await;
    bad.store(true, Ordering::SeqCst);
    let s = wait_for(Duration::from_secs(30), "back to v1", async || {
        let s = status(&rollouts, "web").await;
        (s["phase"] == "Degraded" && s["stableVersion"] == "v1" && selector().await? == v1)
            .then_some(s)
    })
    .await;
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("after the switch: gate errors failed")),
        "{s}"
    );
}

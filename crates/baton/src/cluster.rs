//! `baton` against a Kubernetes cluster: the operator itself (`baton operator`), the
//! CRDs (`baton crd`), and the everyday commands (`status`, `promote`, `abort`,
//! `retry`, `undo`, `history`) when `--namespace` is given or the binary runs as the
//! kubectl plugin `kubectl-baton`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use baton_k8s::controller::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the pod's service
/// account, and the namespace to use (`--namespace`, else the context's).
pub async fn client(namespace: Option<&str>) -> Result<(kube::Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG, or run inside a cluster")?;
    let ns = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("cannot build a Kubernetes client")?;
    Ok((client, ns))
}

pub fn write_crds(dir: Option<&Path>) -> Result<()> {
    let crds = baton_k8s::crd::crds();
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            for (file, text) in crds {
                std::fs::write(d.join(file), text)
                    .with_context(|| format!("cannot write {file}"))?;
                println!("wrote {}", d.join(file).display());
            }
        }
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for text in crds.values() {
                // A closed pipe (`| head`) is not an error worth a panic.
                if write!(out, "---\n{text}").is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

pub struct OperatorOptions {
    pub namespace: Option<String>,
    pub lease_namespace: Option<String>,
    pub identity: Option<String>,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
}

/// Runs the operator until SIGTERM or Ctrl-C: campaigns for the Lease, reconciles
/// while leading, serves health and metrics throughout.
pub async fn operator(opts: OperatorOptions) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .init();
    let (client, default_ns) = client(None).await?;
    let lease_ns = opts
        .lease_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or(default_ns);
    let identity = opts
        .identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| format!("baton-{}", std::process::id()));
    let current: Arc<Mutex<Option<Arc<Context>>>> = Arc::default();
    serve_health(opts.health_listen, current.clone(), false).await?;
    serve_health(opts.metrics_listen, current.clone(), true).await?;
    tracing::info!(%identity, lease_namespace = %lease_ns, watch = opts.namespace.as_deref().unwrap_or("all namespaces"), "baton operator starting");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: releasing the lease");
    };
    let lease = baton_k8s::leader::LeaseConfig::new(&lease_ns, &identity);
    baton_k8s::leader::run_leading(
        client,
        lease,
        opts.namespace,
        move |ctx| *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx),
        shutdown,
    )
    .await?;
    Ok(())
}

/// `/healthz` and `/readyz` (the process serves; leading is not required to be
/// ready, so a standby replica counts toward the disruption budget), or `/metrics`.
async fn serve_health(
    addr: SocketAddr,
    current: Arc<Mutex<Option<Arc<Context>>>>,
    metrics: bool,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let current = current.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let current = current.clone();
                    async move {
                        let (code, body) = match (req.uri().path(), metrics) {
                            ("/healthz" | "/readyz", false) => (StatusCode::OK, "ok\n".to_string()),
                            ("/metrics", true) => {
                                let ctx = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                                let leading = u8::from(ctx.is_some());
                                let body = ctx.map(|c| c.metrics.render()).unwrap_or_default();
                                (
                                    StatusCode::OK,
                                    format!(
                                        "# HELP baton_operator_leader 1 while this replica leads.\n# TYPE baton_operator_leader gauge\nbaton_operator_leader {leading}\n{body}"
                                    ),
                                )
                            }
                            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// The everyday commands, against the cluster.
pub async fn command(namespace: Option<&str>, cmd: &str, name: &str, json: bool) -> Result<()> {
    let (client, ns) = client(namespace).await?;
    match cmd {
        "status" => {
            let v = baton_k8s::cli::status(&client, &ns, name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", crate::view::render(&v));
            }
        }
        "history" => {
            let v = baton_k8s::cli::history(&client, &ns, name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in v["revisions"].as_array().into_iter().flatten() {
                    println!(
                        "#{:<3} {:<14} {}{}",
                        r["number"].as_u64().unwrap_or(0),
                        r["run"]["env"]["APP_VERSION"].as_str().unwrap_or("-"),
                        r["name"].as_str().unwrap_or(""),
                        r["abortReason"]
                            .as_str()
                            .map(|a| format!("  aborted: {a}"))
                            .unwrap_or_default()
                    );
                }
                for e in v["events"].as_array().into_iter().flatten() {
                    println!(
                        "  {} {:<12} {}",
                        e["at"].as_str().unwrap_or(""),
                        e["reason"].as_str().unwrap_or(""),
                        e["note"].as_str().unwrap_or("")
                    );
                }
            }
        }
        "undo" => println!("{}", baton_k8s::cli::undo(&client, &ns, name).await?),
        other => {
            let by = baton::api::local_user();
            println!(
                "{}",
                baton_k8s::cli::request(&client, &ns, name, other, &by, Duration::from_secs(60))
                    .await?
            );
        }
    }
    Ok(())
}

/// `baton -n NS dashboard`: the web dashboard for a cluster's Rollouts, served
/// locally. The page is the same as `baton up`'s; its data comes from the API server
/// (one list a second for all browsers), and its actions become the same requests
/// `baton promote` makes. Prints a one-time login link.
pub async fn dashboard(namespace: Option<&str>, listen: SocketAddr) -> Result<()> {
    use baton::api::{ApiCall, ApiRequest, CommandKind, Identities, error};
    use baton::board::{Board, Role};
    let (client, ns) = client(namespace).await?;
    let token = baton::paths::new_token()?;
    let ids = Identities(vec![("admin".into(), token, Role::Admin)]);
    let board = Arc::new(Board::default());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ApiRequest>(64);
    tokio::spawn(baton::api::serve(listener, ids, tx, board.clone()));
    let code = board
        .one_time_code("admin", Role::Admin, baton::now_ms())
        .context("cannot make a login link")?;
    println!(
        "dashboard for namespace {ns}: {}\n  (the link works once; Ctrl-C stops the dashboard, not the operator)",
        baton::dashboard::login_link(addr, &code)
    );
    let publisher = {
        let (client, ns, board) = (client.clone(), ns.clone(), board.clone());
        tokio::spawn(async move {
            loop {
                match baton_k8s::cli::dashboard_list(&client, &ns).await {
                    Ok(list) => board.publish(serde_json::Value::Array(list)),
                    Err(e) => tracing::warn!(error = %e, "cannot list Rollouts"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = tokio::signal::ctrl_c() => break,
        };
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(async move {
            let answer = match req.call {
                ApiCall::List => match baton_k8s::cli::dashboard_list(&client, &ns).await {
                    Ok(list) => (StatusCode::OK, serde_json::json!({ "rollouts": list })),
                    Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
                },
                ApiCall::Get(name) => match baton_k8s::cli::dashboard_list(&client, &ns).await {
                    Ok(list) => match list.into_iter().find(|r| r["name"] == name.as_str()) {
                        Some(v) => (StatusCode::OK, v),
                        None => error(
                            StatusCode::NOT_FOUND,
                            format!("no Rollout {name:?} in {ns}"),
                        ),
                    },
                    Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
                },
                ApiCall::History(name) => {
                    match baton_k8s::cli::history(&client, &ns, &name).await {
                        Ok(h) => {
                            // The page's audit table: time, actor, action, reason.
                            let events: Vec<serde_json::Value> = h["events"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|e| {
                                let at = e["at"].as_str().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok()).map(|t| t.as_millisecond()).unwrap_or(0);
                                serde_json::json!({"at": at, "actor": "baton-operator", "action": e["reason"], "reason": e["note"]})
                            })
                            .collect();
                            (
                                StatusCode::OK,
                                serde_json::json!({"name": name, "revisions": h["revisions"], "events": events}),
                            )
                        }
                        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
                    }
                }
                ApiCall::Command { name, kind } => {
                    let result = match kind {
                        CommandKind::Undo => baton_k8s::cli::undo(&client, &ns, &name).await,
                        k => {
                            baton_k8s::cli::request(
                                &client,
                                &ns,
                                &name,
                                k.as_str(),
                                &req.actor,
                                Duration::from_secs(30),
                            )
                            .await
                        }
                    };
                    match result {
                        Ok(msg) => (StatusCode::OK, serde_json::json!({ "result": msg })),
                        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
                    }
                }
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "not available for a cluster: use kubectl or GitOps to change Rollouts",
                ),
            };
            let _ = req.reply.send(answer);
        });
    }
    publisher.abort();
    Ok(())
}

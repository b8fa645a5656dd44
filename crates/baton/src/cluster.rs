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
                print!("{}", baton_k8s::cli::render_status(&v));
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

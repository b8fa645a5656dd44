//! `baton operator` and `baton crd`: what a cluster runs and installs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use baton_k8s::controller::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::target::kube_client;

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else the
    /// kubeconfig context's).
    #[arg(long, value_name = "NS")]
    leader_election_namespace: Option<String>,
    /// This replica's name in the Lease (default: $POD_NAME, else the host name).
    #[arg(long)]
    identity: Option<String>,
    /// `/healthz` and `/readyz`.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    health_listen: SocketAddr,
    /// Prometheus `/metrics` of the controller itself.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Baton's own image, in which blue-green smoke tests run as Jobs (`baton smoke`).
    /// Without it, a Rollout with smoke tests is refused (InvalidSpec).
    #[arg(long, value_name = "IMAGE", env = "BATON_JOB_IMAGE")]
    job_image: Option<String>,
    /// Service accounts a Rollout may give its Jobs (`spec.jobs.serviceAccountName`),
    /// comma-separated. Any other is refused; by default Jobs run as the namespace's
    /// `default` account with no token mounted.
    #[arg(
        long,
        value_name = "NAME,...",
        env = "BATON_JOB_SERVICE_ACCOUNTS",
        value_delimiter = ','
    )]
    job_service_accounts: Vec<String>,
    /// Serve the admission webhook here (HTTPS, path /mutate-rollouts), which stamps
    /// each request's authenticated user into `baton.dev/request-actor`; the audit
    /// trail then records `user:NAME` instead of the request's claim. Give it only
    /// with the MutatingWebhookConfiguration registered (`failurePolicy: Fail`), or
    /// anyone who may patch a Rollout could write that annotation.
    #[arg(long, value_name = "ADDR", requires_all = ["admission_cert", "admission_key"])]
    admission_listen: Option<SocketAddr>,
    /// The webhook's certificate (PEM), as its Service's DNS name (the caBundle of the
    /// MutatingWebhookConfiguration signs it).
    #[arg(long, value_name = "FILE")]
    admission_cert: Option<std::path::PathBuf>,
    /// The webhook certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    admission_key: Option<std::path::PathBuf>,
    /// Take Alertmanager's webhook here (plain HTTP, path /alerts): each firing alert
    /// with `namespace` and `rollout` labels aborts that Rollout, audited as
    /// `claim:alert:ALERTNAME`. Needs the bearer token Alertmanager sends.
    #[arg(long, value_name = "ADDR")]
    alerts_listen: Option<SocketAddr>,
    /// The token (a file holding it, e.g. a mounted Secret) Alertmanager must send as
    /// `Authorization: Bearer TOKEN`; or `BATON_ALERTS_TOKEN`.
    #[arg(long, value_name = "FILE")]
    alerts_token_file: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct CrdArgs {
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

/// Runs the operator until SIGTERM or Ctrl-C: campaigns for the Lease, reconciles
/// while leading (in `namespace` only, or all), serves health and metrics throughout.
pub async fn operator(
    namespace: Option<String>,
    format: Option<baton::logs::LogFormat>,
    args: OperatorArgs,
) -> Result<()> {
    baton::logs::init(format.unwrap_or(baton::logs::LogFormat::Json));
    let (client, default_ns) = kube_client(None).await?;
    let lease_ns = args
        .leader_election_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or(default_ns);
    let identity = args
        .identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| format!("baton-{}", std::process::id()));
    let verified = match (
        &args.admission_listen,
        &args.admission_cert,
        &args.admission_key,
    ) {
        (Some(addr), Some(cert), Some(key)) => {
            let (bound, _task) = baton_k8s::admission::serve(*addr, cert, key).await?;
            tracing::info!(%bound, path = baton_k8s::admission::PATH, "admission webhook serving: request actors are verified");
            true
        }
        _ => false,
    };
    if let Some(addr) = args.alerts_listen {
        let token = match (&args.alerts_token_file, std::env::var("BATON_ALERTS_TOKEN")) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the alerts token {}", f.display()))?,
            (None, Ok(t)) => t,
            (None, Err(_)) => anyhow::bail!(
                "--alerts-listen needs a token: --alerts-token-file FILE or BATON_ALERTS_TOKEN"
            ),
        };
        let token = token.trim().to_string();
        if token.len() < 16 {
            anyhow::bail!("the alerts token must have at least 16 characters");
        }
        let (bound, _task) = baton_k8s::alerts::serve(addr, token, client.clone()).await?;
        tracing::info!(%bound, path = baton_k8s::alerts::PATH, "Alertmanager webhook serving");
    }
    let current: Arc<Mutex<Option<Arc<Context>>>> = Arc::default();
    serve_health(args.health_listen, current.clone(), false).await?;
    serve_health(args.metrics_listen, current.clone(), true).await?;
    tracing::info!(%identity, lease_namespace = %lease_ns, watch = namespace.as_deref().unwrap_or("all namespaces"), "baton operator starting");
    // The audit trails' heads live in the operator's own namespace, beside the Lease.
    let seal = baton_k8s::audit::Seal::from_env(&lease_ns)?;
    if seal.key.is_none() {
        tracing::warn!(
            "no {}: audit entries are not signed, so whoever may edit a trail's ConfigMap can rewrite it from any entry on (its head still catches truncation)",
            baton_k8s::audit::KEY_ENV
        );
    }
    let lease = baton_k8s::leader::LeaseConfig::new(&lease_ns, &identity);
    baton_k8s::leader::run_leading(
        client,
        lease,
        namespace,
        seal,
        baton_k8s::jobs::Settings {
            image: args.job_image,
            accounts: args
                .job_service_accounts
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect(),
        },
        move |ctx| {
            if verified {
                ctx.trust_admission_webhook();
            }
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx)
        },
        shutdown(),
    )
    .await?;
    Ok(())
}

/// SIGTERM (the kubelet) or Ctrl-C; the leader then releases the Lease.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: releasing the lease");
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
                    let (code, body) = answer(req.uri().path(), metrics, &current);
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = code;
                    std::future::ready(Ok::<_, std::convert::Infallible>(r))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn answer(
    path: &str,
    metrics: bool,
    current: &Mutex<Option<Arc<Context>>>,
) -> (StatusCode, String) {
    match (path, metrics) {
        ("/healthz" | "/readyz", false) => (StatusCode::OK, "ok\n".to_string()),
        ("/metrics", true) => {
            let ctx = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let leading = u8::from(ctx.is_some());
            // Only the leader reconciles, so only it has rollout metrics to show.
            let body = ctx
                .map(|c| format!("{}{}", c.metrics.render(), c.rollout_metrics()))
                .unwrap_or_default();
            (
                StatusCode::OK,
                format!(
                    "# HELP baton_operator_leader 1 while this replica leads.\n# TYPE baton_operator_leader gauge\nbaton_operator_leader {leading}\n{body}"
                ),
            )
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    }
}

/// The CRDs on stdout (for `kubectl apply -f -`), or one file each in `write`.
pub fn crd(args: CrdArgs) -> Result<()> {
    let crds = baton_k8s::crd::crds();
    match args.write.as_deref() {
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

//! Alertmanager's webhook on a cluster: `baton operator --alerts-listen` takes the same
//! deliveries as `baton up`'s control API (`baton_driver::alerts`) and writes an
//! `abort` request into each named Rollout's request annotation, as `kubectl baton
//! abort` does, so the leader's next reconcile acts on it and audits it. Any replica
//! may serve it: it only writes the annotation.
//!
//! An alert names its Rollout with the labels `rollout` and `namespace`; one without
//! `namespace` is refused (listed in the answer), since a name alone could match a
//! Rollout in any namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use kube::Api;
use kube::api::Patch;
use serde_json::{Value, json};

use crate::controller::REQUEST_ANNOTATION;
use crate::crd::Rollout;

/// The path Alertmanager's `webhook_configs[].url` points at.
pub const PATH: &str = "/alerts";
/// A delivery is a few kilobytes; more is refused.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AlertsListenError {
    #[error("cannot listen for alerts on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    client: kube::Client,
    token: String,
    seq: AtomicU64,
}

/// Serves the webhook on plain HTTP (Alertmanager sends the bearer `token`, kept in a
/// Secret; put TLS in front where the network is not trusted).
pub async fn serve(
    addr: SocketAddr,
    token: String,
    client: kube::Client,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AlertsListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AlertsListenError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AlertsListenError::Listen { addr, source })?;
    let shared = Arc::new(Shared {
        client,
        token,
        seq: AtomicU64::new(0),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(req, &shared).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

async fn answer(req: Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH || req.method() != Method::POST {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("POST {PATH} takes Alertmanager's webhook")}),
        );
    }
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), shared.token.as_bytes()));
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong token: Alertmanager's http_config.authorization must carry the operator's alerts token"}),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("the body is unreadable or over {MAX_BODY} bytes: {e}")}),
            );
        }
    };
    let batch = match baton_driver::alerts::parse(&body) {
        Ok(b) => b,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    let mut results = Vec::new();
    for a in &batch.aborts {
        let Some(ns) = &a.namespace else {
            results.push(json!({"rollout": a.rollout, "alert": a.alert, "aborted": false,
                "answer": "no namespace label: on a cluster an alert names its Rollout by `namespace` and `rollout`"}));
            continue;
        };
        let id = format!(
            "alert-{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            shared.seq.fetch_add(1, Ordering::Relaxed)
        );
        let request = json!({"id": id, "command": "abort", "by": a.actor()}).to_string();
        let patch = json!({"metadata": {"annotations": {REQUEST_ANNOTATION: request}}});
        let api: Api<Rollout> = Api::namespaced(shared.client.clone(), ns);
        let (aborted, text) = match api
            .patch(&a.rollout, &crate::patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => (true, format!("abort requested ({id})")),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                (false, format!("no Rollout {ns}/{}", a.rollout))
            }
            Err(e) => (false, format!("the request could not be written: {e}")),
        };
        tracing::info!(namespace = %ns, rollout = %a.rollout, alert = %a.alert, aborted, "{text}");
        results.push(json!({"namespace": ns, "rollout": a.rollout, "alert": a.alert, "aborted": aborted, "answer": text}));
    }
    reply(
        StatusCode::OK,
        json!({"aborts": results, "resolved": batch.resolved, "withoutRolloutLabel": batch.unlabelled}),
    )
}

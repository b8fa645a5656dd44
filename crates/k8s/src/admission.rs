//! The optional admission webhook that makes a request's actor a fact: the API server
//! calls it with the authenticated user of every write to a Rollout, and it stamps
//! that user into `baton.dev/request-actor` whenever the request annotation changes
//! (and puts back whatever a writer tried to set there by hand). Without it, the actor
//! is the request's own `by`, a claim anyone who may patch the Rollout can write, and
//! it is recorded as `claim:NAME`; with it, as `user:NAME`.
//!
//! It trusts the API server to call it on every write (a MutatingWebhookConfiguration
//! with `failurePolicy: Fail`): the operator reads the annotation as verified only
//! when started with `--admission-listen`, which says it is registered so.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::controller::REQUEST_ANNOTATION;

/// Who asked for the request in `baton.dev/request`, as the API server authenticated
/// them; written by the webhook only.
pub const ACTOR_ANNOTATION: &str = "baton.dev/request-actor";

/// The path the MutatingWebhookConfiguration names.
pub const PATH: &str = "/mutate-rollouts";

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("cannot read the webhook's TLS certificate or key: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// An annotation's JSON-pointer path (`/` in its name escaped as `~1`).
fn pointer(annotation: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        annotation.replace('~', "~0").replace('/', "~1")
    )
}

/// The answer to one AdmissionReview: always allowed, with the patch that makes the
/// actor annotation the authenticated user's (a new request) or what it was (anything
/// else).
pub fn review(review: &Value) -> Value {
    let req = &review["request"];
    let uid = req["uid"].clone();
    let annotation = |o: &Value, name: &str| {
        o["metadata"]["annotations"][name]
            .as_str()
            .map(str::to_string)
    };
    let (new, old) = (&req["object"], &req["oldObject"]);
    let asked = annotation(new, REQUEST_ANNOTATION);
    let had = annotation(old, REQUEST_ANNOTATION);
    let actor_now = annotation(new, ACTOR_ANNOTATION);
    let actor_was = annotation(old, ACTOR_ANNOTATION);
    let want = if asked.is_some() && asked != had {
        req["userInfo"]["username"].as_str().map(str::to_string)
    } else {
        actor_was
    };
    let mut ops = Vec::new();
    if want != actor_now {
        if new["metadata"]["annotations"].is_null() {
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
        }
        match (&want, &actor_now) {
            (Some(v), Some(_)) => {
                ops.push(json!({"op": "replace", "path": pointer(ACTOR_ANNOTATION), "value": v}))
            }
            (Some(v), None) => {
                ops.push(json!({"op": "add", "path": pointer(ACTOR_ANNOTATION), "value": v}))
            }
            (None, _) => ops.push(json!({"op": "remove", "path": pointer(ACTOR_ANNOTATION)})),
        }
    }
    let mut response = json!({"uid": uid, "allowed": true});
    if !ops.is_empty() {
        let patch = serde_json::to_vec(&ops).unwrap_or_default();
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    json!({
        "apiVersion": review["apiVersion"].as_str().unwrap_or("admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// The request's actor, verified when the webhook is registered (`user:NAME`), else
/// the request's own word for it (`claim:NAME`).
pub fn actor(
    annotations: &std::collections::BTreeMap<String, String>,
    by: &str,
    verified: bool,
) -> String {
    match annotations.get(ACTOR_ANNOTATION) {
        // The operator's alerts webhook writes `alert:NAME`: kept beside the user who
        // wrote it (the operator's service account), as the alert's name is the point.
        Some(user) if verified && by.starts_with("alert:") => format!("user:{user}/{by}"),
        Some(user) if verified => format!("user:{user}"),
        _ => format!("claim:{by}"),
    }
}

/// Serves the webhook over HTTPS (the API server calls webhooks over TLS only) with the
/// certificate and key in these PEM files.
pub async fn serve(
    addr: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdmissionError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| AdmissionError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| AdmissionError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AdmissionError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| AdmissionError::Tls(e.to_string()))?;
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdmissionError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdmissionError::Listen { addr, source })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(s) = tls.accept(s).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(answer(req).await)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

async fn answer(req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r
    };
    if req.uri().path() != PATH || req.method() != hyper::Method::POST {
        return reply(StatusCode::NOT_FOUND, format!("POST {PATH}\n"));
    }
    // An AdmissionReview of one Rollout is small; a larger body is not one.
    let body = match http_body_util::Limited::new(req.into_body(), 4 << 20)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
    };
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v["request"]["uid"].is_string() => {
            let mut r = reply(StatusCode::OK, review(&v).to_string());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => reply(
            StatusCode::BAD_REQUEST,
            "not an AdmissionReview with a request uid\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch_of(answer: &Value) -> Vec<Value> {
        let b64 = answer["response"]["patch"].as_str().unwrap_or("");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        serde_json::from_slice(&bytes).expect("JSON patch")
    }

    fn review_of(old: Value, new: Value) -> Value {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u1", "operation": "UPDATE", "userInfo": {"username": "alice"},
            "object": {"metadata": {"annotations": new}},
            "oldObject": {"metadata": {"annotations": old}}}})
    }

    #[test]
    fn a_new_request_is_stamped_with_the_authenticated_user() {
        let a = review(&review_of(
            json!({}),
            json!({REQUEST_ANNOTATION: "{\"id\":\"1\",\"command\":\"abort\",\"by\":\"mallory\"}"}),
        ));
        assert_eq!(a["response"]["allowed"], true);
        assert_eq!(a["response"]["uid"], "u1");
        assert_eq!(
            patch_of(&a),
            vec![
                json!({"op": "add", "path": "/metadata/annotations/baton.dev~1request-actor", "value": "alice"})
            ]
        );
    }

    #[test]
    fn a_hand_written_actor_is_put_back() {
        let req = json!({REQUEST_ANNOTATION: "{\"id\":\"1\"}", ACTOR_ANNOTATION: "alice"});
        let forged = json!({REQUEST_ANNOTATION: "{\"id\":\"1\"}", ACTOR_ANNOTATION: "root"});
        let a = review(&review_of(req, forged));
        assert_eq!(
            patch_of(&a),
            vec![
                json!({"op": "replace", "path": "/metadata/annotations/baton.dev~1request-actor", "value": "alice"})
            ]
        );
        // Nothing to do when nothing about the request changed.
        let same = json!({REQUEST_ANNOTATION: "{\"id\":\"1\"}", ACTOR_ANNOTATION: "alice"});
        let a = review(&review_of(same.clone(), same));
        assert!(a["response"]["patch"].is_null(), "{a}");
    }

    #[test]
    fn the_actor_is_a_claim_unless_verified() {
        let mut ann = std::collections::BTreeMap::new();
        assert_eq!(actor(&ann, "bob", true), "claim:bob");
        ann.insert(ACTOR_ANNOTATION.to_string(), "alice".to_string());
        assert_eq!(actor(&ann, "bob", false), "claim:bob");
        assert_eq!(
            actor(&ann, "alert:WebErrors", true),
            "user:alice/alert:WebErrors"
        );
        assert_eq!(actor(&ann, "bob", true), "user:alice");
    }
}

//! Mutating admission webhooks, called as the API server calls them: for a write to a
//! resource a stored `MutatingWebhookConfiguration` names (its rules' API groups,
//! resources and operations), an `admission.k8s.io/v1` AdmissionReview with the
//! requesting user goes to `clientConfig.url` over HTTPS, trusting `caBundle`; its
//! JSON patch is applied, a denial refuses the write, and a webhook that cannot be
//! reached refuses it too unless its `failurePolicy` is `Ignore`.
//!
//! Not modelled: `clientConfig.service` (tests give a URL), object and namespace
//! selectors, match conditions, reinvocation, validating webhooks.
//!
//! The requesting user is the `Impersonate-User` header (what `kubectl --as` and a kube
//! client's `impersonate` send), `system:admin` without one: the fake has no
//! authentication of its own.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::store::{Key, Store};

const GV: &str = "admissionregistration.k8s.io/v1";
const RESOURCE: &str = "mutatingwebhookconfigurations";

/// Whether any mutating webhook is registered (writes take the plain path otherwise).
pub(crate) fn any(store: &Store) -> bool {
    !store.list(GV, RESOURCE, None).0.is_empty()
}

fn matches(rule: &Value, group: &str, resource: &str, operation: &str) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
    };
    has("apiGroups", group) && has("resources", resource) && has("operations", operation)
}

/// `object` after every matching webhook, or why the write is refused.
pub(crate) async fn mutate(
    store: &Store,
    key: &Key,
    sub: Option<&str>,
    operation: &str,
    user: &str,
    mut object: Value,
    old: Option<Value>,
) -> Result<Value, (u16, String)> {
    let (group, version) = match key.gv.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), key.gv.clone()),
    };
    let resource = match sub {
        Some(s) => format!("{}/{s}", key.resource),
        None => key.resource.clone(),
    };
    let (configs, _) = store.list(GV, RESOURCE, None);
    for config in configs {
        for hook in config["webhooks"].as_array().into_iter().flatten() {
            let rules = hook["rules"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if !rules
                .iter()
                .any(|r| matches(r, &group, &resource, operation))
            {
                continue;
            }
            let name = hook["name"].as_str().unwrap_or("webhook");
            let review = json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": format!("fake-{}", std::process::id()),
                    "kind": {"group": group, "version": version, "kind": object["kind"].clone()},
                    "resource": {"group": group, "version": version, "resource": key.resource},
                    "subResource": sub,
                    "name": key.name, "namespace": key.namespace,
                    "operation": operation,
                    "userInfo": {"username": user},
                    "object": object,
                    "oldObject": old.clone().unwrap_or(Value::Null),
                },
            });
            let ignore = hook["failurePolicy"] == "Ignore";
            let answer = match call(hook, &review).await {
                Ok(a) => a,
                Err(e) if ignore => {
                    let _ = e;
                    continue;
                }
                Err(e) => {
                    return Err((
                        500,
                        format!("Internal error occurred: failed calling webhook \"{name}\": {e}"),
                    ));
                }
            };
            let response = &answer["response"];
            if response["allowed"] != true {
                let why = response["status"]["message"].as_str().unwrap_or("denied");
                return Err((
                    403,
                    format!("admission webhook \"{name}\" denied the request: {why}"),
                ));
            }
            if let Some(patch) = response["patch"].as_str() {
                let bad = |what: String| (500, format!("webhook \"{name}\": {what}"));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .map_err(|e| bad(format!("its patch is not base64: {e}")))?;
                let p: json_patch::Patch = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("its patch is no JSON patch: {e}")))?;
                json_patch::patch(&mut object, &p)
                    .map_err(|e| bad(format!("its patch does not apply: {e}")))?;
            }
        }
    }
    Ok(object)
}

/// One call to a webhook's URL over TLS, trusting its caBundle.
async fn call(hook: &Value, review: &Value) -> Result<Value, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls;
    let cc = &hook["clientConfig"];
    let url: hyper::Uri = cc["url"]
        .as_str()
        .ok_or("no clientConfig.url (clientConfig.service is not modelled)")?
        .parse()
        .map_err(|e| format!("clientConfig.url: {e}"))?;
    if url.scheme_str() != Some("https") {
        return Err("clientConfig.url must be https".into());
    }
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cc["caBundle"].as_str().unwrap_or(""))
        .map_err(|e| format!("caBundle: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| format!("caBundle: {e}"))?;
        roots.add(cert).map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = url
        .host()
        .ok_or("clientConfig.url has no host")?
        .to_string();
    let port = url.port_u16().unwrap_or(443);
    let server = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post(url.path())
            .header("host", format!("{host}:{port}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(review.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !code.is_success() {
            return Err(format!("{code}: {}", String::from_utf8_lossy(&body)));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("not JSON: {e}"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

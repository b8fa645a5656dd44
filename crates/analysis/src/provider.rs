//! The metric-provider interface and what providers share. One file per provider
//! beside this one; `registry.rs` picks one by the gate's `metric` field, so that
//! providers depend on this file and not the other way round.

use std::future::Future;
use std::net::SocketAddr;

/// What a query may refer to.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// The rollout's name (the `service` label of the proxy's metrics).
    pub service: String,
    /// The revision measured (the canary).
    pub revision: String,
    pub stable: Option<String>,
    /// A ready instance of the revision, for commands that probe it.
    pub address: Option<SocketAddr>,
}

impl Vars {
    /// Replaces `{{service}}`, `{{revision}}` and `{{stable}}`.
    pub fn apply(&self, template: &str) -> String {
        template
            .replace("{{service}}", &self.service)
            .replace("{{revision}}", &self.revision)
            .replace("{{stable}}", self.stable.as_deref().unwrap_or(""))
    }
}

/// A provider's answer: a number, or a reason why there is none (not an error: an
/// empty query result or NaN means no data yet, and is judged inconclusive).
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Value(f64),
    NoData(String),
    /// A check that passed or failed by itself (smoke tests), with what it saw.
    Check {
        passed: bool,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot reach {what}: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("{what} answered HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("no answer from {what} within {seconds} s")]
    Timeout { what: String, seconds: f64 },
    #[error("{0}")]
    Invalid(String),
}

/// One kind of measurement. Implementations do I/O and nothing else; judging is
/// done once, by [`crate::measure`], for all of them.
pub trait MetricProvider {
    fn sample(&self, vars: &Vars) -> impl Future<Output = Result<Sample, ProviderError>> + Send;
}

/// GETs `url` (http or https) with a timeout; the body if the status is 2xx.
pub(crate) async fn http_get(
    url: &str,
    headers: &[(String, String)],
    timeout: std::time::Duration,
    what: &str,
) -> Result<Vec<u8>, ProviderError> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    if url.starts_with("https://") {
        // The system's CA certificates (or `SSL_CERT_FILE`'s), read per measurement:
        // at most about once a second per gate.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| {
                ProviderError::Invalid(format!(
                    "{what}: no CA certificates on this machine for https: {e}"
                ))
            })?
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        fetch(client, url, headers, timeout, what).await
    } else {
        let client = Client::builder(TokioExecutor::new()).build_http();
        fetch(client, url, headers, timeout, what).await
    }
}

async fn fetch<C>(
    client: hyper_util::client::legacy::Client<C, http_body_util::Empty<bytes::Bytes>>,
    url: &str,
    headers: &[(String, String)],
    timeout: std::time::Duration,
    what: &str,
) -> Result<Vec<u8>, ProviderError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let mut req = hyper::Request::get(url);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| ProviderError::Invalid(format!("{what}: bad request: {e}")))?;
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| ProviderError::Unreachable {
                what: what.to_string(),
                detail: causes(&e),
            })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ProviderError::Unreachable {
                what: what.to_string(),
                detail: e.to_string(),
            })?
            .to_bytes()
            .to_vec();
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&body).chars().take(300).collect();
            return Err(ProviderError::Status {
                what: what.to_string(),
                status,
                body: text,
            });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs_f64(),
            })
        })
}

/// An error and its causes, innermost last: hyper's own message for a failed
/// connection is only "client error (Connect)", the refused port or the rejected
/// certificate is further down.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

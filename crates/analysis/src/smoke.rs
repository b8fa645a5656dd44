//! Smoke tests: HTTP checks against one revision (the blue-green preview).

use std::net::SocketAddr;
use std::time::Duration;

use baton_spec::SmokeTest;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Smoke tests as a gate: run against a ready instance of the canary only.
pub struct Smoke<'a>(pub &'a [SmokeTest]);

impl crate::provider::MetricProvider for Smoke<'_> {
    async fn sample(
        &self,
        vars: &crate::provider::Vars,
    ) -> Result<crate::provider::Sample, crate::provider::ProviderError> {
        use crate::provider::Sample;
        let Some(addr) = vars.address else {
            return Ok(Sample::NoData(
                "no ready instance of the canary to test".into(),
            ));
        };
        Ok(
            match run_smoke(addr, self.0, Duration::from_secs(5)).await {
                Ok(detail) => Sample::Check {
                    passed: true,
                    detail,
                },
                Err(detail) => Sample::Check {
                    passed: false,
                    detail,
                },
            },
        )
    }
}

/// Runs every test in order against `addr`; the first failure is the error.
pub async fn run_smoke(
    addr: SocketAddr,
    tests: &[SmokeTest],
    timeout: Duration,
) -> Result<String, String> {
    for t in tests {
        let what = format!("{} {}", t.method, t.path);
        match tokio::time::timeout(timeout, one(addr, t)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("{what}: {e}")),
            Err(_) => return Err(format!("{what}: no answer within {timeout:?}")),
        }
    }
    Ok(format!("{} check(s) passed against {addr}", tests.len()))
}

async fn one(addr: SocketAddr, t: &SmokeTest) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(t.method.as_str())
        .uri(t.path.as_str())
        .header(hyper::header::HOST, addr.to_string())
        .header("user-agent", "baton-smoke");
    for (k, v) in &t.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(t.body.clone().unwrap_or_default())))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != t.expect_status {
        return Err(format!("HTTP {status}, expected {}", t.expect_status));
    }
    if let Some(want) = &t.expect_body_contains
        && !String::from_utf8_lossy(&body).contains(want.as_str())
    {
        return Err(format!("body does not contain {want:?}"));
    }
    Ok(())
}

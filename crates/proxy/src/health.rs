//! Active checks of routed instances, and the Prometheus endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::http::plain;
use crate::{Shared, table};

/// Between the platform's probes, a TCP connect to every routed instance twice a
/// second: one that stopped listening (it crashed) leaves rotation at once instead of
/// after five failed requests, and an ejected one that answers comes back.
pub(crate) async fn active_checks(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let routed = table::routed(&shared.table.load().source.services);
        let checks = shared
            .outliers
            .all()
            .into_iter()
            .filter(|(a, _)| routed.contains(a))
            .map(|(addr, h)| {
                let shared = shared.clone();
                async move {
                    let up = tokio::time::timeout(
                        Duration::from_millis(300),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok());
                    if up {
                        shared.outliers.reachable(&h);
                    } else if shared.outliers.unreachable(&h) {
                        warn!(%addr, "instance unreachable: out of rotation until it answers");
                    }
                }
            });
        futures_util::future::join_all(checks).await;
    }
}

/// The controller's rollout metrics, if it wrote any (none yet, or none any more, is
/// no error: the proxy's own metrics are served regardless).
async fn textfile(path: &std::path::Path) -> String {
    /// More than any number of rollouts writes; a larger file is not served at all
    /// (cut, its last family would be invalid exposition).
    const MAX: u64 = 16 << 20;
    let Ok(f) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let mut text = String::new();
    use tokio::io::AsyncReadExt;
    match f.take(MAX + 1).read_to_string(&mut text).await {
        Ok(n) if n as u64 <= MAX => {}
        _ => {
            warn!(path = %path.display(), "metrics textfile not served: unreadable, or over 16 MiB");
            return String::new();
        }
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

pub(crate) async fn serve_metrics(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let s = s.clone();
                async move {
                    if req.uri().path() != "/metrics" {
                        return Ok::<_, Infallible>(plain(StatusCode::NOT_FOUND, "try /metrics"));
                    }
                    let active = s
                        .graceful
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map_or(0, |g| g.count() as u64);
                    let mut body =
                        s.metrics
                            .render(s.table.load().version, active, s.sessions.count() as u64);
                    if let Some(path) = &s.settings.metrics_textfile {
                        body.push_str(&textfile(path).await);
                    }
                    let mut r = plain(StatusCode::OK, "");
                    *r.body_mut() = Full::new(Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed();
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! What the three services share: configuration, health and readiness, Prometheus
//! metrics, fault flags for showing a broken version, JSON errors that name the
//! field, structured logs and graceful shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;

use crate::auth::{Claims, Tokens, bearer};

/// Flags every service takes, from the command line or the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to bind (0.0.0.0 in a container; Baton's local specs use 127.0.0.1).
    #[arg(long, env = "BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// The shared store: sqlite:/path/to/exchange.db or postgres://user:pass@host:port/db.
    #[arg(long, env = "EXCHANGE_DATABASE_URL")]
    pub database_url: String,
    /// Secret for HS256 access tokens, at least 32 bytes, the same for every service.
    #[arg(long, env = "EXCHANGE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Version string reported by /version, in metrics and logs.
    #[arg(long = "app-version", env = "APP_VERSION", default_value = "dev")]
    pub app_version: String,
    /// Not ready until this many milliseconds after start (a slow-starting version).
    #[arg(long, env = "STARTUP_DELAY_MS", default_value_t = 0)]
    pub startup_delay_ms: u64,
    /// Fault: added to every API answer.
    #[arg(long, env = "FAULT_LATENCY_MS", default_value_t = 0)]
    pub fault_latency_ms: u64,
    /// Fault: share of API requests answered 500 (0 to 1).
    #[arg(long, env = "FAULT_ERROR_RATE", default_value_t = 0.0)]
    pub fault_error_rate: f64,
    /// Fault: exit abruptly after this many API requests (0: never).
    #[arg(long, env = "FAULT_CRASH_AFTER", default_value_t = 0)]
    pub fault_crash_after: u64,
}

impl CommonArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.fault_error_rate) {
            anyhow::bail!(
                "FAULT_ERROR_RATE must be between 0 and 1, not {}",
                self.fault_error_rate
            );
        }
        Ok(())
    }

    pub fn tokens(&self, ttl_seconds: i64) -> anyhow::Result<Tokens> {
        Ok(Tokens::new(self.jwt_secret.as_bytes(), ttl_seconds)?)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    version: String,
    route: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    service: String,
    version: String,
    route: String,
}

/// One per process, shared by every handler.
pub struct Common {
    pub service: &'static str,
    pub version: String,
    started: Instant,
    startup_delay: Duration,
    ready: AtomicBool,
    draining: AtomicBool,
    api_requests: AtomicU64,
    faults: (Duration, f64, u64),
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
}

impl Common {
    /// `extra` registers the service's own metrics before the registry is frozen.
    pub fn new(
        service: &'static str,
        args: &CommonArgs,
        extra: impl FnOnce(&mut Registry),
    ) -> Arc<Common> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
        });
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests",
            latency.clone(),
        );
        extra(&mut registry);
        Arc::new(Common {
            service,
            version: args.app_version.clone(),
            started: Instant::now(),
            startup_delay: Duration::from_millis(args.startup_delay_ms),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            api_requests: AtomicU64::new(0),
            faults: (
                Duration::from_millis(args.fault_latency_ms),
                args.fault_error_rate,
                args.fault_crash_after,
            ),
            registry,
            requests,
            latency,
        })
    }

    /// Called once the service can serve (store open, caches warm).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.is_draining()
            && self.started.elapsed() >= self.startup_delay
    }

    /// Adds /healthz, /readyz, /metrics and /version, and wraps every route with
    /// metrics and faults.
    pub fn router(self: &Arc<Self>, api: Router) -> Router {
        let plumbing = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/version", get(version))
            .with_state(self.clone());
        api.merge(plumbing)
            .layer(axum::middleware::from_fn_with_state(self.clone(), track))
    }
}

async fn readyz(State(c): State<Arc<Common>>) -> Response {
    if c.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if c.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn version(State(c): State<Arc<Common>>) -> Response {
    axum::Json(serde_json::json!({"service": c.service, "version": c.version})).into_response()
}

async fn metrics(State(c): State<Arc<Common>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &c.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn is_plumbing(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz" | "/metrics" | "/version")
}

async fn track(
    State(c): State<Arc<Common>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let route = matched
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let plumbing = is_plumbing(&route);
    let response = if plumbing {
        next.run(req).await
    } else {
        let (latency, error_rate, crash_after) = c.faults;
        let n = c.api_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if crash_after > 0 && n > crash_after {
            tracing::error!(requests = n, "FAULT_CRASH_AFTER reached: exiting abruptly");
            std::process::exit(70);
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if error_rate > 0.0 && fastrand::f64() < error_rate {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "fault",
                "injected failure (FAULT_ERROR_RATE)",
            )
            .into_response()
        } else {
            next.run(req).await
        }
    };
    let mut response = response;
    if let Ok(v) = axum::http::HeaderValue::from_str(&c.version) {
        response.headers_mut().insert("x-app-version", v);
    }
    let code = response.status().as_u16();
    if !plumbing {
        c.requests
            .get_or_create(&RequestLabels {
                service: c.service.to_string(),
                version: c.version.clone(),
                route: route.clone(),
                method,
                code: format!("{}xx", code / 100),
            })
            .inc();
        c.latency
            .get_or_create(&LatencyLabels {
                service: c.service.to_string(),
                version: c.version.clone(),
                route,
            })
            .observe(start.elapsed().as_secs_f64());
    }
    if code >= 500 {
        tracing::warn!(code, "answered with a server error");
    }
    response
}

/// A JSON error: `{"error": code, "message": ..., "field": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
            field: Some(field.into()),
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": self.code, "message": self.message});
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parses a JSON body, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::field(field, e.inner().to_string())
    })
}

/// The caller's claims from `Authorization: Bearer`.
pub fn authenticate(headers: &HeaderMap, tokens: &Tokens) -> Result<Claims, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = bearer(value)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
    tokens
        .verify(token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Serves `app` until SIGTERM: turns unready first, runs `drain` (for example
/// closing WebSockets), then stops accepting and finishes in-flight requests.
pub async fn serve<F>(
    common: Arc<Common>,
    args: &CommonArgs,
    app: Router,
    drain: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(service = common.service, version = %common.version, %addr, "listening");
    let c = common.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            terminated().await;
            c.draining.store(true, Ordering::SeqCst);
            tracing::info!("SIGTERM: draining");
            drain.await;
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// A response with a JSON body and a status.
pub fn json(status: StatusCode, value: impl serde::Serialize) -> Response {
    (status, axum::Json(value)).into_response()
}

/// An empty body, for handlers that answer with status only.
pub fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    #[command(version)]
    struct Args {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn bad_json_names_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            qty: i64,
        }
        let err = parse_json::<Body>(br#"{"qty": "ten"}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("qty"));
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err = parse_json::<Body>(b"not json").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("body"));
    }
}

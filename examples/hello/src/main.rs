//! `hello`: the example service Baton rolls out.
//!
//! `hello --port N` answers `GET /` with its version (`APP_VERSION`), has `/healthz`
//! (liveness) and `/readyz` (readiness), and can misbehave on demand so a bad version
//! can be shown: `STARTUP_DELAY_MS` (not ready until then), `FAIL_RATE` (share of
//! answers that are 500), `LATENCY_MS` (added to every answer), `UNHEALTHY_AFTER_MS`
//! (`/healthz` fails from then on, so liveness restarts it), `SLOW_REQUESTS` and
//! `SLOW_MS` (the first N answers take that long: a few slow requests, not a slow
//! version). On SIGTERM it turns
//! unready, stops accepting, finishes what is in flight and exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

struct State {
    version: String,
    started: Instant,
    startup_delay: Duration,
    fail_rate: f64,
    latency: Duration,
    unhealthy_after: Option<Duration>,
    slow_requests: u64,
    slow: Duration,
    served: AtomicU64,
    draining: AtomicBool,
}

fn env_num(name: &str) -> Result<f64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .ok_or_else(|| format!("{name}={v:?} is not a non-negative number")),
        Err(_) => Ok(0.0),
    }
}

fn port_arg() -> Result<u16, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut port = std::env::var("PORT").ok();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--port" => {
                port = args.get(i + 1).cloned();
                i += 2;
            }
            "-h" | "--help" => {
                println!(
                    "usage: hello --port N   (env: APP_VERSION, STARTUP_DELAY_MS, FAIL_RATE, LATENCY_MS)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; usage: hello --port N")),
        }
    }
    let p = port.ok_or("missing --port N (or PORT)")?;
    p.parse()
        .map_err(|_| format!("--port {p:?} is not a port number"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("hello: {e}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let port = port_arg()?;
    let fail_rate = env_num("FAIL_RATE")?;
    if fail_rate > 1.0 {
        return Err(format!("FAIL_RATE={fail_rate} must be between 0 and 1"));
    }
    let state = Arc::new(State {
        version: std::env::var("APP_VERSION").unwrap_or_else(|_| "unknown".into()),
        started: Instant::now(),
        startup_delay: Duration::from_millis(env_num("STARTUP_DELAY_MS")? as u64),
        fail_rate,
        latency: Duration::from_millis(env_num("LATENCY_MS")? as u64),
        slow_requests: env_num("SLOW_REQUESTS")? as u64,
        slow: Duration::from_millis(env_num("SLOW_MS")? as u64),
        unhealthy_after: match std::env::var("UNHEALTHY_AFTER_MS") {
            Ok(_) => Some(Duration::from_millis(env_num("UNHEALTHY_AFTER_MS")? as u64)),
            Err(_) => None,
        },
        served: AtomicU64::new(0),
        draining: AtomicBool::new(false),
    });
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    eprintln!("hello {} listening on 127.0.0.1:{port}", state.version);
    let graceful = GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let s = state.clone();
                let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move { let _ = fut.await; });
            }
            _ = term.recv() => break,
        }
    }
    state.draining.store(true, Ordering::SeqCst);
    drop(listener);
    eprintln!("hello {}: SIGTERM, draining", state.version);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

async fn handle(
    s: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = header::HeaderValue::from_str(&s.version) {
            r.headers_mut().insert("x-version", v);
        }
        Ok(r)
    };
    match req.uri().path() {
        "/healthz" => match s.unhealthy_after {
            Some(after) if s.started.elapsed() >= after => {
                reply(StatusCode::INTERNAL_SERVER_ERROR, "unhealthy\n".into())
            }
            _ => reply(StatusCode::OK, "ok\n".into()),
        },
        "/readyz" => {
            if s.draining.load(Ordering::SeqCst) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else if s.started.elapsed() < s.startup_delay {
                reply(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
            } else {
                reply(StatusCode::OK, "ready\n".into())
            }
        }
        _ => {
            if !s.latency.is_zero() {
                tokio::time::sleep(s.latency).await;
            }
            // A deterministic share: request n fails when n * rate crosses an integer.
            let n = s.served.fetch_add(1, Ordering::Relaxed);
            if n < s.slow_requests {
                tokio::time::sleep(s.slow).await;
            }
            let fails = ((n + 1) as f64 * s.fail_rate).floor() > (n as f64 * s.fail_rate).floor();
            if fails {
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("hello from {}: simulated failure\n", s.version),
                )
            } else {
                reply(StatusCode::OK, format!("hello from {}\n", s.version))
            }
        }
    }
}

//! `hello`: the example service Baton rolls out.
//!
//! `hello --port N` (or `PORT`; `HOST` to listen elsewhere than 127.0.0.1) answers `GET /` with its version (`APP_VERSION`), has `/healthz`
//! (liveness) and `/readyz` (readiness), and can misbehave on demand so a bad version
//! can be shown: `STARTUP_DELAY_MS` (not ready until then), `FAIL_RATE` (share of
//! answers that are 500), `LATENCY_MS` (added to every answer), `UNHEALTHY_AFTER_MS`
//! (`/healthz` fails from then on, so liveness restarts it), `SLOW_REQUESTS` and
//! `SLOW_MS` (the first N answers take that long: a few slow requests, not a slow
//! version). `/ws` is a WebSocket that echoes each text message prefixed with the
//! version. On SIGTERM it turns
//! unready, closes WebSockets with 1012 ("service restart") so clients reconnect
//! elsewhere, stops accepting, finishes what is in flight and exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
    /// Tells WebSocket sessions to close with 1012.
    drain: tokio::sync::watch::Sender<bool>,
    sessions: AtomicUsize,
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
                    "usage: hello --port N   (env: PORT, HOST, APP_VERSION, STARTUP_DELAY_MS, FAIL_RATE, LATENCY_MS)"
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
        drain: tokio::sync::watch::channel(false).0,
        sessions: AtomicUsize::new(0),
    });
    // HOST: the address to listen on (a pod's own loopback address in the test cluster).
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    eprintln!("hello {} listening on {host}:{port}", state.version);
    let graceful = GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let s = state.clone();
                let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn.into_owned());
                tokio::spawn(async move { let _ = fut.await; });
            }
            _ = term.recv() => break,
        }
    }
    state.draining.store(true, Ordering::SeqCst);
    drop(listener);
    eprintln!("hello {}: SIGTERM, draining", state.version);
    state.drain.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.sessions.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

/// Resolves once the instance starts draining.
async fn drained(mut rx: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Echoes text messages as `VERSION: text` until the client closes or the instance
/// drains, when it closes with 1012 so the client reconnects to a live instance.
async fn websocket(s: Arc<State>, req: Request<Incoming>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};
    let Ok(upgraded) = hyper::upgrade::on(req).await else {
        return;
    };
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        None,
    )
    .await;
    s.sessions.fetch_add(1, Ordering::SeqCst);
    let drained = drained(s.drain.subscribe());
    tokio::pin!(drained);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if ws.send(Message::text(format!("{}: {}", s.version, t.as_str()))).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = &mut drained => {
                let frame = CloseFrame { code: CloseCode::Restart, reason: "service restart".into() };
                let _ = ws.close(Some(frame)).await;
                break;
            }
        }
    }
    s.sessions.fetch_sub(1, Ordering::SeqCst);
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
    if req.uri().path() == "/ws" {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return reply(
                StatusCode::BAD_REQUEST,
                "a WebSocket upgrade is needed here\n".into(),
            );
        };
        if s.draining.load(Ordering::SeqCst) {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
        }
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        tokio::spawn(websocket(s.clone(), req));
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        return Ok(r);
    }
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

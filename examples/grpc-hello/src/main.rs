//! A tiny gRPC service to roll out with `traffic.backendProtocol: h2c`: `SayHello`
//! answers with its version, `Watch` streams ticks. HTTP/1.1 `/readyz` and `/healthz`
//! on the same port serve the probes (the gRPC calls are HTTP/2 by prior knowledge).
//!
//! Environment: PORT (or `--port N`), HOST (default 127.0.0.1), APP_VERSION,
//! FAIL_RATE (0-1: that share of `SayHello` calls answer INTERNAL, spread evenly).
//! On SIGTERM it stops being ready, ends its `Watch` streams with UNAVAILABLE (clients
//! retry elsewhere), finishes its calls in flight (GOAWAY), and exits.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tonic::Status;

mod pb {
    tonic::include_proto!("baton.example");
}

use pb::greeter_server::{Greeter, GreeterServer};
use pb::{HelloReply, HelloRequest, Tick, WatchRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

struct State {
    version: String,
    fail_rate: f64,
    calls: AtomicU64,
    draining: AtomicBool,
    /// Tells the `Watch` streams to end.
    drain: tokio::sync::watch::Sender<bool>,
}

#[derive(Clone)]
struct Service(Arc<State>);

#[tonic::async_trait]
impl Greeter for Service {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, Status> {
        let s = &self.0;
        let n = s.calls.fetch_add(1, Ordering::Relaxed);
        // The n-th call fails when the running count of failures steps up: exactly
        // `FAIL_RATE` of them, evenly spread.
        if ((n + 1) as f64 * s.fail_rate).floor() > (n as f64 * s.fail_rate).floor() {
            return Err(Status::internal(format!("{} fails on purpose", s.version)));
        }
        Ok(tonic::Response::new(HelloReply {
            message: format!("hello {}", request.into_inner().name),
            version: s.version.clone(),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

    async fn watch(
        &self,
        request: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let every = Duration::from_millis(u64::from(request.into_inner().interval_ms.max(10)));
        let state = self.0.clone();
        let drain = state.drain.subscribe();
        let ticks =
            futures_util::stream::unfold((0u64, drain, false), move |(seq, mut drain, done)| {
                let state = state.clone();
                async move {
                    if done {
                        return None;
                    }
                    let draining = tokio::select! {
                        _ = tokio::time::sleep(every) => false,
                        _ = drain.wait_for(|d| *d) => true,
                    };
                    if draining {
                        let end = Status::unavailable(format!("{} is draining", state.version));
                        return Some((Err(end), (seq, drain, true)));
                    }
                    let tick = Tick {
                        seq,
                        version: state.version.clone(),
                    };
                    Some((Ok(tick), (seq + 1, drain, false)))
                }
            });
        Ok(tonic::Response::new(Box::pin(ticks)))
    }
}

fn plain(status: u16, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r
}

fn args() -> Result<(u16, String, String, f64), String> {
    let mut port = std::env::var("PORT").ok();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next(),
            "-h" | "--help" => {
                println!("usage: grpc-hello --port N   (env: PORT, HOST, APP_VERSION, FAIL_RATE)");
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: grpc-hello --port N"
                ));
            }
        }
    }
    let port = port.ok_or("missing --port N (or PORT)")?;
    let port = port
        .parse()
        .map_err(|_| format!("--port {port:?} is not a port number"))?;
    let fail_rate = match std::env::var("FAIL_RATE") {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| format!("FAIL_RATE={v:?} is not a number between 0 and 1"))?,
        Err(_) => 0.0,
    };
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let version = std::env::var("APP_VERSION").unwrap_or_else(|_| "unknown".into());
    Ok((port, host, version, fail_rate))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("grpc-hello: {e}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let (port, host, version, fail_rate) = args()?;
    let state = Arc::new(State {
        version,
        fail_rate,
        calls: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        drain: tokio::sync::watch::channel(false).0,
    });
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    eprintln!("grpc-hello {} listening on {host}:{port}", state.version);
    let grpc = GreeterServer::new(Service(state.clone()));
    let graceful = GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (grpc, state) = (grpc.clone(), state.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (mut grpc, state) = (grpc.clone(), state.clone());
                    async move {
                        Ok::<_, Infallible>(match req.uri().path() {
                            "/readyz" if state.draining.load(Ordering::Relaxed) => plain(503, "draining\n"),
                            "/readyz" | "/healthz" => plain(200, "ok\n"),
                            _ => match tower_service::Service::call(&mut grpc, req).await {
                                Ok(resp) => resp.map(|b| b.map_err(|s| Box::new(s) as BoxError).boxed_unsync()),
                                Err(never) => match never {},
                            },
                        })
                    }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn.into_owned());
                tokio::spawn(async move { let _ = fut.await; });
            }
            _ = term.recv() => break,
        }
    }
    eprintln!("grpc-hello {}: SIGTERM, draining", state.version);
    state.draining.store(true, Ordering::Relaxed);
    state.drain.send_replace(true);
    // Calls in flight finish (HTTP/2 connections get GOAWAY); at most 10 s.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

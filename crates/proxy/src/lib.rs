//! The built-in L7 proxy.
//!
//! It runs as its own long-lived process (`baton proxy`), apart from the controller:
//! if the controller dies, traffic keeps flowing on the last routing table. The
//! controller drives it over a Unix socket (see [`control`]).
//!
//! Hot path: one lock-free load of the compiled table, a weighted pick, a pooled
//! keep-alive connection to the instance. Request bodies are buffered (up to a limit)
//! so that a request whose connection failed can be sent again to another instance.

mod affinity;
pub mod control;
mod control_server;
mod fairness;
mod grpc;
mod h1;
mod h2c;
pub mod handover;
mod health;
mod http;
pub mod metrics;
mod pipeline;
mod pool;
mod server;
pub mod table;
mod timer;
mod upgrade;
pub mod websocket;

/// Entry points for the fuzz targets (`fuzz/`), built only under `cargo fuzz`.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// An instance's answer head, as the proxy parses it, for each request method
    /// whose framing differs.
    pub fn answer_head(data: &[u8]) {
        for method in [hyper::Method::GET, hyper::Method::HEAD] {
            let mut buf = bytes::BytesMut::from(data);
            let _ = crate::h1::parse_head_for_fuzzing(&mut buf, &method);
        }
    }

    /// A client's request head, as hyper's server hands it over, through what the proxy
    /// does with it: the Host rules, the upgrade check, the pick of a revision (canary
    /// header, sticky cookie), the hop-by-hop stripping, and the head sent on to an
    /// instance. That head must read back as one request, the same one: a value that
    /// ended it early would smuggle a second request past the proxy.
    pub fn request(data: &[u8]) {
        use hyper::header::{HeaderName, HeaderValue};
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
            return;
        };
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return;
        };
        let Ok(method) = hyper::Method::from_bytes(method.as_bytes()) else {
            return;
        };
        let Ok(uri) = path.parse::<hyper::Uri>() else {
            return;
        };
        let version = match version {
            0 => hyper::Version::HTTP_10,
            _ => hyper::Version::HTTP_11,
        };
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .version(version);
        for h in req.headers.iter() {
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) else {
                return;
            };
            b = b.header(n, v);
        }
        let Ok(r) = b.body(()) else {
            return;
        };
        let (mut parts, ()) = r.into_parts();
        if crate::pipeline::host_rules_for_fuzzing(&mut parts).is_err() {
            return;
        }
        let _ = crate::upgrade::is_upgrade(&parts.headers);
        let _ = route().pick(&parts.headers);
        crate::pipeline::prepare_for_fuzzing(&mut parts);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = Vec::new();
        crate::h1::request_head(&mut out, &parts.method, path, &parts.headers, 0);
        let mut again = [httparse::EMPTY_HEADER; 80];
        let mut back = httparse::Request::new(&mut again);
        match back.parse(&out) {
            Ok(httparse::Status::Complete(n)) => {
                assert_eq!(n, out.len(), "the head sent on ends early");
                assert_eq!(back.method, Some(parts.method.as_str()));
                assert_eq!(back.path, Some(path));
                let framed = matches!(
                    parts.method,
                    hyper::Method::POST | hyper::Method::PUT | hyper::Method::PATCH
                );
                let sent = parts
                    .headers
                    .iter()
                    .filter(|(n, _)| *n != hyper::header::CONTENT_LENGTH)
                    .count()
                    + usize::from(framed);
                assert_eq!(back.headers.len(), sent, "headers lost or added on the way");
            }
            other => panic!("the head sent on does not parse: {other:?}"),
        }
    }

    /// A route with every way of picking: a canary header, a sticky cookie, weights.
    fn route() -> &'static crate::table::Route {
        static ROUTE: std::sync::OnceLock<crate::table::Compiled> = std::sync::OnceLock::new();
        let compiled = ROUTE.get_or_init(|| {
            let table: crate::RoutingTable = serde_json::from_str(
                r#"{"version": 1, "services": [{"name": "svc", "listen": "127.0.0.1:1",
                    "revisions": [{"name": "a", "weight": 90, "backends": ["127.0.0.1:2"]},
                                  {"name": "b", "weight": 10, "backends": ["127.0.0.1:3"]}],
                    "stable": "a", "canary": "b", "stickyCookie": "session",
                    "canaryHeader": ["x-canary", "1"]}]}"#,
            )
            .expect("the fuzz table");
            crate::table::Compiled::build(
                &table,
                &crate::metrics::Metrics::default(),
                &crate::table::Outliers::default(),
            )
            .expect("compiles")
        });
        compiled.routes.values().next().expect("one route")
    }

    /// A routing table as the control socket's `setTable` hands it over, compiled.
    pub fn table(table: &crate::RoutingTable) {
        let metrics = crate::metrics::Metrics::default();
        let outliers = crate::table::Outliers::default();
        let _ = crate::table::Compiled::build(table, &metrics, &outliers);
    }
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use affinity::{AffinityError, CpuAffinity};
pub use control::{
    ControlError, ProxyClient, Request as ControlRequest, Response as ControlResponse, Settings,
};
pub use metrics::{BUCKETS, RevisionStats, StatsSnapshot};
pub use table::{RevisionRoute, RoutingTable, ServiceRoute, routed};

use control_server::{apply_table_with, serve_control};
use health::{active_checks, serve_metrics};
use metrics::Metrics;
use table::Compiled;

type ProxyBody = BoxBody<Bytes, h1::BoxError>;

/// At most this many instances are tried for one request.
const MAX_ATTEMPTS: usize = 4;
/// Request heads above this size are refused (HTTP/1.1: 431) instead of buffered.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// On shutdown, how long a tunnel told to close may take to reach a frame boundary.
const TUNNEL_CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Config {
    pub control_socket: PathBuf,
    /// Where to serve Prometheus `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Text served on `/metrics` after the proxy's own, read at each scrape: the
    /// controller writes its rollout metrics there, so one machine is one scrape
    /// target (a file, as node_exporter's textfile collector, keeps the proxy free of
    /// any call to the controller and survives either restarting).
    pub metrics_textfile: Option<PathBuf>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// How long an instance may take to answer one attempt before it counts as failed,
    /// and how long a client may take to send a request's body (408 after it).
    pub request_timeout: Duration,
    /// Take the listening sockets, table and counters over from the proxy running on
    /// `control_socket` (hot restart) instead of starting empty.
    pub takeover: bool,
    /// Data-plane threads; 0 means one per CPU.
    pub workers: usize,
    /// Whether each data-plane thread is bound to a CPU of its own.
    pub cpu_affinity: CpuAffinity,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot take over from the running proxy: {0}")]
    Takeover(std::io::Error),
    #[error("cannot start the data-plane threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Affinity(#[from] AffinityError),
}

struct Shared {
    table: ArcSwap<Compiled>,
    /// Serialises table changes (binding listeners, then swapping).
    apply_lock: tokio::sync::Mutex<()>,
    metrics: Metrics,
    /// The data-plane threads: one single-threaded runtime each, so a request and the
    /// backend connection serving it stay on one thread (no cross-thread wake-ups —
    /// what the profile showed the multi-threaded runtime spending its time on).
    workers: Vec<tokio::runtime::Handle>,
    /// Open client connections per data-plane thread. A new connection goes to the
    /// thread with the fewest: whichever thread wins the accept race on a shared socket
    /// is the least busy one, so without this a burst of connections lands mostly on
    /// one thread (measured: one thread at 71 % of a core, the other at 38 %).
    worker_conns: Vec<AtomicUsize>,
    /// Accept loops, with their socket's fd (handed over on hot restart).
    listeners: Mutex<HashMap<SocketAddr, Listening>>,
    metrics_socket: Mutex<Option<(SocketAddr, RawFd)>>,
    /// Set once a new process took over: the control socket's path is now its own.
    handed_over: AtomicBool,
    /// The counters sent with the handover, and the connection to send what was
    /// counted after them once drained.
    handed_stats: Mutex<Option<StatsSnapshot>>,
    final_counts: Mutex<Option<tokio::net::unix::OwnedWriteHalf>>,
    /// The process this one took over from, until it has drained: tables are
    /// forwarded to it (`control_server::forward_to_predecessor`).
    predecessor: Mutex<Option<std::os::unix::net::UnixStream>>,
    graceful: Mutex<Option<GracefulShutdown>>,
    stop: Notify,
    stopping: AtomicBool,
    max_body: usize,
    request_timeout: Duration,
    settings: Settings,
    sessions: websocket::Sessions,
    outliers: table::Outliers,
    /// Set when the process stops: gRPC answers still streaming end with UNAVAILABLE
    /// (see `grpc::Counted`), which clients retry on the new process.
    ending: tokio::sync::watch::Sender<bool>,
}

/// A listening socket: one accept loop per data-plane thread, and the socket itself
/// (kept to hand over on hot restart).
type Listening = (Vec<JoinHandle<()>>, std::net::TcpListener);

/// Runs the proxy until it is told to stop (control socket, SIGTERM or SIGINT).
pub async fn run(config: Config) -> Result<(), ProxyError> {
    let n = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let cpus = affinity::plan(config.cpu_affinity, n.max(1))?;
    let (workers, stop_workers) = start_workers(&cpus).map_err(ProxyError::Workers)?;
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(Compiled::default()),
        apply_lock: tokio::sync::Mutex::new(()),
        metrics: Metrics::new(workers.len()),
        worker_conns: workers.iter().map(|_| AtomicUsize::new(0)).collect(),
        workers,
        listeners: Mutex::new(HashMap::new()),
        metrics_socket: Mutex::new(None),
        handed_over: AtomicBool::new(false),
        handed_stats: Mutex::new(None),
        final_counts: Mutex::new(None),
        predecessor: Mutex::new(None),
        graceful: Mutex::new(Some(GracefulShutdown::new())),
        stop: Notify::new(),
        stopping: AtomicBool::new(false),
        max_body: config.max_body_bytes,
        request_timeout: config.request_timeout,
        settings: Settings {
            workers: config.workers,
            cpu_affinity: config.cpu_affinity,
            max_body_bytes: config.max_body_bytes,
            request_timeout_secs: config.request_timeout.as_secs(),
            metrics_textfile: config.metrics_textfile.clone(),
        },
        sessions: websocket::Sessions::default(),
        outliers: table::Outliers::default(),
        ending: tokio::sync::watch::channel(false).0,
    });

    let inherited = if config.takeover {
        let path = config.control_socket.clone();
        let got = tokio::task::spawn_blocking(move || handover::take_over(&path))
            .await
            .map_err(|e| ProxyError::Takeover(std::io::Error::other(e)))?
            .map_err(ProxyError::Takeover)?;
        shared.metrics.seed(&got.stats);
        shared
            .metrics
            .carry_unrouted(&got.unrouted, std::time::Instant::now());
        Some(got)
    } else {
        None
    };
    let (table, listeners, metrics_listener, old) = match inherited {
        Some(h) => (Some(h.table), h.listeners, h.metrics, Some(h.old)),
        None => (None, Vec::new(), None, None),
    };
    if let Some(t) = table {
        let pool = listeners.into_iter().collect();
        apply_table_with(&shared, t, pool)
            .await
            .map_err(|e| ProxyError::Takeover(std::io::Error::other(e)))?;
    }
    let metrics_task = match (metrics_listener, config.metrics_listen) {
        (Some((addr, l)), _) => {
            let l =
                TcpListener::from_std(l).map_err(|source| ProxyError::Metrics { addr, source })?;
            *shared
                .metrics_socket
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((addr, l.as_raw_fd()));
            Some(tokio::spawn(serve_metrics(shared.clone(), l)))
        }
        (None, Some(addr)) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Metrics { addr, source })?;
            *shared
                .metrics_socket
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((addr, l.as_raw_fd()));
            Some(tokio::spawn(serve_metrics(shared.clone(), l)))
        }
        (None, None) => None,
    };
    // A new path for the control socket; an old process keeps its open connections.
    let _ = std::fs::remove_file(&config.control_socket);
    let control =
        UnixListener::bind(&config.control_socket).map_err(|source| ProxyError::ControlSocket {
            path: config.control_socket.clone(),
            source,
        })?;
    let control_task = tokio::spawn(serve_control(shared.clone(), control));
    let checks = tokio::spawn(active_checks(shared.clone()));
    if let Some(mut old) = old {
        // We accept on the inherited sockets: the old process may stop.
        handover::release(&mut old).map_err(ProxyError::Takeover)?;
        info!("took over from the previous proxy process");
        *shared.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = old.try_clone().ok();
        // What it finishes while draining comes back once it has drained.
        let (shared, wait) = (
            shared.clone(),
            config.drain_timeout + Duration::from_secs(10),
        );
        tokio::task::spawn_blocking(move || {
            if let Some(delta) = handover::final_counts(old, wait) {
                shared.metrics.add(&delta);
            }
            // Drained: nothing left to route there.
            *shared.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = None;
        });
    }
    info!(socket = %config.control_socket.display(), "proxy ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = shared.stop.notified() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shared.stopping.store(true, Ordering::SeqCst);
    info!("proxy stopping: no new connections, draining open ones");
    for (_, (hs, _)) in shared
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
    {
        hs.iter().for_each(JoinHandle::abort);
    }
    let graceful = shared
        .graceful
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(g) = graceful {
        // First softly: every answer now says `Connection: close`, so busy keep-alive
        // clients close their connection themselves after it, without racing a close
        // from our side. Then the rest (idle ones, HTTP/2 with GOAWAY).
        let soft = tokio::time::Instant::now() + Duration::from_secs(2);
        while g.count() > 0 && tokio::time::Instant::now() < soft {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A gRPC stream does not end because its connection got GOAWAY (a watch may
        // run for hours): the answers still streaming end now with UNAVAILABLE, and
        // their clients call again, on the new process. Calls still waiting for their
        // answer's head are not cut: they finish within the drain timeout.
        shared.ending.send_replace(true);
        if tokio::time::timeout(config.drain_timeout, g.shutdown())
            .await
            .is_err()
        {
            warn!("drain timeout passed with connections still open");
        }
    }
    close_tunnels(&shared.sessions).await;
    control_server::send_final_counts(&shared).await;
    control_task.abort();
    checks.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if !shared.handed_over.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(&config.control_socket);
    }
    drop(stop_workers);
    Ok(())
}

/// Upgraded connections (WebSockets) are not hyper's any more, so its graceful
/// shutdown does not see them, and stopping the data-plane threads would drop them
/// mid-stream. Once the HTTP connections have drained, each tunnel is closed with
/// 1001 ("going away") at a frame boundary, as when its instance leaves routing; one
/// stuck inside a frame that never ends is dropped after a grace period.
async fn close_tunnels(sessions: &websocket::Sessions) {
    if sessions.count() == 0 {
        return;
    }
    info!(
        tunnels = sessions.count(),
        "closing WebSocket tunnels with 1001"
    );
    let now = tokio::time::Instant::now();
    sessions.close_all(now);
    let deadline = now + TUNNEL_CLOSE_GRACE;
    while sessions.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if sessions.count() > 0 {
        warn!(
            tunnels = sessions.count(),
            "tunnels still inside a frame: dropped"
        );
    }
}

/// Starts a thread per entry of `cpus` (bound to that CPU when given), each running a
/// single-threaded runtime until the returned senders are dropped.
fn start_workers(
    cpus: &[Option<usize>],
) -> std::io::Result<(
    Vec<tokio::runtime::Handle>,
    Vec<tokio::sync::oneshot::Sender<()>>,
)> {
    let mut handles = Vec::new();
    let mut stops = Vec::new();
    let placements = fairness::placements(cpus.len());
    for (i, &cpu) in cpus.iter().enumerate() {
        let placements = placements.clone();
        // No signal driver: signals are the main runtime's business.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .on_thread_park(fairness::before_park)
            .on_thread_unpark(fairness::after_unpark)
            .build()?;
        handles.push(rt.handle().clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        std::thread::Builder::new()
            .name(format!("baton-proxy-{i}"))
            .spawn(move || {
                fairness::register(i, placements);
                metrics::use_shard(i);
                if let Some(cpu) = cpu {
                    match affinity::bind_current_thread(cpu) {
                        Ok(()) => info!(thread = i, cpu, "data-plane thread bound"),
                        Err(e) => warn!(thread = i, cpu, error = %e, "cannot bind the data-plane thread; it runs unbound"),
                    }
                }
                rt.block_on(async {
                    let _ = rx.await;
                });
            })?;
    }
    Ok((handles, stops))
}

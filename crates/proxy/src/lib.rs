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
mod fairness;
mod h1;
pub mod handover;
pub mod metrics;
mod pool;
pub mod table;
mod timer;
pub mod websocket;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

use metrics::Metrics;
use table::Compiled;

type ProxyBody = BoxBody<Bytes, h1::BoxError>;

/// At most this many instances are tried for one request.
const MAX_ATTEMPTS: usize = 4;
/// Request heads above this size are refused (HTTP/1.1: 431) instead of buffered.
const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub control_socket: PathBuf,
    /// Where to serve Prometheus `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// How long an instance may take to answer one attempt before it counts as failed.
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
    graceful: Mutex<Option<GracefulShutdown>>,
    stop: Notify,
    stopping: AtomicBool,
    max_body: usize,
    request_timeout: Duration,
    settings: Settings,
    sessions: websocket::Sessions,
    outliers: table::Outliers,
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
        metrics: Metrics::default(),
        worker_conns: workers.iter().map(|_| AtomicUsize::new(0)).collect(),
        workers,
        listeners: Mutex::new(HashMap::new()),
        metrics_socket: Mutex::new(None),
        handed_over: AtomicBool::new(false),
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
        },
        sessions: websocket::Sessions::default(),
        outliers: table::Outliers::default(),
    });

    let inherited = if config.takeover {
        let path = config.control_socket.clone();
        let got = tokio::task::spawn_blocking(move || handover::take_over(&path))
            .await
            .map_err(|e| ProxyError::Takeover(std::io::Error::other(e)))?
            .map_err(ProxyError::Takeover)?;
        shared.metrics.seed(&got.stats);
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
    if let Some(old) = old {
        // We accept on the inherited sockets: the old process may stop.
        handover::release(old).map_err(ProxyError::Takeover)?;
        info!("took over from the previous proxy process");
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
        if tokio::time::timeout(config.drain_timeout, g.shutdown())
            .await
            .is_err()
        {
            warn!("drain timeout passed with connections still open");
        }
    }
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

async fn serve_control(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(ControlRequest::Handover) => {
                        use std::os::fd::AsRawFd;
                        match hand_over(&shared, w.as_ref().as_raw_fd()) {
                            Ok(r) => r,
                            Err(e) => ControlResponse::Error {
                                error: format!("cannot hand over: {e}"),
                            },
                        }
                    }
                    Ok(ControlRequest::HandoverDone) => {
                        shared.handed_over.store(true, Ordering::SeqCst);
                        shared.stop.notify_one();
                        info!("a new proxy process took over: draining");
                        break;
                    }
                    Ok(req) => control_request(&shared, req).await,
                    Err(e) => ControlResponse::Error {
                        error: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_string(&resp)
                    .unwrap_or_else(|e| format!("{{\"reply\":\"error\",\"error\":\"{e}\"}}"));
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends our listening sockets to the process on the other end of `socket`, then
/// (the caller writes it) the table and counters that go with them.
fn hand_over(shared: &Shared, socket: RawFd) -> std::io::Result<ControlResponse> {
    let listeners: Vec<(SocketAddr, RawFd)> = shared
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(a, (_, l))| (*a, l.as_raw_fd()))
        .collect();
    let metrics = *shared
        .metrics_socket
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut fds: Vec<RawFd> = listeners.iter().map(|l| l.1).collect();
    fds.extend(metrics.map(|m| m.1));
    handover::send_fds(socket, &fds)?;
    Ok(ControlResponse::Handover {
        listeners: listeners.iter().map(|l| l.0).collect(),
        metrics: metrics.map(|m| m.0),
        table: shared.table.load().source.clone(),
        stats: shared.metrics.snapshot(),
    })
}

async fn control_request(shared: &Arc<Shared>, req: ControlRequest) -> ControlResponse {
    match req {
        ControlRequest::Ping => ControlResponse::Pong {
            pid: std::process::id(),
            version: shared.table.load().version,
            settings: Some(shared.settings),
        },
        ControlRequest::GetTable => ControlResponse::Table {
            table: shared.table.load().source.clone(),
        },
        ControlRequest::Stats => ControlResponse::Stats {
            stats: shared.metrics.snapshot(),
        },
        ControlRequest::SetTable { table } => {
            let version = table.version;
            match apply_table(shared, table).await {
                Ok(()) => ControlResponse::Ack { version },
                Err(error) => ControlResponse::Refused { version, error },
            }
        }
        ControlRequest::Shutdown => {
            shared.stop.notify_one();
            ControlResponse::ShuttingDown
        }
        ControlRequest::Handover | ControlRequest::HandoverDone => ControlResponse::Error {
            error: "handover is answered on its own connection".into(),
        },
    }
}

/// Binds any new listener first, then swaps the table in one atomic store: a request
/// sees either the old table or the new one, never a mix. Refused tables change nothing.
async fn apply_table(shared: &Arc<Shared>, table: RoutingTable) -> Result<(), String> {
    apply_table_with(shared, table, HashMap::new()).await
}

/// As [`apply_table`], taking listening sockets from `inherited` (hot restart) before
/// binding new ones.
async fn apply_table_with(
    shared: &Arc<Shared>,
    table: RoutingTable,
    mut inherited: HashMap<SocketAddr, std::net::TcpListener>,
) -> Result<(), String> {
    let _guard = shared.apply_lock.lock().await;
    let current = shared.table.load();
    if table.version < current.version {
        return Err(format!(
            "version {} is older than the table in force ({})",
            table.version, current.version
        ));
    }
    let compiled = Compiled::build(&table, &shared.metrics, &shared.outliers)?;
    let wanted: Vec<SocketAddr> = compiled.routes.keys().copied().collect();
    let missing: Vec<SocketAddr> = {
        let l = shared.listeners.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .iter()
            .filter(|a| !l.contains_key(a))
            .copied()
            .collect()
    };
    let mut bound = Vec::new();
    for addr in missing {
        let l = match inherited.remove(&addr) {
            Some(std_listener) => TcpListener::from_std(std_listener),
            None => TcpListener::bind(addr).await,
        };
        match l {
            Ok(l) => bound.push((addr, l)),
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
    shared.table.store(Arc::new(compiled));
    // Tunnels to instances that left routing start their drain clock.
    let drain: HashMap<String, Duration> = table
        .services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Duration::from_millis(s.drain_ms.unwrap_or(30_000)),
            )
        })
        .collect();
    shared
        .sessions
        .drain_unrouted(&table::routed(&table.services), |svc| {
            drain.get(svc).copied().unwrap_or(Duration::from_secs(30))
        });
    let mut listeners = shared.listeners.lock().unwrap_or_else(|p| p.into_inner());
    for (addr, l) in bound {
        info!(%addr, "listening");
        // Every data-plane thread accepts on the same socket.
        let std_listener = l.into_std().map_err(|e| format!("{addr}: {e}"))?;
        let mut loops = Vec::new();
        for (me, w) in shared.workers.iter().enumerate() {
            let mine = std_listener
                .try_clone()
                .map_err(|e| format!("{addr}: {e}"))?;
            let shared = shared.clone();
            loops.push(w.spawn(async move {
                match TcpListener::from_std(mine) {
                    Ok(l) => accept_loop(shared, addr, l, me).await,
                    Err(e) => warn!(%addr, error = %e, "cannot accept on this thread"),
                }
            }));
        }
        listeners.insert(addr, (loops, std_listener));
    }
    listeners.retain(|addr, (hs, _)| {
        let keep = wanted.contains(addr);
        if !keep {
            info!(%addr, "no longer routed: closing listener");
            hs.iter().for_each(JoinHandle::abort);
        }
        keep
    });
    Ok(())
}

/// Counts a client connection against its data-plane thread while it is open.
struct ConnSlot(Arc<Shared>, usize);

impl ConnSlot {
    /// The thread with the fewest open connections, `me` on a tie (no hand-off).
    fn least_busy(shared: &Arc<Shared>, me: usize) -> ConnSlot {
        let load = |i: usize| shared.worker_conns[i].load(Ordering::Relaxed);
        let mut best = me;
        for i in 0..shared.worker_conns.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        shared.worker_conns[best].fetch_add(1, Ordering::Relaxed);
        ConnSlot(shared.clone(), best)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.worker_conns[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(shared: Arc<Shared>, addr: SocketAddr, listener: TcpListener, me: usize) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let _ = stream.set_nodelay(true);
        let Some(watcher) = shared
            .graceful
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(GracefulShutdown::watcher)
        else {
            return;
        };
        let tls = shared
            .table
            .load()
            .routes
            .get(&addr)
            .and_then(|r| r.tls.clone());
        let s = shared.clone();
        let slot = ConnSlot::least_busy(&shared, me);
        let target = slot.1;
        let serve = async move |stream: tokio::net::TcpStream| {
            let _slot = slot;
            match tls {
                Some(acceptor) => {
                    // A handshake that stalls must not hold a task for ever.
                    let accepted =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    if let Ok(Ok(tls_stream)) = accepted {
                        serve_connection(s, addr, peer, watcher, TokioIo::new(tls_stream)).await;
                    }
                }
                None => serve_connection(s, addr, peer, watcher, TokioIo::new(stream)).await,
            }
        };
        if target == me {
            tokio::spawn(serve(stream));
            continue;
        }
        // To another thread: the socket leaves this runtime's poller for that one's.
        match stream.into_std() {
            Ok(std_stream) => {
                shared.workers[target].spawn(async move {
                    if let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) {
                        serve(stream).await;
                    }
                });
            }
            Err(e) => warn!(%addr, error = %e, "cannot hand a connection to another thread"),
        }
    }
}

/// HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or h2 by ALPN over TLS) on one
/// connection, watched for graceful shutdown.
async fn serve_connection<I>(
    shared: Arc<Shared>,
    addr: SocketAddr,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        shared,
        listen: addr,
        peer,
        peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
    });
    let svc = hyper::service::service_fn(move |req| handle(conn.clone(), req));
    let mut builder = AutoBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(timer::CoarseTimer)
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(MAX_HEADER_BYTES)
        .writev(false);
    builder
        .http2()
        .timer(timer::CoarseTimer)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let _ = watcher.watch(conn.into_owned()).await;
}

const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names is cheaper than seven
    // hashed removals.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if let Some(list) = h
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in list.split(',') {
            h.remove(name.trim());
        }
    }
    // Only those present (usually `Connection` alone).
    for name in &HOP_BY_HOP {
        if h.contains_key(name) {
            h.remove(name);
        }
    }
}

fn plain(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Safe to send twice: idempotent by method, or made so by the client's
/// `Idempotency-Key` (the backend answers a repeat with the first result, as the
/// IETF draft and payment APIs define it). Mirroring still uses the method alone: a
/// mirrored copy is not a retry and must never act.
fn retry_safe(parts: &hyper::http::request::Parts) -> bool {
    idempotent(&parts.method) || parts.headers.contains_key("idempotency-key")
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// What every request on one client connection shares. Cloned per request instead of
/// the process-wide state: its count lives on this connection's thread alone.
struct Conn {
    shared: Arc<Shared>,
    listen: SocketAddr,
    peer: SocketAddr,
    /// Formatted once per connection, not per request.
    peer_ip: Option<HeaderValue>,
}

async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let h2 = req.version() == hyper::Version::HTTP_2;
    let shared = &conn.shared;
    let mut resp = route_request(shared, conn.listen, conn.peer, conn.peer_ip.clone(), req).await?;
    if shared.stopping.load(Ordering::Relaxed) && !h2 {
        // Draining: the client closes this connection after this answer.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

async fn route_request(
    shared: &Arc<Shared>,
    listen: SocketAddr,
    peer: SocketAddr,
    peer_ip: Option<HeaderValue>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    fairness::maybe_yield(start);
    let route = shared.table.load().routes.get(&listen).cloned();
    let Some(route) = route else {
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no route for this listener",
        ));
    };
    if is_upgrade(req.headers()) {
        return Ok(upgrade(shared.clone(), route, req, peer).await);
    }
    let (mut parts, body) = req.into_parts();
    let Some(first) = route.pick(&parts.headers) else {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "no ready instance"));
    };
    let collected = if hyper::body::Body::is_end_stream(&body) {
        Ok(Bytes::new())
    } else {
        Limited::new(body, shared.max_body)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
    };
    let body = match collected {
        Ok(b) => b,
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let (code, msg) = if too_big {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {} bytes", shared.max_body),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                )
            };
            route.targets[first]
                .metrics
                .observe(code.as_u16(), start.elapsed().as_secs_f64());
            return Ok(plain(code, &msg));
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    let forwarded = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip())).ok(),
        None => peer_ip,
    };
    if let Some(v) = forwarded {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    // Instances get the origin form; an HTTP/2 client's authority becomes the Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }

    // The chosen revision's instances first, then the other revisions'.
    let mut order: Vec<usize> = vec![first];
    order.extend((0..route.targets.len()).filter(|i| {
        let t = &route.targets[*i];
        *i != first && t.weight > 0 && !t.backends.is_empty()
    }));
    route.earn_retry();
    let mut attempts = 0;
    let mut last_error = String::new();
    // Shielding: a canary's 5xx to an idempotent request is counted against the canary,
    // then the request goes to stable; kept in case stable cannot answer either.
    let mut shielded: Option<Response<ProxyBody>> = None;
    let stable = route
        .stable
        .filter(|s| !route.targets[*s].backends.is_empty());
    let shield_from = |ti: usize| {
        route.shield
            && Some(ti) == route.canary
            && retry_safe(&parts)
            && stable.is_some_and(|s| s != ti)
    };
    'targets: for ti in order {
        let target = &route.targets[ti];
        for (addr, health) in target.backends_from_next(&shared.outliers) {
            if attempts == MAX_ATTEMPTS {
                break 'targets;
            }
            attempts += 1;
            match forward(shared, &parts, &body, addr).await {
                Ok(resp) => {
                    target
                        .metrics
                        .observe(resp.status().as_u16(), start.elapsed().as_secs_f64());
                    shared.outcome(target, health, sick(resp.status()));
                    if let Some(c) = route.mirror(ti).filter(|_| idempotent(&parts.method)) {
                        mirror(shared, &route, c, &parts, &body);
                    }
                    if resp.status().is_server_error() && shield_from(ti) {
                        shielded = Some(resp);
                        break 'targets;
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    // A connection that failed before the request went out can always
                    // be retried; one that failed later only for idempotent methods;
                    // either only within the retry budget.
                    last_error = format!("{addr}: {e}");
                    shared.outcome(target, health, true);
                    if (e.is_connect() || retry_safe(&parts)) && route.spend_retry() {
                        target.metrics.retry();
                        continue;
                    }
                    break 'targets;
                }
            }
        }
    }
    if let (Some(canary_answer), Some(s)) = (shielded, stable) {
        let target = &route.targets[s];
        for (addr, _) in target.backends_from_next(&shared.outliers).take(2) {
            if let Ok(resp) = forward(shared, &parts, &body, addr).await {
                target
                    .metrics
                    .observe(resp.status().as_u16(), start.elapsed().as_secs_f64());
                route.targets[first].metrics.retry();
                return Ok(resp);
            }
        }
        return Ok(canary_answer);
    }
    let t = &route.targets[first];
    t.metrics.upstream_error();
    t.metrics.observe(502, start.elapsed().as_secs_f64());
    warn!(service = %route.service, revision = %t.name, error = %last_error, "no instance answered");
    Ok(plain(StatusCode::BAD_GATEWAY, "no instance could answer"))
}

/// Sends a copy of a request to the canary in the background; its answer only feeds
/// the canary's metrics.
fn mirror(
    shared: &Arc<Shared>,
    route: &Arc<table::Route>,
    canary: usize,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
) {
    let (shared, route, parts, body) = (shared.clone(), route.clone(), parts.clone(), body.clone());
    tokio::spawn(async move {
        let target = &route.targets[canary];
        let Some((addr, _)) = target.backends_from_next(&shared.outliers).next() else {
            return;
        };
        let start = Instant::now();
        let status = match forward(&shared, &parts, &body, addr).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                status
            }
            Err(_) => 502,
        };
        target
            .metrics
            .observe(status, start.elapsed().as_secs_f64());
        target.metrics.mirrored();
    });
}

/// Between the platform's probes, a TCP connect to every routed instance twice a
/// second: one that stopped listening (it crashed) leaves rotation at once instead of
/// after five failed requests, and an ejected one that answers comes back.
async fn active_checks(shared: Arc<Shared>) {
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

/// Answers that say the instance itself is unwell (as opposed to the request).
fn sick(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

impl Shared {
    fn outcome(&self, target: &table::Target, health: &table::BackendHealth, failed: bool) {
        if !failed {
            self.outliers.succeeded(health);
        } else if self.outliers.failed(health) {
            target.metrics.ejection();
            warn!(revision = %target.name, "instance ejected after consecutive failures");
        }
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1.1 upgrade (WebSocket): the request goes to one instance on a connection
/// of its own, and once it answers 101 the two sides are joined by a tunnel that
/// drains gracefully when the instance leaves routing.
async fn upgrade(
    shared: Arc<Shared>,
    route: Arc<table::Route>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let Some(first) = route.pick(req.headers()) else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "no ready instance");
    };
    let mut order: Vec<usize> = vec![first];
    order.extend((0..route.targets.len()).filter(|i| {
        let t = &route.targets[*i];
        *i != first && t.weight > 0 && !t.backends.is_empty()
    }));
    let mut headers = req.headers().clone();
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.append(X_FORWARDED_FOR, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    for ti in order {
        let target = &route.targets[ti];
        for (addr, _) in target.backends_from_next(&shared.outliers) {
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                target.metrics.retry();
                continue;
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                continue;
            };
            tokio::spawn(conn.with_upgrades());
            let mut out = Request::new(http_body_util::Empty::<Bytes>::new());
            *out.method_mut() = req.method().clone();
            *out.headers_mut() = headers.clone();
            if let Ok(uri) = path.parse() {
                *out.uri_mut() = uri;
            }
            let Ok(mut resp) = sender.send_request(out).await else {
                target.metrics.retry();
                continue;
            };
            target
                .metrics
                .observe(resp.status().as_u16(), start.elapsed().as_secs_f64());
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                return Response::from_parts(rp, rb.map_err(Into::into).boxed());
            }
            let server_side = hyper::upgrade::on(&mut resp);
            let client_side = hyper::upgrade::on(&mut req);
            let (s, service) = (shared.clone(), route.service.to_string());
            tokio::spawn(async move {
                if let (Ok(c), Ok(b)) = tokio::join!(client_side, server_side) {
                    websocket::tunnel(&s.sessions, &service, addr, c, b).await;
                }
            });
            let (rp, _) = resp.into_parts();
            return Response::from_parts(rp, empty());
        }
    }
    route.targets[first].metrics.upstream_error();
    plain(StatusCode::BAD_GATEWAY, "no instance could answer")
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Send(#[from] pool::SendError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl AttemptError {
    /// The request never left: it can go to another instance whatever its method.
    fn is_connect(&self) -> bool {
        matches!(self, AttemptError::Send(e) if e.is_connect())
    }
}

/// One attempt at one instance, with hop-by-hop headers stripped from the answer.
async fn forward(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    addr: SocketAddr,
) -> Result<Response<ProxyBody>, AttemptError> {
    // Instances get the origin form.
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let host_added;
    let headers = if parts.headers.contains_key(header::HOST) {
        &parts.headers
    } else {
        let mut h = parts.headers.clone();
        if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
            h.insert(header::HOST, v);
        }
        host_added = h;
        &host_added
    };
    let send = pool::send(addr, &parts.method, path, headers, body, retry_safe(parts));
    let resp = tokio::time::timeout(shared.request_timeout, send)
        .await
        .map_err(|_| AttemptError::Timeout(shared.request_timeout))??;
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    Ok(Response::from_parts(rp, rb.boxed()))
}

async fn serve_metrics(shared: Arc<Shared>, listener: TcpListener) {
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
                    let body =
                        s.metrics
                            .render(s.table.load().version, active, s.sessions.count() as u64);
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

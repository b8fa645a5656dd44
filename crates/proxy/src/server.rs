//! Accepting connections and serving them (HTTP/1.1 and HTTP/2) on the data-plane
//! threads.
#![warn(clippy::too_many_lines)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::warn;

use crate::pipeline::route_request;
use crate::{MAX_HEADER_BYTES, ProxyBody, Shared, timer};

/// Counts a client connection against its data-plane thread while it is open.
pub(crate) struct ConnSlot(Arc<Shared>, usize);

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

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    addr: SocketAddr,
    listener: TcpListener,
    me: usize,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Accepted as the process began to stop (a hot restart's old process, before its
        // accept loops end): served, its answer saying `Connection: close`, then no
        // more. Dropped here, the client saw its request's connection closed unanswered
        // (wrk counted a read error at about one proxy restart in ten in the soak).
        let last = shared.stopping.load(Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let watcher = shared
            .graceful
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(GracefulShutdown::watcher);
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
        if target == me || last {
            tokio::spawn(serve(stream));
            if last {
                return;
            }
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
pub(crate) async fn serve_connection<I>(
    shared: Arc<Shared>,
    addr: SocketAddr,
    peer: SocketAddr,
    watcher: Option<hyper_util::server::graceful::Watcher>,
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
    match watcher {
        Some(w) => {
            let _ = w.watch(conn.into_owned()).await;
        }
        // The drain has begun: nothing waits for this one, whose answer closes it.
        None => {
            let _ = conn.into_owned().await;
        }
    }
}

/// What every request on one client connection shares. Cloned per request instead of
/// the process-wide state: its count lives on this connection's thread alone.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    listen: SocketAddr,
    peer: SocketAddr,
    /// Formatted once per connection, not per request.
    peer_ip: Option<HeaderValue>,
}

pub(crate) async fn handle(
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

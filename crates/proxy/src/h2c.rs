//! HTTP/2 by prior knowledge (h2c) to instances that speak it, gRPC services above all
//! (`traffic.backendProtocol: h2c`): one connection per instance and data-plane
//! thread, its streams multiplexed, as the HTTP/1.1 pool keeps its connections per
//! thread. hyper's client does the protocol; this file only keeps the connections.
//!
//! An instance that leaves routing gets no new stream (the pipeline picks routed
//! instances only); the streams it still carries finish on their connection, which
//! stays open until the instance closes it (GOAWAY) or goes away.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An instance's connection, behind a lock held while it is being opened: requests
/// that arrive meanwhile wait for it instead of each opening their own.
type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>>;

thread_local! {
    static CONNS: RefCell<HashMap<SocketAddr, Slot>> = RefCell::new(HashMap::new());
}

#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Send(hyper::Error),
}

impl H2Error {
    /// The request never left: it can go to another instance whatever its method.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            H2Error::Connect(_) | H2Error::ConnectTimeout(_) | H2Error::Handshake(_)
        )
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, H2Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| H2Error::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(H2Error::Connect)?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(H2Error::Handshake)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn slot(addr: SocketAddr) -> Slot {
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(s) = c.get(&addr) {
            return s.clone();
        }
        // Instances whose connection closed go when a new one comes in.
        c.retain(|_, s| {
            s.try_lock()
                .map_or(true, |s| s.as_ref().is_some_and(|s| !s.is_closed()))
        });
        c.entry(addr).or_default().clone()
    })
}

/// The instance's open connection, or a new one (`fresh`: drop the one there).
async fn conn(addr: SocketAddr, fresh: bool) -> Result<(SendRequest<Full<Bytes>>, bool), H2Error> {
    let slot = slot(addr);
    let mut held = slot.lock().await;
    if !fresh && let Some(s) = held.as_ref().filter(|s| !s.is_closed()) {
        return Ok((s.clone(), true));
    }
    *held = None;
    let s = connect(addr).await?;
    *held = Some(s.clone());
    Ok((s, false))
}

/// Sends `make()`'s request on the instance's connection (a new one if it has none or
/// it closed). A stream the instance refused or a connection that closed under it is
/// sent once more on a new connection when the request never reached the instance
/// (hyper says so: canceled) or when `resend_ok` (safe to send twice).
pub async fn send(
    addr: SocketAddr,
    make: impl Fn() -> Request<Full<Bytes>>,
    resend_ok: bool,
) -> Result<Response<Incoming>, H2Error> {
    let (mut c, reused) = conn(addr, false).await?;
    let first = match c.ready().await {
        Ok(()) => c.send_request(make()).await,
        Err(e) => Err(e),
    };
    match first {
        Ok(resp) => Ok(resp),
        Err(e) if reused && (e.is_canceled() || e.is_closed() || resend_ok) => {
            let (mut c, _) = conn(addr, true).await?;
            c.ready().await.map_err(H2Error::Send)?;
            c.send_request(make()).await.map_err(H2Error::Send)
        }
        Err(e) => Err(H2Error::Send(e)),
    }
}

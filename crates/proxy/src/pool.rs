//! Keep-alive HTTP/1.1 connections to instances, one pool per data-plane thread.
//!
//! Only the owning thread touches its pool (a list per address), a connection goes
//! back as soon as its answer has been read (usually together with the head), and a
//! checkout takes the newest one — no lock, no task, no URI parsing per request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, Response};

use crate::h1::{self, Conn, H1Error, UpBody};

/// Connections kept per instance and thread; more are opened under load and closed
/// after their request.
const MAX_IDLE_PER_ADDR: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Every this many check-ins, closed connections are dropped from every list and
/// empty lists with them: instances that left routing are never checked out again.
const SWEEP_EVERY: u32 = 4096;

#[derive(Default)]
struct Pool {
    idle: HashMap<SocketAddr, Vec<Conn>>,
    checkins: u32,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("cannot send the request: {0}")]
    Write(std::io::Error),
    #[error("{0}")]
    Answer(H1Error),
}

impl SendError {
    /// The request never left: it can go to another instance whatever its method.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::ConnectTimeout(_))
    }
}

/// The newest idle connection that is still open; closed ones found on the way go.
fn checkout(addr: SocketAddr) -> Option<Conn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if conn.idle_and_open() {
                return Some(conn);
            }
        }
        None
    })
}

fn checkin(addr: SocketAddr, conn: Conn) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.checkins = pool.checkins.wrapping_add(1);
        if pool.checkins % SWEEP_EVERY == 0 {
            sweep(&mut pool);
        }
        let list = pool.idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(conn);
        }
    });
}

fn sweep(pool: &mut Pool) {
    pool.idle.retain(|_, list| {
        list.retain(Conn::idle_and_open);
        !list.is_empty()
    });
}

async fn connect(addr: SocketAddr) -> Result<Conn, SendError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(SendError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(Conn::new(stream))
}

/// Sends a request (origin-form `path`, hop-by-hop headers already removed) to an
/// instance over a pooled connection, or a new one. A pooled connection the instance
/// closed meanwhile costs nothing: the request goes out again on another one — always
/// when it could not be written, and when `resend_ok` (safe to send twice) also when
/// the connection closed before any answer came.
pub async fn send(
    addr: SocketAddr,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    resend_ok: bool,
) -> Result<Response<UpBody>, SendError> {
    loop {
        let (mut conn, reused) = match checkout(addr) {
            Some(c) => (c, true),
            None => (connect(addr).await?, false),
        };
        if let Err(e) = h1::write_request(&mut conn, method, path, headers, body).await {
            if reused {
                continue;
            }
            return Err(SendError::Write(e));
        }
        let head = match h1::read_head(&mut conn, method).await {
            Ok(head) => head,
            Err(H1Error::ClosedEarly) if reused && resend_ok => continue,
            Err(e) => return Err(SendError::Answer(e)),
        };
        let body = UpBody::new(&head, conn, addr, checkin);
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        return Ok(resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An instance that counts its connections and answers `ok` on each, the body only
    /// once `release` is true.
    async fn instance(
        release: tokio::sync::watch::Receiver<bool>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        h1::tests::counting_instance(move |s| {
            let release = release.clone();
            async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let mut release = release.clone();
                    let body = futures_util::stream::once(async move {
                        let _ = release.wait_for(|go| *go).await;
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                            Bytes::from_static(b"ok"),
                        ))
                    });
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(
                            http_body_util::StreamBody::new(body),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            }
        })
        .await
    }

    async fn get(addr: SocketAddr) -> Result<Response<UpBody>, SendError> {
        let mut headers = HeaderMap::new();
        headers.insert("host", hyper::header::HeaderValue::from_static("x"));
        send(addr, &Method::GET, "/", &headers, &Bytes::new(), true).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_is_reused_once_its_body_is_read_and_not_before() {
        use http_body_util::BodyExt;
        let (go, release) = tokio::sync::watch::channel(false);
        let (addr, conns) = instance(release).await;
        let first = get(addr).await.expect("first");
        // Its body is not in yet: the connection is busy, a second request needs another.
        let second = get(addr).await.expect("second");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        go.send(true).expect("release");
        for r in [first, second] {
            let body = r.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        for _ in 0..20 {
            let r = get(addr).await.expect("again");
            r.into_body().collect().await.expect("body");
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "sequential requests reuse the pooled connections"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_the_instance_closed_are_swept_with_their_address() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Answers one request, then closes the connection when told to.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.expect("read");
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .expect("write");
            let _ = closing.await;
        });
        let r = get(addr).await.expect("answer");
        r.into_body().collect().await.expect("body");
        let listed = || POOL.with(|p| p.borrow().idle.get(&addr).map_or(0, Vec::len));
        assert_eq!(listed(), 1, "kept for the next request");
        close.send(()).expect("close");
        let closed = || POOL.with(|p| p.borrow().idle[&addr].iter().all(|c| !c.idle_and_open()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !closed() {
            assert!(
                std::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        POOL.with(|p| sweep(&mut p.borrow_mut()));
        assert!(
            POOL.with(|p| !p.borrow().idle.contains_key(&addr)),
            "the address went with its last connection"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_instance_closed_unannounced_costs_no_request() {
        use http_body_util::BodyExt;
        // Answers one request per connection, then closes it without saying so.
        let (addr, conns) =
            h1::tests::instance(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
        for i in 0..5 {
            let r = get(addr)
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            let body = r.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 5, "one connection per answer");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_connection_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let err = get(free).await.expect_err("nothing listens");
        assert!(err.is_connect(), "{err}");
    }
}

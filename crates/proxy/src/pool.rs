//! Keep-alive HTTP/1.1 connections to instances, one pool per data-plane thread.
//!
//! hyper-util's pooled client keys its pool by a parsed absolute URI behind a lock and
//! spawns a task per request to put the connection back once the response body has
//! been read. Here only the owning thread touches its pool (a list per address), a
//! connection goes back as soon as the response head is in, and a checkout takes the
//! newest one that reports itself ready again (its previous body fully read) — no lock,
//! no task, no URI parsing per request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// Connections kept per instance and thread; more are opened under load and closed
/// after their request.
const MAX_IDLE_PER_ADDR: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Every this many check-ins, closed connections are dropped from every list and
/// empty lists with them: instances that left routing are never checked out again.
const SWEEP_EVERY: u32 = 4096;

#[derive(Default)]
struct Pool {
    idle: HashMap<SocketAddr, Vec<Sender>>,
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
    #[error("handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Http(hyper::Error),
}

impl SendError {
    /// The request never left: it can go to another instance whatever its method.
    pub fn is_connect(&self) -> bool {
        !matches!(self, SendError::Http(_))
    }
}

fn checkout(addr: SocketAddr) -> Option<Sender> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&addr)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            if list[i].is_closed() {
                list.swap_remove(i);
            } else if list[i].is_ready() {
                return Some(list.swap_remove(i));
            }
        }
        None
    })
}

fn checkin(addr: SocketAddr, sender: Sender) {
    if sender.is_closed() {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.checkins = pool.checkins.wrapping_add(1);
        if pool.checkins % SWEEP_EVERY == 0 {
            sweep(&mut pool);
        }
        let list = pool.idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(sender);
        }
    });
}

fn sweep(pool: &mut Pool) {
    pool.idle.retain(|_, list| {
        list.retain(|s| !s.is_closed());
        !list.is_empty()
    });
}

async fn connect(addr: SocketAddr) -> Result<Sender, SendError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(SendError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Handshake)?;
    // Ends when the instance closes the connection or the last sender is dropped.
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends a request (origin-form URI) to an instance over a pooled connection, or a
/// new one.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    while let Some(mut sender) = checkout(addr) {
        match sender.try_send_request(req).await {
            Ok(resp) => {
                checkin(addr, sender);
                return Ok(resp);
            }
            // The instance closed this connection before the request went out: it
            // goes out on another one.
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    let mut sender = connect(addr).await?;
    let resp = sender.send_request(req).await.map_err(SendError::Http)?;
    checkin(addr, sender);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An instance that counts its connections and answers `ok` on each, the body only
    /// once `release` is true.
    async fn instance(
        release: tokio::sync::watch::Receiver<bool>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                tokio::spawn(async move {
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
                });
            }
        });
        (addr, conns)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::builder()
            .uri("/")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_is_reused_once_its_body_is_read_and_not_before() {
        use http_body_util::BodyExt;
        let (go, release) = tokio::sync::watch::channel(false);
        let (addr, conns) = instance(release).await;
        let first = send(addr, get()).await.expect("first");
        // Its body is not in yet: the connection is busy, a second request needs another.
        let second = send(addr, get()).await.expect("second");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        go.send(true).expect("release");
        for r in [first, second] {
            let body = r.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        for _ in 0..20 {
            let r = send(addr, get()).await.expect("again");
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
        let r = send(addr, get()).await.expect("answer");
        r.into_body().collect().await.expect("body");
        let listed = || POOL.with(|p| p.borrow().idle.get(&addr).map_or(0, Vec::len));
        assert_eq!(listed(), 1, "kept for the next request");
        close.send(()).expect("close");
        let closed = || POOL.with(|p| p.borrow().idle[&addr].iter().all(|s| s.is_closed()));
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
    async fn a_refused_connection_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let err = send(free, get()).await.expect_err("nothing listens");
        assert!(err.is_connect(), "{err}");
    }
}

//! HTTP probes, run against one instance on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `GET path` on a fresh connection; any 2xx or 3xx within `timeout` is a success.
/// A fresh connection each time: a probe must see the listener as a new client would.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header("user-agent", "baton-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(resp.status().as_u16())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(code)) if (200..400).contains(&code) => Ok(code),
        Ok(Ok(code)) => Err(format!("HTTP {code}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// A TCP connect: the readiness check for instances that declare no readiness probe.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

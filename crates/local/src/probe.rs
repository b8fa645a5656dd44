//! HTTP probes, run against one instance on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a probe did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The instance's: refused, timed out, answered an error.
    Instance(String),
    /// Baton's own (no file descriptor, no memory, no local port left): it says
    /// nothing of the instance and must never count against it.
    Own(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Instance(e) => f.write_str(e),
            Failure::Own(e) => write!(f, "Baton's own failure: {e}"),
        }
    }
}

/// A connect error is ours when the kernel refused us a resource, not the instance.
fn connect_failure(e: std::io::Error) -> Failure {
    use nix::errno::Errno;
    let own = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOMEM,
        Errno::ENOBUFS,
        Errno::EADDRNOTAVAIL,
    ];
    match e.raw_os_error() {
        Some(code) if own.iter().any(|o| *o as i32 == code) => {
            Failure::Own(format!("connect: {e}"))
        }
        _ => Failure::Instance(format!("connect: {e}")),
    }
}

/// `GET path` on a fresh connection; any 2xx or 3xx within `timeout` is a success.
/// A fresh connection each time: a probe must see the listener as a new client would.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, Failure> {
    let fut = async {
        let stream = TcpStream::connect(addr).await.map_err(connect_failure)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Instance(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header("user-agent", "baton-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::Instance(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Instance(format!("request: {e}")))?;
        Ok(resp.status().as_u16())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(code)) if (200..400).contains(&code) => Ok(code),
        Ok(Ok(code)) => Err(Failure::Instance(format!("HTTP {code}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Failure::Instance(format!("no answer within {timeout:?}"))),
    }
}

/// A TCP connect: the readiness check for instances that declare no readiness probe.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(connect_failure(e)),
        Err(_) => Err(Failure::Instance(format!(
            "no connection within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of descriptors, the probe's failure is Baton's, whatever the instance does.
    #[test]
    fn running_out_of_descriptors_is_our_failure_not_the_instances() {
        for code in [nix::errno::Errno::EMFILE, nix::errno::Errno::ENFILE] {
            let e = std::io::Error::from_raw_os_error(code as i32);
            assert!(matches!(connect_failure(e), Failure::Own(_)));
        }
        let refused = std::io::Error::from_raw_os_error(nix::errno::Errno::ECONNREFUSED as i32);
        assert!(matches!(connect_failure(refused), Failure::Instance(_)));
    }
}

//! gRPC answers, counted by their `grpc-status` instead of their HTTP status (which is
//! 200 for failures too). The status arrives in the trailers, after the messages, or in
//! the head of a trailers-only answer. Each is counted under the HTTP status gRPC's own
//! mapping gives it (as gRPC-gateway maps them), so that every judge and the
//! Prometheus exposition read gRPC failures as they read HTTP ones: the statuses that
//! say the server failed — UNKNOWN (2), DEADLINE_EXCEEDED (4), UNIMPLEMENTED (12),
//! INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15) — become 5xx; the client's own
//! mistakes (INVALID_ARGUMENT, NOT_FOUND, …) 4xx; OK 200.
//!
//! An instance that goes away mid-answer (a reset stream, a dropped connection) is
//! not passed on as a broken stream: the answer ends with `grpc-status: 14`
//! (UNAVAILABLE), which gRPC clients retry, and counts as a 502. So does an answer
//! still streaming when the proxy stops (a hot restart), counted as it stood: the
//! instance did nothing wrong.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};

use crate::h1::BoxError;
use crate::metrics::RevisionMetrics;

/// Whether an answer is gRPC (its content type `application/grpc`, `+proto`, …).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The HTTP status a `grpc-status` is counted under.
pub(crate) fn http_status(grpc_status: &[u8]) -> u16 {
    let code: u32 = std::str::from_utf8(grpc_status)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2);
    match code {
        0 => 200,
        1 => 499,          // CANCELLED: the client went away
        3 | 9 | 11 => 400, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        5 => 404,          // NOT_FOUND
        6 | 10 => 409,     // ALREADY_EXISTS, ABORTED
        7 => 403,          // PERMISSION_DENIED
        8 => 429,          // RESOURCE_EXHAUSTED
        16 => 401,         // UNAUTHENTICATED
        4 => 504,          // DEADLINE_EXCEEDED
        12 => 501,         // UNIMPLEMENTED
        14 => 503,         // UNAVAILABLE
        _ => 500,          // UNKNOWN, INTERNAL, DATA_LOSS, and codes gRPC does not define
    }
}

/// A gRPC answer's body that counts the answer once its status is known: at its
/// trailers, at an end without any (500: gRPC requires a status), at a failure of the
/// instance (502, the answer ended with UNAVAILABLE), or — the client gone first — as
/// the head's HTTP status (the instance did nothing wrong).
pub(crate) struct Counted {
    inner: Incoming,
    metrics: Arc<RevisionMetrics>,
    seconds: f64,
    head_status: u16,
    counted: bool,
    ended: bool,
    /// Ready when the proxy stops.
    stopping: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl Counted {
    pub(crate) fn new(
        inner: Incoming,
        metrics: Arc<RevisionMetrics>,
        seconds: f64,
        head_status: u16,
        mut ending: tokio::sync::watch::Receiver<bool>,
    ) -> Counted {
        Counted {
            inner,
            metrics,
            seconds,
            head_status,
            counted: false,
            ended: false,
            stopping: Box::pin(async move {
                // A sender gone is a proxy gone: nothing left to wait for.
                let _ = ending.wait_for(|e| *e).await;
            }),
        }
    }

    /// The last frame: trailers with UNAVAILABLE and why.
    fn unavailable(&mut self, why: &'static str) -> Frame<Bytes> {
        self.ended = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        trailers.insert("grpc-message", HeaderValue::from_static(why));
        Frame::trailers(trailers)
    }

    fn count(&mut self, status: u16) {
        if !self.counted {
            self.counted = true;
            self.metrics.observe(status, self.seconds);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let status = self.head_status;
        self.count(status);
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                if self.stopping.as_mut().poll(cx).is_ready() {
                    let status = self.head_status;
                    self.count(status);
                    let last = self.unavailable("the proxy is restarting; call again");
                    return Poll::Ready(Some(Ok(last)));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = trailers
                        .get("grpc-status")
                        .map_or(500, |v| http_status(v.as_bytes()));
                    self.count(status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                self.count(500);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(_))) => {
                // The instance failed mid-answer: end the stream cleanly with a status
                // the client retries.
                self.count(502);
                let last = self.unavailable("the instance went away mid-answer");
                Poll::Ready(Some(Ok(last)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_failures_count_as_5xx_and_client_mistakes_do_not() {
        for (code, http) in [
            ("0", 200),
            ("2", 500),
            ("4", 504),
            ("12", 501),
            ("13", 500),
            ("14", 503),
            ("15", 500),
            ("3", 400),
            ("5", 404),
            ("1", 499),
            ("16", 401),
            ("99", 500),
            ("garbage", 500),
        ] {
            assert_eq!(http_status(code.as_bytes()), http, "grpc-status {code}");
        }
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }
}

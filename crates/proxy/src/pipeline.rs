//! The request pipeline: prepare the request, plan the instances to try, attempt each,
//! shield stable from a canary's failure, mirror, respond.
#![warn(clippy::too_many_lines)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::warn;

use crate::http::{X_FORWARDED_FOR, plain, strip_hop_by_hop};
use crate::upgrade::{is_upgrade, upgrade};
use crate::{MAX_ATTEMPTS, ProxyBody, Shared, fairness, pool, table};

/// Safe to send twice: idempotent by method, or made so by the client's
/// `Idempotency-Key` (the backend answers a repeat with the first result, as the
/// IETF draft and payment APIs define it). Mirroring has its own, narrower rule
/// (`Route::mirror`): a mirrored copy is not a retry and must never act.
pub(crate) fn retry_safe(parts: &hyper::http::request::Parts) -> bool {
    idempotent(&parts.method) || parts.headers.contains_key("idempotency-key")
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// One request: prepare it, plan the instances to try, attempt them, respond.
pub(crate) async fn route_request(
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
    let (mut parts, body) = req.into_parts();
    if let Err(why) = host_rules(&mut parts) {
        return Ok(plain(StatusCode::BAD_REQUEST, why));
    }
    if is_upgrade(&parts.headers) {
        let req = Request::from_parts(parts, body);
        return Ok(upgrade(shared.clone(), route, req, peer).await);
    }
    let Some(first) = route.pick(&parts.headers) else {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "no ready instance"));
    };
    let body = match read_body(shared, body).await {
        Ok(b) => b,
        Err((code, msg)) => {
            // The client's doing, before any instance saw the request: an answer to
            // count, never a latency sample of the revision.
            route.targets[first].metrics.count(code.as_u16());
            let mut resp = plain(code, &msg);
            if parts.version < hyper::Version::HTTP_2 {
                // What is left of the body is never read: the connection cannot carry
                // another request.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Ok(resp);
        }
    };
    prepare(&mut parts, peer, peer_ip);
    Ok(attempt(shared, &route, first, &parts, &body, Instant::now()).await)
}

/// The whole body, up to the limit, so that the request can be sent again. A declared
/// length over the limit is refused before a byte is read, and the body must arrive
/// within the request timeout: a stalled upload would otherwise hold its buffer (up to
/// the limit) for ever.
async fn read_body(shared: &Shared, body: Incoming) -> Result<Bytes, (StatusCode, String)> {
    if hyper::body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    // Exact when the client declared a length (`Content-Length`, in HTTP/1.1 and 2).
    let declared = hyper::body::Body::size_hint(&body).lower();
    if declared > shared.max_body as u64 {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {declared} bytes is over the limit of {} bytes",
                shared.max_body
            ),
        ));
    }
    let read = Limited::new(body, shared.max_body).collect();
    let Ok(collected) = tokio::time::timeout(shared.request_timeout, read).await else {
        return Err((
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                shared.request_timeout.as_secs_f64()
            ),
        ));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {} bytes", shared.max_body),
            ))
        }
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {e}"),
        )),
    }
}

/// The `Host` rules of RFC 9112 §3.2: at most one `Host`, and in HTTP/1.1 exactly one
/// (HTTP/1.0 may leave it out), with a value that is a host; any of these broken is a
/// 400. An absolute-form target's authority replaces `Host` (§3.2.2) — instances see
/// the host the client addressed, not a second one smuggled beside it — and so does an
/// HTTP/2 client's `:authority`, which arrives the same way.
fn host_rules(parts: &mut hyper::http::request::Parts) -> Result<(), &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    match host {
        None if parts.version == hyper::Version::HTTP_11 => {
            return Err("an HTTP/1.1 request needs a Host header");
        }
        Some(v) if !valid_host(v.as_bytes()) => return Err("the Host header is not a host"),
        _ => {}
    }
    if let Some(a) = parts.uri.authority() {
        // Without any user info: `Host` is `host[:port]`.
        let hostport = a.as_str().rsplit('@').next().unwrap_or_default();
        match HeaderValue::from_str(hostport) {
            Ok(v) => {
                parts.headers.insert(header::HOST, v);
            }
            Err(_) => return Err("the request target's authority is not a host"),
        }
    }
    Ok(())
}

#[cfg(fuzzing)]
pub(crate) fn host_rules_for_fuzzing(
    parts: &mut hyper::http::request::Parts,
) -> Result<(), &'static str> {
    host_rules(parts)
}

#[cfg(fuzzing)]
pub(crate) fn prepare_for_fuzzing(parts: &mut hyper::http::request::Parts) {
    prepare(parts, SocketAddr::from(([192, 0, 2, 1], 40000)), None);
}

/// `uri-host [ ":" port ]` (RFC 3986's reg-name, IP literal or address), or empty.
fn valid_host(v: &[u8]) -> bool {
    v.iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(b))
}

/// Hop-by-hop headers out, the client's address in `X-Forwarded-For`.
fn prepare(
    parts: &mut hyper::http::request::Parts,
    peer: SocketAddr,
    peer_ip: Option<HeaderValue>,
) {
    // `TE` is hop-by-hop, but `te: trailers` is what gRPC clients must send and gRPC
    // servers check: remembered for an HTTP/2 instance, to which it may go on.
    if parts.headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    }) {
        parts.extensions.insert(TeTrailers);
    }
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
}

/// Plans the instances (the chosen revision's first, then the other revisions'),
/// attempts them within the retry budget, shields stable's users from a canary's 5xx,
/// and answers 502 when none could. Latency is each answering instance's own time,
/// from its attempt to its answer's head: never the client's upload (the body is all
/// in before `dispatched`), which a slow client would otherwise charge to the version.
async fn attempt(
    shared: &Arc<Shared>,
    route: &Arc<table::Route>,
    first: usize,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    dispatched: Instant,
) -> Response<ProxyBody> {
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
            && retry_safe(parts)
            && stable.is_some_and(|s| s != ti)
    };
    'targets: for ti in order {
        let target = &route.targets[ti];
        for (addr, health) in target.backends_from_next(&shared.outliers) {
            if attempts == MAX_ATTEMPTS {
                break 'targets;
            }
            attempts += 1;
            let sent = Instant::now();
            match forward(shared, route.h2c, &target.metrics, parts, body, addr).await {
                Ok((resp, counted)) => {
                    if !counted {
                        target
                            .metrics
                            .observe(resp.status().as_u16(), sent.elapsed().as_secs_f64());
                    }
                    shared.outcome(target, health, sick(resp.status()));
                    if let Some(c) = route.mirror(ti, &parts.method) {
                        mirror(shared, route, c, parts, body);
                    }
                    if resp.status().is_server_error() && shield_from(ti) {
                        shielded = Some(resp);
                        break 'targets;
                    }
                    return resp;
                }
                Err(e) => {
                    // A connection that failed before the request went out can always
                    // be retried; one that failed later only for idempotent methods;
                    // either only within the retry budget, but for a refused connection.
                    last_error = format!("{addr}: {e}");
                    shared.outcome(target, health, true);
                    if e.is_refused()
                        || ((e.is_connect() || retry_safe(parts)) && route.spend_retry())
                    {
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
            let sent = Instant::now();
            if let Ok((resp, counted)) =
                forward(shared, route.h2c, &target.metrics, parts, body, addr).await
            {
                if !counted {
                    target
                        .metrics
                        .observe(resp.status().as_u16(), sent.elapsed().as_secs_f64());
                }
                route.targets[first].metrics.retry();
                return resp;
            }
        }
        return canary_answer;
    }
    let t = &route.targets[first];
    t.metrics.upstream_error();
    t.metrics.observe(502, dispatched.elapsed().as_secs_f64());
    warn!(service = %route.service, revision = %t.name, error = %last_error, "no instance answered");
    plain(StatusCode::BAD_GATEWAY, "no instance could answer")
}

/// Sends a copy of a request to the canary in the background; its answer only feeds
/// the canary's metrics.
pub(crate) fn mirror(
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
        let status = match forward(&shared, route.h2c, &target.metrics, &parts, &body, addr).await {
            Ok((resp, counted)) => {
                let status = resp.status().as_u16();
                // A gRPC answer counts itself once its trailers are read.
                let _ = resp.into_body().collect().await;
                (!counted).then_some(status)
            }
            Err(_) => Some(502),
        };
        if let Some(status) = status {
            target
                .metrics
                .observe(status, start.elapsed().as_secs_f64());
        }
        target.metrics.mirrored();
    });
}

/// Answers that say the instance itself is unwell (as opposed to the request).
pub(crate) fn sick(status: StatusCode) -> bool {
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

#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("{0}")]
    Send(#[from] pool::SendError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    H2(crate::h2c::H2Error),
}

impl AttemptError {
    /// The request never left: it can go to another instance whatever its method.
    fn is_connect(&self) -> bool {
        match self {
            AttemptError::Send(e) => e.is_connect(),
            AttemptError::H2(e) => e.is_connect(),
            AttemptError::Timeout(_) => false,
        }
    }

    /// Refused at once: nothing there (an instance that just died). Retrying costs no
    /// instance anything, so the retry budget does not apply (a burst of in-flight
    /// requests at a SIGKILLed instance spent it and got 502s while others could
    /// answer); the attempts per request still do.
    fn is_refused(&self) -> bool {
        let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
        match self {
            AttemptError::Send(pool::SendError::Connect(e)) => refused(e),
            AttemptError::H2(crate::h2c::H2Error::Connect(e)) => refused(e),
            _ => false,
        }
    }
}

/// The client sent `te: trailers` (see `prepare`).
#[derive(Clone, Copy)]
struct TeTrailers;

/// One attempt at one instance, with hop-by-hop headers stripped from the answer;
/// `true` beside it when the answer counts itself in `metrics` (gRPC over `h2c`: its
/// status comes in the trailers), otherwise the caller counts it.
pub(crate) async fn forward(
    shared: &Shared,
    h2c: bool,
    metrics: &Arc<crate::metrics::RevisionMetrics>,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    addr: SocketAddr,
) -> Result<(Response<ProxyBody>, bool), AttemptError> {
    if h2c {
        return forward_h2c(shared, metrics, parts, body, addr).await;
    }
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
    Ok((Response::from_parts(rp, rb.boxed()), false))
}

/// The same over HTTP/2 (`h2c`): the authority from the client's `Host` (or the
/// instance's address), `te: trailers` passed on, trailers passed back, and a gRPC
/// answer counted by its `grpc-status` (see `grpc`).
async fn forward_h2c(
    shared: &Shared,
    metrics: &Arc<crate::metrics::RevisionMetrics>,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    addr: SocketAddr,
) -> Result<(Response<ProxyBody>, bool), AttemptError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| addr.to_string(), str::to_string);
    let uri: hyper::Uri = format!("http://{authority}{path}")
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    let te = parts.extensions.get::<TeTrailers>().is_some();
    let make = || {
        let mut req = Request::new(http_body_util::Full::new(body.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri.clone();
        *req.version_mut() = hyper::Version::HTTP_2;
        let h = req.headers_mut();
        for (k, v) in &parts.headers {
            if k != header::HOST {
                h.append(k, v.clone());
            }
        }
        if te {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        req
    };
    let sent = Instant::now();
    let send = crate::h2c::send(addr, make, retry_safe(parts));
    let resp = tokio::time::timeout(shared.request_timeout, send)
        .await
        .map_err(|_| AttemptError::Timeout(shared.request_timeout))?
        .map_err(AttemptError::H2)?;
    let seconds = sent.elapsed().as_secs_f64();
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    if !crate::grpc::is_grpc(&rp.headers) {
        return Ok((
            Response::from_parts(rp, rb.map_err(Into::into).boxed()),
            false,
        ));
    }
    if let Some(status) = rp.headers.get("grpc-status") {
        // Trailers-only: the status is in the head.
        metrics.observe(crate::grpc::http_status(status.as_bytes()), seconds);
        return Ok((
            Response::from_parts(rp, rb.map_err(Into::into).boxed()),
            true,
        ));
    }
    let head = rp.status.as_u16();
    let counted = crate::grpc::Counted::new(
        rb,
        metrics.clone(),
        seconds,
        head,
        shared.ending.subscribe(),
    );
    Ok((Response::from_parts(rp, counted.boxed()), true))
}

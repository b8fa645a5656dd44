//! HTTP/1.1 upgrades (WebSocket): one instance, then a tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::http::{X_FORWARDED_FOR, empty, plain, strip_hop_by_hop};
use crate::{ProxyBody, Shared, table, websocket};

pub(crate) fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// An HTTP/1.1 upgrade (WebSocket): the request goes to one instance on a connection
/// of its own, and once it answers 101 the two sides are joined by a tunnel that
/// drains gracefully when the instance leaves routing.
pub(crate) async fn upgrade(
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

//! What every phase of serving writes: hop-by-hop header stripping, the forwarding
//! header, and the proxy's own short answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::ProxyBody;

pub(crate) const X_FORWARDED_FOR: header::HeaderName =
    header::HeaderName::from_static("x-forwarded-for");

pub(crate) const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
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

pub(crate) fn plain(status: StatusCode, msg: &str) -> Response<ProxyBody> {
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

pub(crate) fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

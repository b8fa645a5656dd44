//! The HTTP face of the store: Kubernetes API paths, verbs and content types.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::select::Selector;
use crate::store::{Key, Store, StoreError};
use crate::{admission, discovery};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A running fake API server on loopback.
pub struct FakeApi {
    pub addr: SocketAddr,
    pub store: Store,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    pub async fn start() -> std::io::Result<FakeApi> {
        FakeApi::start_on("127.0.0.1:0").await
    }

    /// Listens on `addr` (`host:port`, port 0 for any).
    pub async fn start_on(addr: &str) -> std::io::Result<FakeApi> {
        let store = Store::default();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let s = store.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(FakeApi { addr, store, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn reply(code: u16, v: &Value) -> Response<Body> {
    reply_bytes(code, v.to_string())
}

fn reply_bytes(code: u16, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn err(e: StoreError) -> Response<Body> {
    status(e.code(), e.reason(), &e.to_string())
}

/// A request's target: `(key without name, name, subresource)`.
struct Target {
    base: Key,
    name: Option<String>,
    sub: Option<String>,
    /// Listing across namespaces (`/apis/g/v/resource` for a namespaced resource).
    all_namespaces: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest): (Option<&str>, Vec<&str>) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail.to_vec()),
        _ => (None, rest.to_vec()),
    };
    let (resource, name, sub) = match rest.as_slice() {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        base: Key::new(&gv, resource, ns, ""),
        name,
        sub,
        all_namespaces: ns.is_none(),
    })
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

async fn handle(store: Store, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::GET
        && let Some(v) = discovery::answer(&store, req.uri().path())
    {
        return reply(200, &v);
    }
    let accept = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let table = discovery::wants_table(&accept);
    let Some(t) = parse_path(req.uri().path()) else {
        return status(
            404,
            "NotFound",
            &format!("no such path {}", req.uri().path()),
        );
    };
    let q = query(&req);
    if param(&q, "dryRun").is_some() {
        // Writing what was meant as a dry run would be worse than refusing it.
        return status(400, "BadRequest", "dryRun is not supported by the fake");
    }
    let method = req.method().clone();
    let user = req
        .headers()
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("system:admin")
        .to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    let parse_body = || {
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| Box::new(status(400, "BadRequest", &format!("body is not JSON: {e}"))))
    };
    let status_only = t.sub.as_deref() == Some("status");
    if t.sub.as_deref() == Some("scale")
        && let Some(name) = t.name.clone()
    {
        let key = Key { name, ..t.base };
        return scale(&store, &key, &method, &content_type, &body);
    }
    match (method, t.name.clone()) {
        (Method::GET, None) => {
            let labels = match Selector::parse(param(&q, "labelSelector").unwrap_or("")) {
                Ok(s) => s,
                Err(e) => return status(400, "BadRequest", &e),
            };
            let fields = match Selector::parse(param(&q, "fieldSelector").unwrap_or("")) {
                Ok(s) => s,
                Err(e) => return status(400, "BadRequest", &e),
            };
            let ns = if t.all_namespaces {
                None
            } else {
                t.base.namespace.clone()
            };
            if param(&q, "watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(store, t.base, ns, labels, fields, &q);
            }
            let (items, rv) = store.list_where(&t.base.gv, &t.base.resource, ns.as_deref(), |o| {
                labels.matches_labels(o) && fields.matches_fields(o)
            });
            if table {
                let v = discovery::table(
                    &store,
                    &t.base.gv,
                    &t.base.resource,
                    &items,
                    &rv.to_string(),
                );
                return reply(200, &v);
            }
            let kind = store
                .kind_of(&t.base.gv, &t.base.resource)
                .or_else(|| discovery::kind_of(&store, &t.base.gv, &t.base.resource))
                .unwrap_or_default();
            // Written out by hand: the items are shared, and `json!` would copy them.
            let head = json!({"kind": format!("{kind}List"), "apiVersion": t.base.gv, "metadata": {"resourceVersion": rv.to_string()}});
            let mut out = head.to_string();
            out.pop();
            out.push_str(",\"items\":[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&item.to_string());
            }
            out.push_str("]}");
            reply_bytes(200, out)
        }
        (Method::GET, Some(name)) => match store.get(&Key {
            name,
            ..t.base.clone()
        }) {
            Ok(v) if table && t.sub.is_none() => {
                let rv = v["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                reply(
                    200,
                    &discovery::table(&store, &t.base.gv, &t.base.resource, &[v], &rv),
                )
            }
            Ok(v) => reply(200, &v),
            Err(e) => err(e),
        },
        (Method::POST, None) => match parse_body() {
            Ok(mut v) => {
                manage(&mut v, &q, "Update", t.sub.as_deref());
                if admission::any(&store) {
                    let key = Key {
                        name: v["metadata"]["name"].as_str().unwrap_or("").to_string(),
                        ..t.base.clone()
                    };
                    match admission::mutate(&store, &key, None, "CREATE", &user, v, None).await {
                        Ok(m) => v = m,
                        Err((code, why)) => return status(code, reason_of(code), &why),
                    }
                }
                match store.create(&t.base, v) {
                    Ok(v) => reply(201, &v),
                    Err(e) => err(e),
                }
            }
            Err(r) => *r,
        },
        (Method::PUT, Some(name)) => match parse_body() {
            Ok(mut v) => {
                manage(&mut v, &q, "Update", t.sub.as_deref());
                let key = Key { name, ..t.base };
                if admission::any(&store) {
                    let old = store.get(&key).ok().map(|o| (*o).clone());
                    let sub = t.sub.as_deref();
                    match admission::mutate(&store, &key, sub, "UPDATE", &user, v, old).await {
                        Ok(m) => v = m,
                        Err((code, why)) => return status(code, reason_of(code), &why),
                    }
                }
                match store.replace(&key, v, status_only) {
                    Ok(v) => reply(200, &v),
                    Err(e) => err(e),
                }
            }
            Err(r) => *r,
        },
        (Method::PATCH, Some(name)) => {
            let patch = match parse_body() {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let key = Key {
                name: name.clone(),
                ..t.base.clone()
            };
            let apply = content_type.starts_with("application/apply-patch");
            let operation = if apply { "Apply" } else { "Update" };
            if apply && store.get(&key).is_err() {
                // Server-side apply creates what does not exist.
                let mut obj = patch;
                obj["metadata"]["name"] = json!(name);
                manage(&mut obj, &q, operation, t.sub.as_deref());
                return match store.create(&t.base, obj) {
                    Ok(v) => reply(201, &v),
                    Err(e) => err(e),
                };
            }
            let sub = t.sub.clone();
            if admission::any(&store) {
                // The patched object goes to the webhooks before it is written, at the
                // resourceVersion it was read at; a write in between means patching the
                // newer object again, as the API server retries a patch (one without a
                // resourceVersion of its own never gets a 409).
                let pinned = !patch["metadata"]["resourceVersion"].is_null();
                for _ in 0..10 {
                    let Ok(current) = store.get(&key) else {
                        return err(StoreError::NotFound(format!("{} {name}", t.base.resource)));
                    };
                    let mut obj = (*current).clone();
                    if let Err(e) = apply_patch(&mut obj, &content_type, &patch) {
                        return err(e);
                    }
                    manage(&mut obj, &q, operation, sub.as_deref());
                    let old = Some((*current).clone());
                    let sub = sub.as_deref();
                    let obj = match admission::mutate(&store, &key, sub, "UPDATE", &user, obj, old)
                        .await
                    {
                        Ok(m) => m,
                        Err((code, why)) => return status(code, reason_of(code), &why),
                    };
                    match store.replace(&key, obj, status_only) {
                        Ok(v) => return reply(200, &v),
                        Err(StoreError::Conflict(_)) if !pinned => {}
                        Err(e) => return err(e),
                    }
                }
                return status(
                    409,
                    "Conflict",
                    "the object kept changing while its webhooks ran",
                );
            }
            let result = store.modify(&key, status_only, |obj| {
                apply_patch(obj, &content_type, &patch)?;
                manage(obj, &q, operation, sub.as_deref());
                Ok(())
            });
            match result {
                Ok(v) => reply(200, &v),
                Err(e) => err(e),
            }
        }
        (Method::DELETE, Some(name)) => match store.delete(&Key { name, ..t.base }) {
            Ok(v) => reply(200, &v),
            Err(e) => err(e),
        },
        (m, _) => status(
            405,
            "MethodNotAllowed",
            &format!("{m} is not supported here"),
        ),
    }
}

fn reason_of(code: u16) -> &'static str {
    match code {
        403 => "Forbidden",
        _ => "InternalError",
    }
}

/// Records who wrote an object, as the API server's `metadata.managedFields` does: one
/// entry per field manager, operation and subresource, with the time. Which fields
/// each manager owns (`fieldsV1`) is not tracked: tests check who writes, not what.
fn manage(obj: &mut Value, q: &[(String, String)], operation: &str, sub: Option<&str>) {
    let Some(manager) = param(q, "fieldManager") else {
        return;
    };
    let api_version = obj["apiVersion"].clone();
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let entries = meta.entry("managedFields").or_insert_with(|| json!([]));
    if !entries.is_array() {
        *entries = json!([]);
    }
    let Some(list) = entries.as_array_mut() else {
        return;
    };
    let same = |e: &Value| {
        e["manager"] == manager && e["operation"] == operation && e["subresource"].as_str() == sub
    };
    list.retain(|e| !same(e));
    let mut entry = json!({
        "manager": manager, "operation": operation, "apiVersion": api_version,
        "time": crate::store::now_rfc3339(), "fieldsType": "FieldsV1",
    });
    if let Some(s) = sub {
        entry["subresource"] = json!(s);
    }
    list.push(entry);
}

/// A JSON patch, a strategic merge patch (`smp`), or for merge-patch and apply a JSON
/// merge patch.
fn apply_patch(target: &mut Value, content_type: &str, patch: &Value) -> Result<(), StoreError> {
    if content_type.starts_with("application/json-patch") {
        let p: json_patch::Patch = serde_json::from_value(patch.clone())
            .map_err(|e| StoreError::Invalid(format!("not a JSON patch: {e}")))?;
        json_patch::patch(target, &p).map_err(|e| StoreError::Invalid(e.to_string()))
    } else if content_type.starts_with("application/strategic-merge-patch") {
        crate::smp::apply(target, patch);
        Ok(())
    } else {
        json_patch::merge(target, patch);
        Ok(())
    }
}

/// The scale subresource (`autoscaling/v1` Scale), as an HPA uses it: replicas at
/// `.spec.replicas` and `.status.replicas`, the selector at `.status.selector`.
fn scale(
    store: &Store,
    key: &Key,
    method: &Method,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let view = |o: &Value| {
        json!({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"],
                         "resourceVersion": o["metadata"]["resourceVersion"]},
            "spec": {"replicas": o["spec"]["replicas"].as_i64().unwrap_or(1)},
            "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0),
                       "selector": o["status"]["selector"]},
        })
    };
    if *method == Method::GET {
        return match store.get(key) {
            Ok(o) => reply(200, &view(&o)),
            Err(e) => err(e),
        };
    }
    if !matches!(*method, Method::PUT | Method::PATCH) {
        return status(405, "MethodNotAllowed", &format!("{method} on a scale"));
    }
    let given: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", &format!("body is not JSON: {e}")),
    };
    let put = *method == Method::PUT;
    let result = store.modify(key, false, |o| {
        let mut s = view(o);
        if put {
            s = given.clone();
        } else {
            apply_patch(&mut s, content_type, &given)?;
        }
        let Some(n) = s["spec"]["replicas"].as_i64().filter(|n| *n >= 0) else {
            return Err(StoreError::Invalid(
                "spec.replicas: a whole number of at least 0 is required".into(),
            ));
        };
        o["spec"]["replicas"] = json!(n);
        // A resourceVersion in the Scale must be the object's current one.
        o["metadata"]["resourceVersion"] = s["metadata"]["resourceVersion"].clone();
        Ok(())
    });
    match result {
        Ok(o) => reply(200, &view(&o)),
        Err(e) => err(e),
    }
}

fn watch(
    store: Store,
    base: Key,
    ns: Option<String>,
    labels: Selector,
    fields: Selector,
    q: &[(String, String)],
) -> Response<Body> {
    let from: Option<u64> = param(q, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let bookmarks = param(q, "allowWatchBookmarks") == Some("true");
    let timeout = param(q, "timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    // Subscribe before reading history, so nothing falls between the two.
    let mut live = store.subscribe();
    let kind = store.kind_of(&base.gv, &base.resource).unwrap_or_default();
    tokio::spawn(async move {
        let wanted = |k: &Key, o: &Value| {
            k.gv == base.gv
                && k.resource == base.resource
                && (ns.is_none() || k.namespace == ns)
                && labels.matches_labels(o)
                && fields.matches_fields(o)
        };
        let line = |kind: &str, o: &Value| {
            Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":{o}}}\n"))
        };
        let mut last = match from {
            Some(rv) => {
                let Some(history) = store.since(rv) else {
                    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": format!("too old resource version: {rv}")});
                    let _ = tx.send(line("ERROR", &gone)).await;
                    return;
                };
                let mut last = rv;
                for c in history {
                    last = c.rv;
                    if wanted(&c.key, &c.object) && tx.send(line(c.kind, &c.object)).await.is_err()
                    {
                        return;
                    }
                }
                last
            }
            None => {
                let (items, rv) = store.list(&base.gv, &base.resource, ns.as_deref());
                for o in items
                    .iter()
                    .filter(|o| labels.matches_labels(o) && fields.matches_fields(o))
                {
                    if tx.send(line("ADDED", o)).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    // Only as far as this watch has read: changes still queued for it
                    // would be skipped by a client resuming from a later version.
                    let b = json!({"kind": kind, "apiVersion": base.gv, "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(line("BOOKMARK", &b)).await.is_err() {
                        return;
                    }
                }
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.rv <= last {
                            continue;
                        }
                        last = c.rv;
                        if wanted(&c.key, &c.object) && tx.send(line(c.kind, &c.object)).await.is_err() {
                            return;
                        }
                    }
                    // Fell behind the live feed: end the watch; the client resumes from `last`.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

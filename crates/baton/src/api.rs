//! The control API: HTTP on loopback, a bearer token from `.baton/token`.
//!
//! The server only parses and authenticates; every call is handed to the controller
//! loop, which owns all state, and answered when the loop has acted on it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::board::Board;
use crate::calls::{Body, full};
use crate::paths::Paths;
use std::sync::Arc;

pub use crate::calls::{ApiCall, ApiRequest, CommandKind, Identities, Reply, error};

/// At most this many connections to the API at once: the controller's file
/// descriptors are for its instances, probes and the proxy, and a flood of idle
/// connections must never starve them. Over the cap a connection is closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest spec `apply` takes.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// A client has this long to send its request head (and then its body): one that
/// connects and says nothing is cut off.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the API (and the dashboard under `/ui/`) until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    ids: Identities,
    tx: mpsc::Sender<ApiRequest>,
    board: Arc<Board>,
) {
    let ids = Arc::new(ids);
    let addr = listener.local_addr().ok();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (or memory): wait for some to free instead
                // of spinning on a listener that stays readable.
                eprintln!("warning: control API cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (ids, tx, board) = (ids.clone(), tx.clone(), board.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                handle(req, ids.clone(), tx.clone(), board.clone(), addr)
            });
            // One request per connection: an idle keep-alive connection would hold a
            // slot for nothing (every client here makes one call, or holds one stream).
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Reads a request body of at most `limit` bytes within [`READ_TIMEOUT`]; a declared
/// `Content-Length` over the limit is refused before a byte is read.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, String> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(format!("the body is over the {limit}-byte limit"));
    }
    match tokio::time::timeout(READ_TIMEOUT, Limited::new(req.into_body(), limit).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => Err(format!("unreadable or over the {limit}-byte limit: {e}")),
        Err(_) => Err(format!("the body did not arrive within {READ_TIMEOUT:?}")),
    }
}

/// Tells the controller of a refused request, for the audit trail. Never waits: a
/// flood of bad requests must not queue behind the controller (some are then not
/// recorded, and the controller says how many).
fn deny(tx: &mpsc::Sender<ApiRequest>, actor: &str, reason: String) {
    let (reply, _) = oneshot::channel();
    let _ = tx.try_send(ApiRequest {
        call: ApiCall::Denied(reason),
        actor: actor.to_string(),
        reply,
    });
}

fn respond((status, body): Reply) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    ids: Arc<Identities>,
    tx: mpsc::Sender<ApiRequest>,
    board: Arc<Board>,
    addr: Option<SocketAddr>,
) -> Result<Response<Body>, Infallible> {
    let p = req.uri().path();
    if p == "/" || p == "/ui" || p.starts_with("/ui/") {
        return Ok(crate::dashboard::handle(req, ids, board, tx).await);
    }
    let who = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| ids.who(t));
    let Some((who, role)) = who else {
        let what = format!("{} {}", req.method(), req.uri().path());
        deny(
            &tx,
            "anonymous",
            format!("refused {what}: missing or wrong token"),
        );
        return Ok(respond(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send 'Authorization: Bearer <token>' with the token from .baton/token",
        )));
    };
    // The user a client acts for is its own claim, recorded beside the proven identity.
    let on_behalf = req
        .headers()
        .get("x-baton-user")
        .and_then(|v| v.to_str().ok())
        .map(|u| {
            u.chars()
                .filter(|c| c.is_ascii_alphanumeric() || "._-@".contains(*c))
                .take(64)
                .collect::<String>()
        })
        .filter(|u| !u.is_empty());
    let actor = match on_behalf {
        Some(u) => format!("{who}/{u}"),
        None => who.to_string(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if method != Method::GET && !role.may_act() {
        deny(
            &tx,
            &actor,
            format!("refused {method} {path}: a viewer may not act"),
        );
        return Ok(respond(error(
            StatusCode::FORBIDDEN,
            format!("{who} is a viewer: it may read, not act"),
        )));
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method == Method::POST && segs.as_slice() == ["v1", "alerts"] {
        return Ok(respond(alerts(req, &tx, &actor).await));
    }
    let call = match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "rollouts"]) => ApiCall::List,
        (&Method::GET, ["v1", "rollouts", name]) => ApiCall::Get((*name).to_string()),
        (&Method::GET, ["v1", "rollouts", name, "history"]) => {
            ApiCall::History((*name).to_string())
        }
        (&Method::GET, ["v1", "rollouts", name, "diff"]) => {
            let num = |key: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.trim_start_matches('#').parse::<u64>().ok())
            };
            match (num("from"), num("to")) {
                (Some(from), Some(to)) => ApiCall::Diff {
                    name: (*name).to_string(),
                    from,
                    to,
                },
                _ => {
                    return Ok(respond(error(
                        StatusCode::BAD_REQUEST,
                        "diff needs ?from=N&to=M with revision numbers",
                    )));
                }
            }
        }
        (&Method::POST, ["v1", "rollouts", name, action]) => match CommandKind::parse(action) {
            Some(kind) => ApiCall::Command {
                name: (*name).to_string(),
                kind,
            },
            None => {
                return Ok(respond(error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no action {action:?}: use promote, promote-full, abort, retry or undo"
                    ),
                )));
            }
        },
        (&Method::POST, ["v1", "apply"]) => {
            let body = match read_body(req, MAX_SPEC_BYTES).await {
                Ok(b) => b,
                Err(e) => {
                    return Ok(respond(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("spec refused (at most 1 MiB): {e}"),
                    )));
                }
            };
            match String::from_utf8(body.to_vec()) {
                Ok(text) => ApiCall::Apply(text),
                Err(_) => {
                    return Ok(respond(error(
                        StatusCode::BAD_REQUEST,
                        "the spec is not UTF-8 text",
                    )));
                }
            }
        }
        (&Method::POST, ["v1", "login-link"]) => {
            let code = board.one_time_code(&who, role, crate::now_ms());
            return Ok(respond(match (code, addr) {
                (Some(code), Some(addr)) => (
                    StatusCode::OK,
                    json!({ "url": crate::dashboard::login_link(addr, &code), "expiresInSeconds": 600 }),
                ),
                _ => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot make a login link",
                ),
            }));
        }
        (&Method::POST, ["v1", "shutdown"]) => ApiCall::Shutdown {
            down: query.split('&').any(|kv| kv == "down=true"),
        },
        _ => {
            return Ok(respond(error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path}"),
            )));
        }
    };
    let (reply, rx) = oneshot::channel();
    if tx.send(ApiRequest { call, actor, reply }).await.is_err() {
        return Ok(respond(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        )));
    }
    let answer = match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(r)) => r,
        _ => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the controller did not answer in time",
        ),
    };
    Ok(respond(answer))
}

/// Alertmanager's webhook (`POST /v1/alerts`): every firing alert with a `rollout`
/// label aborts that rollout, recorded as `{token}/alert:{alertname}`. Answered 200 with
/// what each abort did — a rollout that is not found or not rolling out is listed, not
/// an error, since Alertmanager would send the same delivery again and again — and 400
/// for a body that is not a webhook payload.
async fn alerts(req: Request<Incoming>, tx: &mpsc::Sender<ApiRequest>, actor: &str) -> Reply {
    let body = match read_body(req, MAX_SPEC_BYTES).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("alerts: the body {e}")),
    };
    let batch = match baton_driver::alerts::parse(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut results = Vec::new();
    for a in &batch.aborts {
        let (reply, rx) = oneshot::channel();
        let request = ApiRequest {
            call: ApiCall::Command {
                name: a.rollout.clone(),
                kind: CommandKind::Abort,
            },
            actor: format!("{actor}/{}", a.actor()),
            reply,
        };
        if tx.send(request).await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the controller is stopping",
            );
        }
        let (status, answer) = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(r)) => r,
            _ => error(
                StatusCode::GATEWAY_TIMEOUT,
                "the controller did not answer in time",
            ),
        };
        results.push(json!({
            "rollout": a.rollout,
            "alert": a.alert,
            "aborted": status.is_success(),
            "answer": answer,
        }));
    }
    (
        StatusCode::OK,
        json!({
            "aborts": results,
            "resolved": batch.resolved,
            "withoutRolloutLabel": batch.unlabelled,
        }),
    )
}

/// The CLI's side of the API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub addr: SocketAddr,
    token: String,
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: String) -> Self {
        ApiClient { addr, token }
    }

    /// The API of the controller whose state lives in `paths`.
    pub fn from_paths(paths: &Paths) -> Result<Self> {
        let addr = std::fs::read_to_string(paths.api_addr()).with_context(|| {
            format!(
                "no controller has run in {} (missing {}): start one with `baton up -f SPEC`",
                paths.root.display(),
                paths.api_addr().display()
            )
        })?;
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("{} holds no address", paths.api_addr().display()))?;
        let token = match std::env::var("BATON_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t,
            _ => std::fs::read_to_string(paths.token()).with_context(|| {
                format!("cannot read the API token {}", paths.token().display())
            })?,
        };
        Ok(ApiClient::new(addr, token.trim().to_string()))
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Value)> {
        let stream = TcpStream::connect(self.addr).await.with_context(|| {
            format!(
                "cannot reach the controller's API at {}: is `baton up` running?",
                self.addr
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header("x-baton-user", local_user())
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender
            .send_request(req)
            .await
            .context("the controller closed the connection")?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow!("the controller answered HTTP {status} with no JSON ({e})"))?;
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<String>) -> Result<(u16, Value)> {
        self.call(Method::POST, path, body).await
    }
}

/// The local user name, to say on whose behalf the CLI acts.
pub fn local_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let uid = nix::unistd::getuid();
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .or_else(|| Some(format!("uid{uid}")))
        })
        .unwrap_or_else(|| "unknown".into())
}

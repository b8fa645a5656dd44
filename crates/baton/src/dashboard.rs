//! The web dashboard, served on the control API's address under `/ui/`.
//!
//! Safe by default: every page and every piece of data needs a session, made by
//! logging in with an API token (or a one-time link) and held in an HttpOnly,
//! SameSite=Strict cookie; actions also need a role that may act, the session's
//! CSRF token in `X-CSRF-Token`, and a same-origin `Origin` when the browser sends
//! one. Updates stream as server-sent events; the assets are compiled in.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::board::{Board, Session};
use crate::calls::{ApiCall, ApiRequest, Body, CommandKind, Identities, Reply, full};
use crate::now_ms;

const INDEX: &str = include_str!("../assets/index.html");
const LOGIN: &str = include_str!("../assets/login.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const COOKIE: &str = "baton_session";

fn with_headers(mut r: Response<Body>, content_type: &'static str) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn page(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    with_headers(r, content_type)
}

fn json_reply((status, body): Reply) -> Response<Body> {
    page(status, format!("{body}\n"), "application/json")
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Body> {
    let mut r = page(
        StatusCode::SEE_OTHER,
        String::new(),
        "text/plain; charset=utf-8",
    );
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn login_page(status: StatusCode, message: &str) -> Response<Body> {
    let note = if message.is_empty() {
        String::new()
    } else {
        format!(
            "<p class=\"error\" id=\"login-error\">{}</p>",
            escape(message)
        )
    };
    page(
        status,
        LOGIN.replace("<!--message-->", &note),
        "text/html; charset=utf-8",
    )
}

fn session_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200")
}

fn cookie_of(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            kv.trim()
                .strip_prefix(COOKIE)?
                .strip_prefix('=')
                .map(str::to_string)
        })
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn ask(tx: &mpsc::Sender<ApiRequest>, call: ApiCall, actor: String) -> Reply {
    let (reply, rx) = oneshot::channel();
    if tx.send(ApiRequest { call, actor, reply }).await.is_err() {
        return crate::calls::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        );
    }
    match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(r)) => r,
        _ => crate::calls::error(
            StatusCode::GATEWAY_TIMEOUT,
            "the controller did not answer in time",
        ),
    }
}

/// A browser's cross-site request carries a foreign `Origin`; refuse it for actions.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

pub async fn handle(
    req: Request<Incoming>,
    ids: Arc<Identities>,
    board: Arc<Board>,
    tx: mpsc::Sender<ApiRequest>,
) -> Response<Body> {
    let now = now_ms();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/") | (&Method::GET, "/ui") => return redirect("/ui/", None),
        (&Method::GET, "/ui/app.css") => {
            return page(StatusCode::OK, APP_CSS.into(), "text/css; charset=utf-8");
        }
        (&Method::GET, "/ui/app.js") => {
            return page(
                StatusCode::OK,
                APP_JS.into(),
                "text/javascript; charset=utf-8",
            );
        }
        (&Method::GET, "/ui/login") => {
            return match query_param(&req, "once") {
                None => login_page(StatusCode::OK, ""),
                Some(code) => match board
                    .redeem(&code, now)
                    .and_then(|(who, role)| board.new_session(&who, role, now))
                {
                    Some((id, _)) => redirect("/ui/", Some(session_cookie(&id))),
                    None => login_page(
                        StatusCode::UNAUTHORIZED,
                        "This login link was already used or has expired.",
                    ),
                },
            };
        }
        (&Method::POST, "/ui/login") => {
            let body = match crate::api::read_body(req, 4096).await {
                Ok(b) => b,
                Err(_) => {
                    return login_page(StatusCode::PAYLOAD_TOO_LARGE, "The form was too large.");
                }
            };
            let token = form_urlencoded::parse(&body)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            return match ids
                .who(&token)
                .and_then(|(who, role)| board.new_session(&who, role, now))
            {
                Some((id, _)) => redirect("/ui/", Some(session_cookie(&id))),
                None => login_page(StatusCode::UNAUTHORIZED, "That token is not valid here."),
            };
        }
        _ => {}
    }
    let session = cookie_of(&req).and_then(|id| board.session(&id, now).map(|s| (id, s)));
    let Some((sid, session)) = session else {
        if path.starts_with("/ui/api/") || path == "/ui/events" {
            return json_reply(crate::calls::error(
                StatusCode::UNAUTHORIZED,
                "log in first: /ui/login",
            ));
        }
        return redirect("/ui/login", None);
    };
    let actor = format!("{}/dashboard", session.who);
    let segs: Vec<&str> = path
        .trim_start_matches("/ui/")
        .trim_end_matches('/')
        .split('/')
        .collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, [""]) => page(StatusCode::OK, INDEX.into(), "text/html; charset=utf-8"),
        (&Method::GET, ["api", "session"]) => json_reply((
            StatusCode::OK,
            json!({"who": session.who, "role": session.role, "mayAct": session.role.may_act(), "csrf": session.csrf}),
        )),
        (&Method::GET, ["api", "rollouts"]) => json_reply(ask(&tx, ApiCall::List, actor).await),
        (&Method::GET, ["api", "rollouts", name]) => {
            json_reply(ask(&tx, ApiCall::Get((*name).into()), actor).await)
        }
        (&Method::GET, ["api", "rollouts", name, "history"]) => {
            json_reply(ask(&tx, ApiCall::History((*name).into()), actor).await)
        }
        (&Method::GET, ["api", "series"]) => {
            page(StatusCode::OK, board.history(), "application/json")
        }
        (&Method::GET, ["events"]) => events(board),
        (&Method::POST, ["logout"]) => {
            if !csrf_ok(&req, &session) {
                return json_reply(crate::calls::error(
                    StatusCode::FORBIDDEN,
                    "missing or wrong X-CSRF-Token",
                ));
            }
            board.end_session(&sid);
            redirect(
                "/ui/login",
                Some(format!(
                    "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
                )),
            )
        }
        (&Method::POST, ["api", "rollouts", name, action]) => {
            if !same_origin(&req) {
                return json_reply(crate::calls::error(
                    StatusCode::FORBIDDEN,
                    "cross-origin request refused",
                ));
            }
            if !csrf_ok(&req, &session) {
                return json_reply(crate::calls::error(
                    StatusCode::FORBIDDEN,
                    "missing or wrong X-CSRF-Token",
                ));
            }
            if !session.role.may_act() {
                return json_reply(crate::calls::error(
                    StatusCode::FORBIDDEN,
                    format!("{} is a viewer: it may watch, not act", session.who),
                ));
            }
            let Some(kind) = CommandKind::parse(action) else {
                return json_reply(crate::calls::error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no action {action:?}: use promote, promote-full, abort, retry, pause, resume or undo"
                    ),
                ));
            };
            json_reply(
                ask(
                    &tx,
                    ApiCall::Command {
                        name: (*name).into(),
                        kind,
                    },
                    actor,
                )
                .await,
            )
        }
        _ => json_reply(crate::calls::error(
            StatusCode::NOT_FOUND,
            format!("no such page: {method} {path}"),
        )),
    }
}

fn csrf_ok(req: &Request<Incoming>, s: &Session) -> bool {
    req.headers()
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| crate::calls::token_matches(t.as_bytes(), s.csrf.as_bytes()))
}

/// Server-sent events: `status` whenever a rollout changes (at most five times a
/// second), `points` once a second for the charts, `series` (all points kept) first.
fn events(board: Arc<Board>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut status = board.subscribe();
        let mut points = board.subscribe_points();
        let frame =
            |event: &str, data: &str| Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
        if tx.send(frame("series", &board.history())).await.is_err() {
            return;
        }
        let first = status.borrow_and_update().clone();
        if tx.send(frame("status", &first)).await.is_err() {
            return;
        }
        loop {
            let msg = tokio::select! {
                changed = status.changed() => match changed {
                    Ok(()) => frame("status", &status.borrow_and_update().clone()),
                    Err(_) => return,
                },
                p = points.recv() => match p {
                    Ok(p) => frame("points", &p),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
                _ = tx.closed() => return,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    r = with_headers(r, "text/event-stream");
    r
}

/// The dashboard's address and a one-time login link for it.
pub fn login_link(api: std::net::SocketAddr, code: &str) -> String {
    format!("http://{api}/ui/login?once={code}")
}

//! The notification service: a WebSocket feed of each user's events, read from the
//! store's outbox. Every event carries the user's sequence number; a client that
//! reconnects with `since=<last seq>` gets what it missed, once. On SIGTERM it turns
//! unready, tells every client to reconnect (close 1012, "service restart") and
//! waits for them to go, up to the drain timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{Claims, Tokens, bearer};
use crate::service::{ApiError, json};
use crate::store::Store;
use crate::ws;

/// How often the outbox is checked for new events.
const POLL: Duration = Duration::from_millis(20);
const BATCH: i64 = 500;

pub struct NotifyState {
    pub store: Store,
    pub tokens: Tokens,
    /// The store-wide id of the newest event; sessions wake when it moves.
    changes: watch::Sender<i64>,
    /// Set on SIGTERM: sessions close with 1012.
    shutdown: watch::Sender<bool>,
    sessions: AtomicUsize,
    gone: Notify,
    pub metrics: NotifyMetrics,
}

#[derive(Clone, Default)]
pub struct NotifyMetrics {
    pub sessions: Gauge,
    pub sent: Counter,
}

impl NotifyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "exchange_websocket_sessions",
            "Open WebSocket feeds",
            self.sessions.clone(),
        );
        registry.register(
            "exchange_events_sent",
            "Events sent to WebSocket clients",
            self.sent.clone(),
        );
    }
}

impl NotifyState {
    pub fn new(store: Store, tokens: Tokens, metrics: NotifyMetrics) -> Arc<NotifyState> {
        Arc::new(NotifyState {
            store,
            tokens,
            changes: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            sessions: AtomicUsize::new(0),
            gone: Notify::new(),
            metrics,
        })
    }

    /// Watches the outbox until the process ends.
    pub fn spawn_poller(self: &Arc<Self>) {
        let st = self.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match st.store.last_event_id().await {
                    Ok(id) => {
                        failures = 0;
                        st.changes.send_if_modified(|last| {
                            let moved = *last != id;
                            *last = id;
                            moved
                        });
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(100) {
                            tracing::warn!(error = %e, failures, "cannot read the outbox");
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        });
    }

    /// Tells every session to close with 1012 and waits until they are gone or
    /// `timeout` passes.
    pub async fn drain(&self, timeout: Duration) {
        self.shutdown.send_replace(true);
        let open = self.sessions.load(Ordering::SeqCst);
        tracing::info!(sessions = open, "telling WebSocket clients to reconnect");
        let all_gone = async {
            loop {
                let notified = self.gone.notified();
                if self.sessions.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeout, all_gone).await.is_err() {
            tracing::warn!(
                left = self.sessions.load(Ordering::SeqCst),
                "drain timeout: closing the rest"
            );
        }
    }
}

pub fn router(state: Arc<NotifyState>) -> Router {
    Router::new()
        .route("/ws", get(feed))
        .route("/events", get(events))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    since: Option<i64>,
    token: Option<String>,
    limit: Option<i64>,
}

fn query(raw: Option<&str>) -> Result<FeedQuery, ApiError> {
    let pairs = form_urlencoded::parse(raw.unwrap_or("").as_bytes());
    let mut q = FeedQuery {
        since: None,
        token: None,
        limit: None,
    };
    for (k, v) in pairs {
        let num = |field: &str| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::field(field.to_string(), "must be a non-negative integer"))
        };
        match k.as_ref() {
            "since" => q.since = Some(num("since")?),
            "limit" => q.limit = Some(num("limit")?),
            "token" => q.token = Some(v.into_owned()),
            other => {
                return Err(ApiError::field(
                    other.to_string(),
                    "unknown query parameter",
                ));
            }
        }
    }
    Ok(q)
}

/// Browsers cannot set headers on a WebSocket, so the token may also come as `?token=`.
fn claims(headers: &HeaderMap, q: &FeedQuery, tokens: &Tokens) -> Result<Claims, ApiError> {
    let header = bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let token = header
        .or(q.token.as_deref())
        .ok_or_else(|| ApiError::unauthorized("missing token: Authorization: Bearer or ?token="))?;
    tokens
        .verify(token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

async fn events(State(st): State<Arc<NotifyState>>, req: Request) -> Result<Response, ApiError> {
    let q = query(req.uri().query())?;
    let claims = claims(req.headers(), &q, &st.tokens)?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let events = st
        .store
        .events_since(claims.sub, q.since.unwrap_or(0), limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, events))
}

async fn feed(State(st): State<Arc<NotifyState>>, mut req: Request) -> Response {
    if *st.shutdown.borrow() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this instance is shutting down",
        )
        .into_response();
    }
    let q = match query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let claims = match claims(req.headers(), &q, &st.tokens) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (response, socket) = match ws::accept(&mut req) {
        Ok(pair) => pair,
        Err(e) => return e.into_response(),
    };
    let since = q.since.unwrap_or(0);
    st.sessions.fetch_add(1, Ordering::SeqCst);
    st.metrics.sessions.inc();
    tokio::spawn(async move {
        if let Some(socket) = socket.await {
            session(socket, &st, claims.sub, since).await;
        }
        st.metrics.sessions.dec();
        st.sessions.fetch_sub(1, Ordering::SeqCst);
        st.gone.notify_waiters();
    });
    response
}

async fn session(mut socket: ws::Socket, st: &NotifyState, user: i64, mut last: i64) {
    let mut changes = st.changes.subscribe();
    let mut shutdown = st.shutdown.subscribe();
    loop {
        // Catch up first: subscribing before reading means no change is missed.
        loop {
            let events = match st.store.events_since(user, last, BATCH).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, user, "cannot read events; closing the feed");
                    let _ = socket
                        .send(close(CloseCode::Error, "store unavailable"))
                        .await;
                    return;
                }
            };
            let n = events.len() as i64;
            for event in events {
                let text = match serde_json::to_string(&event) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode an event");
                        return;
                    }
                };
                if socket.send(Message::text(text)).await.is_err() {
                    return;
                }
                st.metrics.sent.inc();
                last = event.seq;
            }
            if n < BATCH {
                break;
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                let _ = socket.send(close(CloseCode::Restart, "service restart")).await;
                // Wait briefly for the client's close so the close handshake completes.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(msg)) = socket.next().await {
                        if msg.is_close() { break; }
                    }
                }).await;
                return;
            }
            msg = socket.next() => match msg {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => {
                    let _ = socket.close(None).await;
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

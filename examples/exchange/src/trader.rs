//! A trader client that loads the exchange the way real clients do (idempotency
//! keys, retries with backoff, a resumable WebSocket feed) and then checks the
//! books: every accepted order exists exactly once, every event and every fill was
//! delivered exactly once. Used by `exchange-trader`, by `baton demo` and by tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::model::{Order, Placed, Trade};

#[derive(Debug, Clone)]
pub struct TraderConfig {
    pub user_url: String,
    pub trade_url: String,
    pub notify_url: String,
    pub traders: usize,
    /// Orders per second, all traders together.
    pub rate: f64,
    pub duration: Duration,
    pub markets: Vec<String>,
    /// Makes usernames and idempotency keys unique per run.
    pub run_id: String,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub request_timeout: Duration,
    /// After the load stops, how long to wait for the feeds to deliver everything.
    pub settle_timeout: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

impl Default for TraderConfig {
    fn default() -> TraderConfig {
        TraderConfig {
            user_url: "http://127.0.0.1:7001".into(),
            trade_url: "http://127.0.0.1:7002".into(),
            notify_url: "http://127.0.0.1:7003".into(),
            traders: 8,
            rate: 50.0,
            duration: Duration::from_secs(10),
            markets: vec!["BTC-USD".into(), "ETH-USD".into()],
            run_id: format!("{:x}", crate::now_ms()),
            max_attempts: 10,
            request_timeout: Duration::from_secs(5),
            settle_timeout: Duration::from_secs(15),
            progress: false,
        }
    }
}

/// A request that did not succeed at its first try (or at all).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub at_ms: i64,
    pub op: &'static str,
    /// The status, or the transport error.
    pub what: String,
    /// The answering version (`X-App-Version`), when there was an answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub traders: usize,
    pub orders_sent: u64,
    pub orders_accepted: u64,
    /// Given up after every attempt failed, or refused with a 4xx.
    pub orders_given_up: u64,
    /// Accepted (we hold the order id) but not in the trade service's books.
    pub orders_lost: u64,
    /// Extra orders in the books for one idempotency key.
    pub duplicate_orders: u64,
    /// Given up on by the client but created by the server: not lost, not doubled.
    pub orders_unacknowledged: u64,
    pub fills_expected: u64,
    pub fills_delivered: u64,
    pub fills_missed: u64,
    pub notifications_expected: u64,
    pub notifications_received: u64,
    pub notifications_missed: u64,
    pub notifications_duplicated: u64,
    /// Requests that failed (each failed attempt counts, retried or not).
    pub failed_requests: u64,
    pub retries: u64,
    pub ws_reconnects: u64,
    /// Close codes the feeds received (1012: service restart; 1001: going away).
    pub ws_close_codes: BTreeMap<u16, u64>,
    /// Feeds that ended without a close frame.
    pub ws_abnormal: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The first failures, with their time (for checking when they happened).
    pub failures: Vec<Failure>,
    pub seconds: f64,
}

impl Tally {
    /// Nothing lost, nothing doubled.
    pub fn is_clean(&self) -> bool {
        self.orders_lost == 0
            && self.duplicate_orders == 0
            && self.fills_missed == 0
            && self.notifications_missed == 0
            && self.notifications_duplicated == 0
    }

    pub fn render(&self) -> String {
        let codes: Vec<String> = self
            .ws_close_codes
            .iter()
            .map(|(c, n)| format!("{c}×{n}"))
            .collect();
        format!(
            "traders                 {}\n\
             orders sent             {}\n\
             orders accepted         {}\n\
             orders lost             {}   (must be 0)\n\
             duplicate orders        {}   (must be 0)\n\
             orders given up         {}\n\
             fills delivered         {} of {}, missed {}   (must be 0)\n\
             notifications           {} of {}, missed {}, duplicated {}   (must be 0)\n\
             failed requests         {}   (retried {})\n\
             websocket reconnects    {}   (close codes: {}; abnormal {})\n\
             order latency           p50 {:.1} ms, p99 {:.1} ms\n",
            self.traders,
            self.orders_sent,
            self.orders_accepted,
            self.orders_lost,
            self.duplicate_orders,
            self.orders_given_up,
            self.fills_delivered,
            self.fills_expected,
            self.fills_missed,
            self.notifications_received,
            self.notifications_expected,
            self.notifications_missed,
            self.notifications_duplicated,
            self.failed_requests,
            self.retries,
            self.ws_reconnects,
            if codes.is_empty() {
                "none".to_string()
            } else {
                codes.join(", ")
            },
            self.ws_abnormal,
            self.latency_p50_ms,
            self.latency_p99_ms,
        )
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum TraderError {
    #[error("{op}: {what}")]
    Request { op: &'static str, what: String },
    #[error("bad answer to {op}: {what}")]
    Answer { op: &'static str, what: String },
}

/// Shared across trader tasks: counters and the failure log.
struct Shared {
    cfg: TraderConfig,
    http: HttpClient,
    stop: AtomicBool,
    sent: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    failures: Mutex<Vec<Failure>>,
    latencies: Mutex<Vec<f64>>,
}

impl Shared {
    async fn fail(&self, op: &'static str, what: String) {
        self.fail_from(op, what, None).await;
    }

    async fn fail_from(&self, op: &'static str, what: String, version: Option<String>) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().await;
        if f.len() < 1000 {
            f.push(Failure {
                at_ms: crate::now_ms(),
                op,
                what,
                version,
            });
        }
    }

    /// One request with retries: transport errors, timeouts, 429 and 5xx are retried
    /// with backoff; anything else is the answer.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        url: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), TraderError> {
        let mut backoff = Duration::from_millis(50);
        let mut last = String::new();
        for attempt in 1..=self.cfg.max_attempts {
            if attempt > 1 {
                self.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            let mut req = Request::builder().method(method.clone()).uri(url);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            if let Some(k) = idempotency_key {
                req = req.header("idempotency-key", k);
            }
            let payload = match body {
                Some(b) => {
                    req = req.header("content-type", "application/json");
                    Bytes::from(b.to_string())
                }
                None => Bytes::new(),
            };
            let req = req
                .body(Full::new(payload))
                .map_err(|e| TraderError::Request {
                    op,
                    what: e.to_string(),
                })?;
            let outcome = tokio::time::timeout(self.cfg.request_timeout, async {
                let resp = self.http.request(req).await.map_err(|e| format!("{e:?}"))?;
                let status = resp.status();
                let version = version_of(resp.headers());
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((status, bytes, version))
            })
            .await;
            match outcome {
                Ok(Ok((status, bytes, version)))
                    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    last = format!("{status}: {}", String::from_utf8_lossy(&bytes).trim());
                    self.fail_from(op, status.as_u16().to_string(), version)
                        .await;
                }
                Ok(Ok((status, bytes, _))) => return Ok((status, bytes)),
                Ok(Err(e)) => {
                    last = e.clone();
                    self.fail(op, e).await;
                }
                Err(_) => {
                    last = format!("no answer within {:?}", self.cfg.request_timeout);
                    self.fail(op, last.clone()).await;
                }
            }
        }
        Err(TraderError::Request {
            op,
            what: format!("gave up after {} attempts: {last}", self.cfg.max_attempts),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        url: &str,
        token: &str,
    ) -> Result<T, TraderError> {
        let (status, body) = self
            .call(op, Method::GET, url, Some(token), None, None)
            .await?;
        if status != StatusCode::OK {
            return Err(TraderError::Answer {
                op,
                what: format!("{status}: {}", String::from_utf8_lossy(&body)),
            });
        }
        serde_json::from_slice(&body).map_err(|e| TraderError::Answer {
            op,
            what: e.to_string(),
        })
    }
}

/// What one trader saw on its feed.
#[derive(Default)]
struct Feed {
    last_seq: i64,
    received: u64,
    duplicated: u64,
    gaps: BTreeSet<i64>,
    fills: HashMap<(i64, i64), u64>,
    reconnects: u64,
    close_codes: BTreeMap<u16, u64>,
    abnormal: u64,
}

struct Account {
    token: String,
    user_id: i64,
}

async fn account(sh: &Shared, name: &str) -> Result<Account, TraderError> {
    let creds = serde_json::json!({"username": name, "password": format!("pw-{name}-secret")});
    let (status, body) = sh
        .call(
            "register",
            Method::POST,
            &format!("{}/register", sh.cfg.user_url),
            None,
            None,
            Some(&creds),
        )
        .await?;
    // A retried registration that had in fact succeeded answers 409: that is fine.
    if status != StatusCode::CREATED && status != StatusCode::CONFLICT {
        return Err(TraderError::Answer {
            op: "register",
            what: format!("{status}: {}", String::from_utf8_lossy(&body)),
        });
    }
    let (status, body) = sh
        .call(
            "login",
            Method::POST,
            &format!("{}/login", sh.cfg.user_url),
            None,
            None,
            Some(&creds),
        )
        .await?;
    if status != StatusCode::OK {
        return Err(TraderError::Answer {
            op: "login",
            what: format!("{status}: {}", String::from_utf8_lossy(&body)),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| TraderError::Answer {
        op: "login",
        what: e.to_string(),
    })?;
    let token = v["token"].as_str().unwrap_or_default().to_string();
    let user_id = v["userId"].as_i64().unwrap_or_default();
    if token.is_empty() || user_id == 0 {
        return Err(TraderError::Answer {
            op: "login",
            what: format!("no token in {v}"),
        });
    }
    Ok(Account { token, user_id })
}

fn version_of(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get("x-app-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn ws_url(base: &str, since: i64) -> String {
    let base = base
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    format!("{base}/ws?since={since}")
}

/// Keeps a feed open (reconnecting from the last sequence seen) until `stop` and
/// `target` say it has everything.
async fn follow(
    sh: Arc<Shared>,
    token: String,
    feed: Arc<Mutex<Feed>>,
    target: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(20);
    let mut first = true;
    loop {
        if done.load(Ordering::SeqCst) {
            return;
        }
        let since = feed.lock().await.last_seq;
        if !first {
            feed.lock().await.reconnects += 1;
        }
        first = false;
        let Ok(mut req) = ws_url(&sh.cfg.notify_url, since).into_client_request() else {
            return;
        };
        if let Ok(v) = format!("Bearer {token}").parse() {
            req.headers_mut().insert("authorization", v);
        }
        let connected = tokio::time::timeout(
            sh.cfg.request_timeout,
            tokio_tungstenite::connect_async(req),
        )
        .await;
        let mut ws = match connected {
            Ok(Ok((ws, _))) => {
                backoff = Duration::from_millis(20);
                ws
            }
            Ok(Err(e)) => {
                let version = match &e {
                    tokio_tungstenite::tungstenite::Error::Http(resp) => version_of(resp.headers()),
                    _ => None,
                };
                sh.fail_from("feed connect", e.to_string(), version).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
            Err(_) => {
                sh.fail("feed connect", "timeout".into()).await;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
            let msg = match next {
                Err(_) => {
                    let f = feed.lock().await;
                    let target = target.load(Ordering::SeqCst) as i64;
                    if sh.stop.load(Ordering::SeqCst) && target > 0 && f.last_seq >= target {
                        drop(f);
                        done.store(true, Ordering::SeqCst);
                        let _ = ws.close(None).await;
                        return;
                    }
                    continue;
                }
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(text))) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    let seq = v["seq"].as_i64().unwrap_or(0);
                    let mut f = feed.lock().await;
                    if seq <= f.last_seq {
                        f.duplicated += 1;
                        continue;
                    }
                    for missing in f.last_seq + 1..seq {
                        f.gaps.insert(missing);
                    }
                    f.gaps.remove(&seq);
                    f.last_seq = seq;
                    f.received += 1;
                    if v["type"] == "fill" {
                        let key = (
                            v["tradeId"].as_i64().unwrap_or(0),
                            v["orderId"].as_i64().unwrap_or(0),
                        );
                        *f.fills.entry(key).or_default() += 1;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    *feed.lock().await.close_codes.entry(code).or_default() += 1;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    feed.lock().await.abnormal += 1;
                    break;
                }
            }
        }
    }
}

struct Outcome {
    accepted: Vec<(String, i64)>,
    given_up: Vec<String>,
}

async fn trade_loop(sh: Arc<Shared>, me: usize, token: String) -> Outcome {
    let per_trader = (sh.cfg.rate / sh.cfg.traders as f64).max(0.01);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_trader));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = fastrand::Rng::with_seed(me as u64 * 7919 + 17);
    let mut out = Outcome {
        accepted: Vec::new(),
        given_up: Vec::new(),
    };
    let url = format!("{}/orders", sh.cfg.trade_url);
    let mut n = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        n += 1;
        let key = format!("{}-{me}-{n}", sh.cfg.run_id);
        let market = &sh.cfg.markets[rng.usize(..sh.cfg.markets.len())];
        let side = if rng.bool() { "buy" } else { "sell" };
        let body = serde_json::json!({"market": market, "side": side, "price": 100 + rng.i64(-2..=2), "qty": rng.i64(1..=5)});
        sh.sent.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match sh
            .call(
                "place order",
                Method::POST,
                &url,
                Some(&token),
                Some(&key),
                Some(&body),
            )
            .await
        {
            Ok((status, bytes)) if status == StatusCode::CREATED || status == StatusCode::OK => {
                sh.latencies
                    .lock()
                    .await
                    .push(started.elapsed().as_secs_f64() * 1000.0);
                match serde_json::from_slice::<Placed>(&bytes) {
                    Ok(p) => {
                        sh.accepted.fetch_add(1, Ordering::Relaxed);
                        out.accepted.push((key, p.order.id));
                    }
                    Err(e) => {
                        sh.fail("place order", format!("unreadable answer: {e}"))
                            .await;
                        out.given_up.push(key);
                    }
                }
            }
            Ok((status, bytes)) => {
                sh.fail(
                    "place order",
                    format!("{status}: {}", String::from_utf8_lossy(&bytes)),
                )
                .await;
                out.given_up.push(key);
            }
            Err(_) => out.given_up.push(key),
        }
    }
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the load for `cfg.duration`, then checks the books and the feeds.
pub async fn run(cfg: TraderConfig) -> Result<Tally, TraderError> {
    let duration = cfg.duration;
    run_until(cfg, tokio::time::sleep(duration)).await
}

/// Runs the load until `stop` resolves, then checks the books and the feeds.
pub async fn run_until(
    cfg: TraderConfig,
    stop: impl Future<Output = ()>,
) -> Result<Tally, TraderError> {
    let started = Instant::now();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let sh = Arc::new(Shared {
        cfg: cfg.clone(),
        http,
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        latencies: Mutex::new(Vec::new()),
    });
    let mut accounts = Vec::new();
    for i in 0..cfg.traders {
        accounts.push(account(&sh, &format!("trader-{}-{i}", cfg.run_id)).await?);
    }
    let mut traders = Vec::new();
    for (i, acct) in accounts.iter().enumerate() {
        let feed = Arc::new(Mutex::new(Feed::default()));
        let target = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let follower = tokio::spawn(follow(
            sh.clone(),
            acct.token.clone(),
            feed.clone(),
            target.clone(),
            done.clone(),
        ));
        let trading = tokio::spawn(trade_loop(sh.clone(), i, acct.token.clone()));
        traders.push((feed, target, done, follower, trading));
    }
    let progress = cfg.progress.then(|| {
        let sh = sh.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "  trader {:>4.0}s  orders sent {:>6}  accepted {:>6}  failed requests {:>4}  retries {:>4}",
                    t0.elapsed().as_secs_f64(),
                    sh.sent.load(Ordering::Relaxed),
                    sh.accepted.load(Ordering::Relaxed),
                    sh.failed.load(Ordering::Relaxed),
                    sh.retries.load(Ordering::Relaxed),
                );
            }
        })
    });
    stop.await;
    sh.stop.store(true, Ordering::SeqCst);

    let mut tally = Tally {
        traders: cfg.traders,
        ..Tally::default()
    };
    for ((feed, target, done, follower, trading), acct) in traders.into_iter().zip(&accounts) {
        let outcome = trading.await.map_err(|e| TraderError::Request {
            op: "trader",
            what: e.to_string(),
        })?;
        // The books, as the trade service has them.
        let orders: Vec<Order> = sh
            .json(
                "list orders",
                &format!("{}/orders", cfg.trade_url),
                &acct.token,
            )
            .await?;
        let mut by_key: HashMap<&str, Vec<i64>> = HashMap::new();
        for o in &orders {
            if let Some(k) = &o.idempotency_key {
                by_key.entry(k.as_str()).or_default().push(o.id);
            }
        }
        for (key, id) in &outcome.accepted {
            match by_key.get(key.as_str()) {
                Some(ids) if ids.contains(id) => {}
                _ => tally.orders_lost += 1,
            }
        }
        tally.duplicate_orders += by_key.values().map(|ids| ids.len() as u64 - 1).sum::<u64>();
        tally.orders_unacknowledged += outcome
            .given_up
            .iter()
            .filter(|k| by_key.contains_key(k.as_str()))
            .count() as u64;
        tally.orders_given_up += outcome.given_up.len() as u64;
        // What the feed should have delivered.
        let events: Vec<serde_json::Value> = sh
            .json(
                "list events",
                &format!("{}/events?since=0&limit=10000", cfg.notify_url),
                &acct.token,
            )
            .await?;
        let last = events
            .iter()
            .filter_map(|e| e["seq"].as_i64())
            .max()
            .unwrap_or(0);
        target.store(last.max(0) as u64, Ordering::SeqCst);
        let trades: Vec<Trade> = sh
            .json(
                "list trades",
                &format!("{}/trades", cfg.trade_url),
                &acct.token,
            )
            .await?;
        let mut expected_fills = Vec::new();
        for t in &trades {
            if t.buyer_id == acct.user_id {
                expected_fills.push((t.id, t.buy_order_id));
            }
            if t.seller_id == acct.user_id {
                expected_fills.push((t.id, t.sell_order_id));
            }
        }
        let deadline = Instant::now() + cfg.settle_timeout;
        while !done.load(Ordering::SeqCst) && Instant::now() < deadline && last > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done.store(true, Ordering::SeqCst);
        let _ = follower.await;
        let f = feed.lock().await;
        // Matching may publish events after `last` was read (the book still fills
        // resting orders): what the feed delivered beyond it is expected too.
        tally.notifications_expected += last.max(f.last_seq) as u64;
        tally.notifications_received += f.received;
        tally.notifications_missed += f.gaps.len() as u64 + (last - f.last_seq).max(0) as u64;
        tally.notifications_duplicated += f.duplicated;
        tally.fills_expected += expected_fills.len() as u64;
        for key in &expected_fills {
            match f.fills.get(key) {
                Some(1) => tally.fills_delivered += 1,
                Some(n) => {
                    tally.fills_delivered += 1;
                    tally.notifications_duplicated += n - 1;
                }
                None => tally.fills_missed += 1,
            }
        }
        tally.ws_reconnects += f.reconnects;
        for (code, n) in &f.close_codes {
            *tally.ws_close_codes.entry(*code).or_default() += n;
        }
        tally.ws_abnormal += f.abnormal;
    }
    if let Some(p) = progress {
        p.abort();
    }
    tally.orders_sent = sh.sent.load(Ordering::Relaxed);
    tally.orders_accepted = sh.accepted.load(Ordering::Relaxed);
    tally.failed_requests = sh.failed.load(Ordering::Relaxed);
    tally.retries = sh.retries.load(Ordering::Relaxed);
    tally.failures = sh.failures.lock().await.clone();
    let mut lat = sh.latencies.lock().await.clone();
    lat.sort_by(f64::total_cmp);
    tally.latency_p50_ms = percentile(&lat, 0.5);
    tally.latency_p99_ms = percentile(&lat, 0.99);
    tally.seconds = started.elapsed().as_secs_f64();
    Ok(tally)
}

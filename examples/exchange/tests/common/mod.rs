//! Test support: the three services in-process on loopback, over a SQLite file or a
//! PostgreSQL server started from the system's packages.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exchange::auth::Tokens;
use exchange::service::{Common, CommonArgs};
use exchange::services::notification::{NotifyMetrics, NotifyState};
use exchange::services::trade::{TradeMetrics, TradeState};
use exchange::services::user::UserState;
use exchange::store::Store;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

pub fn args(url: &str) -> CommonArgs {
    CommonArgs {
        port: 0,
        bind: "127.0.0.1".parse().expect("ip"),
        database_url: url.to_string(),
        jwt_secret: SECRET.to_string(),
        app_version: "test".to_string(),
        startup_delay_ms: 0,
        fault_latency_ms: 0,
        fault_error_rate: 0.0,
        fault_crash_after: 0,
    }
}

async fn spawn(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

pub struct Services {
    pub user: String,
    pub trade: String,
    pub notify: String,
    pub notify_state: Arc<NotifyState>,
    pub store: Store,
}

/// Starts user, trade and notification over `url`, each with its own store handle
/// (its own connections), as separate processes would have.
pub async fn start(url: &str) -> Services {
    let a = args(url);
    let tokens = || Tokens::new(SECRET.as_bytes(), 600).expect("tokens");
    let store = || async { Store::open(url).await.expect("open store") };

    let common = Common::new("user", &a, |_| {});
    common.set_ready();
    let user = spawn(
        common.router(exchange::services::user::router(Arc::new(UserState {
            store: store().await,
            tokens: tokens(),
        }))),
    )
    .await;

    let metrics = TradeMetrics::default();
    let common = Common::new("trade", &a, |r| metrics.register(r));
    common.set_ready();
    let trade = spawn(
        common.router(exchange::services::trade::router(Arc::new(TradeState {
            store: store().await,
            tokens: tokens(),
            markets: vec!["BTC-USD".into(), "ETH-USD".into()],
            metrics,
        }))),
    )
    .await;

    let metrics = NotifyMetrics::default();
    let common = Common::new("notification", &a, |r| metrics.register(r));
    common.set_ready();
    let notify_state = NotifyState::new(store().await, tokens(), metrics);
    notify_state.spawn_poller();
    let notify = spawn(common.router(exchange::services::notification::router(
        notify_state.clone(),
    )))
    .await;
    Services {
        user,
        trade,
        notify,
        notify_state,
        store: store().await,
    }
}

/// A PostgreSQL server on a free loopback port in a temporary directory, stopped on drop.
pub struct Postgres {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    match versions.last() {
        Some(bin) => bin.join(name),
        None => panic!(
            "PostgreSQL is not installed (apt-get install postgresql); scripts/test installs it"
        ),
    }
}

/// PostgreSQL refuses to run as root: run it as the packages' `postgres` user then.
fn postgres_uid() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn as_postgres(cmd: &mut Command, ids: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
}

fn chown_all(path: &Path, ids: Option<(u32, u32)>) {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let ids = postgres_uid();
        let dir = tempfile::Builder::new()
            .prefix("exchange-pg")
            .tempdir()
            .expect("tempdir");
        chown_all(dir.path(), ids);
        let data = dir.path().join("data");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args(["-U", "exchange", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_postgres(&mut initdb, ids);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let mut server = Command::new(pg_bin("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_postgres(&mut server, ids);
        let child = server.spawn().expect("start postgres");
        let pg = Postgres {
            child,
            url: format!("postgres://exchange@127.0.0.1:{port}/postgres"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pg
    }

    /// A fresh database, so tests sharing a server do not see each other's rows.
    pub async fn database(&self, name: &str) -> String {
        let (client, conn) = tokio_postgres_connect(&self.url).await;
        let handle = tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
            {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create database: {e}"),
            }
        }
        drop(client);
        let _ = handle.await;
        self.url.replace("/postgres", &format!("/{name}"))
    }
}

async fn tokio_postgres_connect(
    url: &str,
) -> (
    tokio_postgres::Client,
    impl Future<Output = Result<(), tokio_postgres::Error>> + use<>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok(pair) => return pair,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect to PostgreSQL: {e}"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub headers: hyper::HeaderMap,
}

/// One HTTP request; `body` is sent as JSON.
pub async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<serde_json::Value>,
) -> Answer {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut req = hyper::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(payload)))
        .expect("request");
    let resp = client.request(req).await.expect("send");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        body,
        headers,
    }
}

/// Registers and logs in; returns (token, user id).
pub async fn account(s: &Services, name: &str) -> (String, i64) {
    let creds = serde_json::json!({"username": name, "password": "a long enough password"});
    let r = call(
        "POST",
        &format!("{}/register", s.user),
        None,
        None,
        Some(creds.clone()),
    )
    .await;
    assert_eq!(r.status, 201, "register {name}: {}", r.body);
    let r = call(
        "POST",
        &format!("{}/login", s.user),
        None,
        None,
        Some(creds),
    )
    .await;
    assert_eq!(r.status, 200, "login {name}: {}", r.body);
    (
        r.body["token"].as_str().expect("token").to_string(),
        r.body["userId"].as_i64().expect("userId"),
    )
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn feed(s: &Services, token: &str, since: i64) -> Ws {
    let url = format!(
        "{}/ws?since={since}&token={token}",
        s.notify.replacen("http://", "ws://", 1)
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect feed")
        .0
}

/// Reads events until `n` arrived, or fails at the deadline.
pub async fn next_events(ws: &mut Ws, n: usize) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events within 10 s: {out:?}", out.len()));
        match msg {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                out.push(serde_json::from_str(&t).expect("event json"))
            }
            Some(Ok(_)) => {}
            other => panic!("feed ended: {other:?}"),
        }
    }
    out
}

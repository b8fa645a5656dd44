//! A small HTTP load generator: keep-alive clients at a fixed total rate, counting every
//! answer by the `X-Version` the instance put on it. Used by `baton demo` and the
//! end-to-end tests, so both judge "zero failed requests" the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::now_ms;

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionCounts {
    pub ok: u64,
    pub failed: u64,
    pub first_failure_ms: Option<u64>,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub at_ms: u64,
    /// The `X-Version` of the answer, or "-" when there was no answer.
    pub version: String,
    pub status: Option<u16>,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub by_version: BTreeMap<String, VersionCounts>,
    /// The first failures, for the record (at most 1000 kept).
    pub failures: Vec<Failure>,
    /// Answers from a revision the client had already moved away from: a sticky
    /// client must never go back.
    pub flip_flops: u64,
    /// Clients whose answers came from more than one revision.
    pub clients_moved: u64,
}

impl LoadReport {
    /// Failures whose answer did not come from `version`: the ones a rollout must never cause.
    pub fn failures_not_from(&self, version: &str) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| f.version != version)
            .collect()
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `concurrency` clients sending `GET /` to `addr`, `rate` requests a second in all.
    pub fn start(addr: SocketAddr, concurrency: usize, rate: u32) -> Load {
        Load::start_clients(addr, concurrency, rate, 1)
    }

    /// As [`Load::start`], each worker speaking for `clients` distinct `X-Client-Id`s
    /// in turn, so stickiness can be watched per client.
    pub fn start_clients(addr: SocketAddr, concurrency: usize, rate: u32, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let per_worker = Duration::from_secs_f64(concurrency as f64 / f64::from(rate.max(1)));
        let tasks = (0..concurrency)
            .map(|n| {
                let (stop, report, client) = (stop.clone(), report.clone(), client.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(per_worker);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let uri: hyper::Uri = match format!("http://{addr}/").parse() {
                        Ok(u) => u,
                        Err(_) => return,
                    };
                    // Per client: the revision it was last answered by, and those it left.
                    let mut seen: Vec<(String, Vec<String>)> =
                        vec![(String::new(), Vec::new()); clients.max(1)];
                    let mut k = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let who = k % seen.len();
                        k += 1;
                        let req = Request::get(uri.clone())
                            .header("x-client-id", format!("load-{n}-{who}"))
                            .body(Empty::new());
                        let Ok(req) = req else { return };
                        let result = tokio::time::timeout(Duration::from_secs(10), async {
                            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                            let status = resp.status().as_u16();
                            let version = resp
                                .headers()
                                .get("x-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_string();
                            resp.into_body()
                                .collect()
                                .await
                                .map_err(|e| e.to_string())?;
                            Ok::<_, String>((status, version))
                        })
                        .await
                        .unwrap_or_else(|_| Err("timed out after 10 s".into()));
                        let now = now_ms();
                        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                        r.sent += 1;
                        let (ok, version, status, error) = match result {
                            Ok((s, v)) if (200..400).contains(&s) => {
                                (true, v, Some(s), String::new())
                            }
                            Ok((s, v)) => (false, v, Some(s), format!("HTTP {s}")),
                            Err(e) => (false, "-".to_string(), None, e),
                        };
                        if ok {
                            let (last, left) = &mut seen[who];
                            if *last != version {
                                if left.contains(&version) {
                                    r.flip_flops += 1;
                                }
                                if !last.is_empty() {
                                    if left.is_empty() {
                                        r.clients_moved += 1;
                                    }
                                    left.push(std::mem::take(last));
                                }
                                *last = version.clone();
                            }
                        }
                        let c = r.by_version.entry(version.clone()).or_default();
                        c.last_seen_ms = now;
                        if ok {
                            c.ok += 1;
                            r.ok += 1;
                        } else {
                            c.failed += 1;
                            c.first_failure_ms.get_or_insert(now);
                            r.failed += 1;
                            if r.failures.len() < 1000 {
                                r.failures.push(Failure {
                                    at_ms: now,
                                    version,
                                    status,
                                    error,
                                });
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            tasks,
        }
    }

    pub fn report(&self) -> LoadReport {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops sending, waits for requests in flight, and returns the final counts.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

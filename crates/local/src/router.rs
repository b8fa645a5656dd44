//! The built-in proxy as this machine's traffic router: one routing table built from
//! every rollout's status, pushed when it changed and confirmed by the proxy; the proxy
//! process found or started, watched while nothing changes, and replaced when it dies.
#![warn(clippy::too_many_lines)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use baton_engine::{Millis, Status};
use baton_proxy_api::{ControlError, ProxyClient, RevisionRoute, RoutingTable, ServiceRoute};
use baton_spec::{Rollout, StrategyRef};

use crate::supervise::{SuperviseError, spawn_proxy, wait_for};

/// How often the proxy is asked whether it lives when there is nothing to push: a
/// crashed proxy costs at most this long, plus a start, of refused connections.
const PROXY_CHECK_MS: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the proxy did not come up within 10 s; see {0}")]
    NotUp(String),
}

/// A rollout's entry in the routing table.
pub fn service_route(
    name: &str,
    spec: &Rollout,
    status: &Status,
    backends: impl Fn(&str) -> Vec<SocketAddr>,
) -> ServiceRoute {
    let preview_listen = match spec.spec.strategy.kind() {
        StrategyRef::BlueGreen(bg) => bg.preview_listen.clone(),
        _ => None,
    };
    let mut revisions: Vec<RevisionRoute> = status
        .weights
        .iter()
        .map(|(rev, w)| RevisionRoute {
            name: rev.clone(),
            weight: *w,
            backends: backends(rev),
        })
        .collect();
    // The preview, and a live canary still at 0 %, are listed with no weight: the
    // preview listener and the canary header reach them, weighted traffic and retries
    // never do.
    let live_canary = status.canary.clone().filter(|_| !status.aborted);
    for extra in [&status.preview, &live_canary].into_iter().flatten() {
        if !status.weights.contains_key(extra) && !revisions.iter().any(|x| &x.name == extra) {
            revisions.push(RevisionRoute {
                name: extra.clone(),
                weight: 0,
                backends: backends(extra),
            });
        }
    }
    let traffic = &spec.spec.traffic;
    let shutdown = &spec.spec.shutdown;
    ServiceRoute {
        name: name.to_string(),
        listen: traffic.listen.clone(),
        preview_listen,
        preview: status.preview.clone(),
        stable: status.stable.clone(),
        canary: live_canary,
        sticky_header: traffic.stickiness.as_ref().and_then(|s| s.header.clone()),
        sticky_cookie: traffic.stickiness.as_ref().and_then(|s| s.cookie.clone()),
        canary_header: traffic
            .canary_header
            .as_ref()
            .map(|h| (h.name.clone(), h.value.clone())),
        shield_canary: traffic.shield_canary,
        tls: traffic
            .tls
            .as_ref()
            .map(|t| (t.cert_file.clone(), t.key_file.clone())),
        mirror_percent: traffic.mirror_percent,
        mirror_methods: traffic.mirror_methods.clone(),
        // Just before the instance would be killed: it may close with 1012 itself when
        // it gets SIGTERM, after preStop.
        drain_ms: Some(
            ((shutdown.pre_stop_seconds + shutdown.drain_timeout_seconds) * 1000.0 - 500.0).max(0.0)
                as u64,
        ),
        revisions,
    }
}

/// What one sync saw, for the controller to record.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A service's split changed in a table the proxy confirmed.
    Shifted {
        service: String,
        /// `(revision, weight)` of the revisions with weight, by name.
        split: Vec<(String, u32)>,
        preview: Option<String>,
        table: u64,
    },
    /// The proxy refused the table (a listener it cannot bind, a missing certificate).
    Refused(String),
    /// The proxy did not answer and a new one was started.
    Replaced(String),
}

#[derive(Debug, Default)]
pub struct Synced {
    /// The proxy serves exactly the table given.
    pub confirmed: bool,
    /// A new table version, to be remembered across restarts.
    pub version: Option<u64>,
    pub notes: Vec<Note>,
}

pub struct ProxyRouter {
    proxy: ProxyClient,
    socket: PathBuf,
    log: PathBuf,
    metrics: Option<SocketAddr>,
    /// The proxy process, when this controller started it.
    child: Option<Child>,
    version: u64,
    last: Option<Vec<ServiceRoute>>,
    routed: HashSet<SocketAddr>,
    retry_at: Millis,
    checked_at: Millis,
}

impl ProxyRouter {
    /// Adopts the proxy answering on `socket` (its table's instances keep serving), or
    /// starts one, detached. `stored_version` is the last table version recorded.
    pub async fn start(
        socket: PathBuf,
        log: PathBuf,
        metrics: Option<SocketAddr>,
        stored_version: u64,
    ) -> Result<ProxyRouter, RouterError> {
        let proxy = ProxyClient::new(&socket);
        let mut r = ProxyRouter {
            proxy,
            socket,
            log,
            metrics,
            child: None,
            version: stored_version,
            last: None,
            routed: HashSet::new(),
            retry_at: 0,
            checked_at: 0,
        };
        let (child, version, routed) = r.ensure().await?;
        r.child = child;
        r.version = r.version.max(version);
        r.routed = routed;
        Ok(r)
    }

    pub fn client(&self) -> &ProxyClient {
        &self.proxy
    }

    /// The instances the confirmed table routes to.
    pub fn routed(&self) -> &HashSet<SocketAddr> {
        &self.routed
    }

    /// Finds the running proxy, or starts one: its child (when started here), its
    /// table version and the addresses it routes to.
    async fn ensure(&self) -> Result<(Option<Child>, u64, HashSet<SocketAddr>), RouterError> {
        if let Ok((_, version)) = self.proxy.ping().await {
            let table = self.proxy.table().await?;
            return Ok((None, version, baton_proxy_api::routed(&table.services)));
        }
        let args: Vec<String> = self
            .metrics
            .map(|m| vec!["--metrics-listen".to_string(), m.to_string()])
            .unwrap_or_default();
        let child = spawn_proxy(&self.socket, &self.log, &args)?;
        match wait_for(&self.proxy, Duration::from_secs(10), |r| r.ok()).await {
            Some(_) => Ok((Some(child), 0, HashSet::new())),
            None => Err(RouterError::NotUp(self.log.display().to_string())),
        }
    }

    /// Pushes `services` when they changed; otherwise checks the proxy lives.
    pub async fn sync(&mut self, services: Vec<ServiceRoute>, now: Millis) -> Synced {
        let mut out = Synced::default();
        if self.last.as_ref() == Some(&services) {
            out.confirmed = true;
            // Nothing to push, so nothing else would notice a proxy that died: while
            // traffic is steady (a Healthy rollout, a long pause) it must be checked.
            if now >= self.checked_at + PROXY_CHECK_MS {
                self.checked_at = now;
                // Only a socket nobody accepts on is a dead proxy: a slow answer is a
                // busy one, and a second proxy would fight it for the ports.
                if let Err(e @ ControlError::Connect { .. }) = self.proxy.ping().await {
                    self.replace(now, e, &mut out).await;
                }
            }
            return out;
        }
        if now < self.retry_at {
            return out;
        }
        let table = RoutingTable {
            version: self.version + 1,
            services: services.clone(),
        };
        match self.proxy.set_table(&table).await {
            Ok(v) => {
                self.version = v;
                out.version = Some(v);
                out.confirmed = true;
                self.routed = baton_proxy_api::routed(&services);
                out.notes = self.shifts(&services, v);
                self.last = Some(services);
            }
            Err(ControlError::Refused { error, .. }) => {
                self.retry_at = now + 2000;
                out.notes.push(Note::Refused(error));
            }
            Err(e) => self.replace(now, e, &mut out).await,
        }
        out
    }

    /// The proxy did not answer: start a new one (or adopt one that came up meanwhile)
    /// and push it the whole table on the next sync.
    async fn replace(&mut self, now: Millis, e: ControlError, out: &mut Synced) {
        self.retry_at = now + 500;
        eprintln!("warning: {e}; starting a new proxy");
        match self.ensure().await {
            Ok((child, v, _)) => {
                if let Some(child) = child {
                    // Reap the one that died, if it was ours.
                    if let Some(mut old) = self.child.replace(child) {
                        let _ = old.try_wait();
                    }
                    out.notes.push(Note::Replaced(e.to_string()));
                }
                self.version = self.version.max(v);
                self.last = None;
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    }

    /// The services whose split changed from the last confirmed table.
    fn shifts(&self, services: &[ServiceRoute], table: u64) -> Vec<Note> {
        let split = |s: &ServiceRoute| {
            let mut w: Vec<(String, u32)> = s
                .revisions
                .iter()
                .filter(|r| r.weight > 0)
                .map(|r| (r.name.clone(), r.weight))
                .collect();
            w.sort();
            (w, s.preview.clone())
        };
        services
            .iter()
            .filter_map(|svc| {
                let before = self
                    .last
                    .as_ref()
                    .and_then(|l| l.iter().find(|o| o.name == svc.name))
                    .map(split);
                let (split, preview) = split(svc);
                (before.as_ref() != Some(&(split.clone(), preview.clone()))).then(|| {
                    Note::Shifted {
                        service: svc.name.clone(),
                        split,
                        preview,
                        table,
                    }
                })
            })
            .collect()
    }

    /// Reaps the proxy process if it was ours and exited.
    pub fn reap(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.try_wait();
        }
    }

    /// Stops the proxy: it stops accepting and drains; waits up to 15 s for our child.
    pub async fn stop(&mut self) {
        let _ = self.proxy.shutdown().await;
        if let Some(c) = &mut self.child {
            let _ = tokio::time::timeout(Duration::from_secs(15), async {
                while matches!(c.try_wait(), Ok(None)) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }
}

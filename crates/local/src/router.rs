//! The built-in proxy as this machine's traffic router: one routing table built from
//! every rollout's status, pushed when it changed and confirmed by the proxy; the proxy
//! process found or started, watched while nothing changes, and replaced when it dies.
#![warn(clippy::too_many_lines)]

use std::collections::{BTreeMap, HashSet};
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
const PROXY_CHECK_MS: u64 = 250;
/// A proxy that accepts on its control socket but answers nothing for this long is
/// hung (stopped, deadlocked): it is killed and replaced. Each call waits at most
/// `CALL_TIMEOUT`, so a hung proxy never stalls the controller's tick for long.
const HUNG_MS: u64 = 1000;
const CALL_TIMEOUT: Duration = Duration::from_millis(300);

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
        backend_protocol: match traffic.backend_protocol {
            baton_spec::BackendProtocol::Http1 => baton_proxy_api::table::BackendProtocol::Http1,
            baton_spec::BackendProtocol::H2c => baton_proxy_api::table::BackendProtocol::H2c,
        },
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
    /// The proxy cannot serve this service's new route (a listener it cannot bind, a
    /// missing certificate): it keeps the route it had. Told once per distinct error.
    Refused { service: String, error: String },
    /// The proxy refused the whole table (one older than the table it serves).
    RefusedAll(String),
    /// A service the proxy had refused is served as asked again.
    Recovered { service: String },
    /// The proxy did not answer and a new one was started.
    Replaced(String),
}

#[derive(Debug, Default)]
pub struct Synced {
    /// The proxy serves the table given, but for the services in `refused`.
    pub confirmed: bool,
    /// Services the proxy does not serve as asked, with its reason.
    pub refused: BTreeMap<String, String>,
    /// A new table version, to be remembered across restarts.
    pub version: Option<u64>,
    pub notes: Vec<Note>,
}

pub struct ProxyRouter {
    proxy: ProxyClient,
    socket: PathBuf,
    log: PathBuf,
    metrics: Option<(SocketAddr, PathBuf)>,
    /// More arguments for a proxy started here (`--log-format`).
    args: Vec<String>,
    /// The proxy process, when this controller started it.
    child: Option<Child>,
    version: u64,
    last: Option<Vec<ServiceRoute>>,
    /// What the proxy confirmed serving, per service (`None` until it is known).
    served: Option<BTreeMap<String, ServiceRoute>>,
    /// Services of `last` the proxy refused, with its reason; retried every 2 s.
    refused: BTreeMap<String, String>,
    refused_retry_at: Millis,
    /// The last whole-table refusal, told once.
    refused_all: Option<String>,
    routed: HashSet<SocketAddr>,
    retry_at: Millis,
    checked_at: Millis,
    /// The running proxy's pid, from its own answer.
    pid: Option<u32>,
    /// Since when the proxy has not answered (while its socket still accepts).
    unanswered_since: Option<Millis>,
}

impl ProxyRouter {
    /// Adopts the proxy answering on `socket` (its table's instances keep serving), or
    /// starts one, detached. `stored_version` is the last table version recorded.
    pub async fn start(
        socket: PathBuf,
        log: PathBuf,
        metrics: Option<(SocketAddr, PathBuf)>,
        args: Vec<String>,
        stored_version: u64,
    ) -> Result<ProxyRouter, RouterError> {
        let proxy = ProxyClient::new(&socket).with_timeout(CALL_TIMEOUT);
        let mut r = ProxyRouter {
            proxy,
            socket,
            log,
            metrics,
            args,
            child: None,
            version: stored_version,
            last: None,
            served: None,
            refused: BTreeMap::new(),
            refused_retry_at: 0,
            refused_all: None,
            routed: HashSet::new(),
            retry_at: 0,
            checked_at: 0,
            pid: None,
            unanswered_since: None,
        };
        let (child, version, served, pid) = r.ensure().await?;
        r.child = child;
        r.pid = pid;
        r.version = r.version.max(version);
        r.routed = baton_proxy_api::routed(&served);
        r.served = Some(by_name(served));
        Ok(r)
    }

    pub fn client(&self) -> &ProxyClient {
        &self.proxy
    }

    /// The weight per revision the proxy confirmed serving for `service` (an empty map:
    /// the proxy routes nothing of it), or `None` while that is not known.
    pub fn served(&self, service: &str) -> Option<BTreeMap<String, u32>> {
        let served = self.served.as_ref()?;
        Some(
            served
                .get(service)
                .map(|s| {
                    s.revisions
                        .iter()
                        .map(|r| (r.name.clone(), r.weight))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// Whether the proxy already serves `status`'s split and preview for `service`: a
    /// restarted controller then knows the route version confirmed (not knowing it, the
    /// engine would keep, and start again, revisions that left routing long ago).
    pub fn serves(&self, service: &str, status: &Status) -> bool {
        let Some(svc) = self.served.as_ref().and_then(|s| s.get(service)) else {
            return false;
        };
        let served: BTreeMap<&str, u32> = svc
            .revisions
            .iter()
            .filter(|r| r.weight > 0)
            .map(|r| (r.name.as_str(), r.weight))
            .collect();
        let wanted: BTreeMap<&str, u32> = status
            .weights
            .iter()
            .filter(|(_, w)| **w > 0)
            .map(|(r, w)| (r.as_str(), *w))
            .collect();
        served == wanted && svc.preview == status.preview
    }

    /// Why the proxy does not serve `service` as asked, if it does not.
    pub fn refusal(&self, service: &str) -> Option<&str> {
        self.refused.get(service).map(String::as_str)
    }

    /// The instances the confirmed table routes to.
    pub fn routed(&self) -> &HashSet<SocketAddr> {
        &self.routed
    }

    /// Finds the running proxy, or starts one: its child (when started here), its
    /// table version and the services it serves.
    #[allow(clippy::type_complexity)]
    async fn ensure(
        &self,
    ) -> Result<(Option<Child>, u64, Vec<ServiceRoute>, Option<u32>), RouterError> {
        if let Ok((pid, version)) = self.proxy.ping().await {
            let table = self.proxy.table().await?;
            return Ok((None, version, table.services, Some(pid)));
        }
        let mut args: Vec<String> = self
            .metrics
            .as_ref()
            .map(|(m, file)| {
                vec![
                    "--metrics-listen".to_string(),
                    m.to_string(),
                    "--metrics-textfile".to_string(),
                    file.display().to_string(),
                ]
            })
            .unwrap_or_default();
        args.extend(self.args.iter().cloned());
        let child = spawn_proxy(&self.socket, &self.log, &args)?;
        match wait_for(&self.proxy, Duration::from_secs(10), |r| {
            r.ok().map(|p| p.0)
        })
        .await
        {
            Some(pid) => Ok((Some(child), 0, Vec::new(), Some(pid))),
            None => Err(RouterError::NotUp(self.log.display().to_string())),
        }
    }

    /// Pushes `services` when they changed (and every 2 s while the proxy refuses
    /// some of them); otherwise checks the proxy lives.
    pub async fn sync(&mut self, services: Vec<ServiceRoute>, now: Millis) -> Synced {
        let mut out = Synced::default();
        let same = self.last.as_ref() == Some(&services);
        if same && (self.refused.is_empty() || now < self.refused_retry_at) {
            out.confirmed = true;
            out.refused = self.refused.clone();
            // Nothing to push, so nothing else would notice a proxy that died: while
            // traffic is steady (a Healthy rollout, a long pause) it must be checked.
            if now >= self.checked_at + PROXY_CHECK_MS {
                self.checked_at = now;
                match self.proxy.ping().await {
                    Ok((pid, _)) => {
                        self.pid = Some(pid);
                        self.unanswered_since = None;
                    }
                    Err(e) => self.unanswered(now, e, &mut out).await,
                }
            }
            if self.last.is_some() {
                return out;
            }
            // A new proxy was just started: it gets the table now, not a tick later.
            out.confirmed = false;
            out.refused.clear();
        }
        if now < self.retry_at {
            return out;
        }
        let table = RoutingTable {
            version: self.version + 1,
            services: services.clone(),
        };
        match self.proxy.apply_table(&table).await {
            Ok(applied) => {
                let v = applied.version;
                self.version = v;
                self.refused_all = None;
                out.version = Some(v);
                out.confirmed = true;
                let refused: BTreeMap<String, String> = applied
                    .refused
                    .into_iter()
                    .map(|r| (r.service, r.error))
                    .collect();
                // What the proxy serves: the table given, but for a refused service
                // whatever it kept (asked of the proxy, which alone knows).
                let serving = match refused.is_empty() {
                    true => services.clone(),
                    false => match self.proxy.table().await {
                        Ok(t) => t.services,
                        Err(_) => services
                            .iter()
                            .filter(|s| !refused.contains_key(&s.name))
                            .cloned()
                            .collect(),
                    },
                };
                out.notes.extend(self.shifts(&serving, v));
                for (service, error) in &refused {
                    if self.refused.get(service) != Some(error) {
                        out.notes.push(Note::Refused {
                            service: service.clone(),
                            error: error.clone(),
                        });
                    }
                }
                for service in self.refused.keys() {
                    if !refused.contains_key(service) && services.iter().any(|s| &s.name == service)
                    {
                        out.notes.push(Note::Recovered {
                            service: service.clone(),
                        });
                    }
                }
                self.routed = baton_proxy_api::routed(&serving);
                self.served = Some(by_name(serving));
                self.refused_retry_at = now + 2000;
                self.refused = refused;
                out.refused = self.refused.clone();
                self.last = Some(services);
            }
            Err(ControlError::Refused { error, .. }) => {
                self.retry_at = now + 2000;
                if self.refused_all.as_ref() != Some(&error) {
                    self.refused_all = Some(error.clone());
                    out.notes.push(Note::RefusedAll(error));
                }
            }
            Err(e) => self.unanswered(now, e, &mut out).await,
        }
        out
    }

    /// The proxy did not answer. A socket nobody accepts on is a dead proxy: replaced
    /// at once. One that accepts but says nothing may be busy: only after `HUNG_MS` of
    /// silence is it killed (a second proxy beside it would fight it for the ports)
    /// and replaced.
    async fn unanswered(&mut self, now: Millis, e: ControlError, out: &mut Synced) {
        if matches!(e, ControlError::Connect { .. }) {
            self.unanswered_since = None;
            return self.replace(now, e, out).await;
        }
        let since = *self.unanswered_since.get_or_insert(now);
        if now < since + HUNG_MS {
            return;
        }
        if let Some(pid) = self.pid {
            tracing::warn!(
                "the proxy (pid {pid}) answered nothing for {} ms: killing it",
                now - since
            );
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // Its ports are free once it is gone.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while nix::sys::signal::kill(pid, None).is_ok()
                && tokio::time::Instant::now() < deadline
            {
                self.reap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.unanswered_since = None;
        self.replace(now, e, out).await;
    }

    /// The proxy did not answer: start a new one (or adopt one that came up meanwhile)
    /// and push it the whole table on the next sync.
    async fn replace(&mut self, now: Millis, e: ControlError, out: &mut Synced) {
        tracing::warn!("{e}; starting a new proxy");
        match self.ensure().await {
            Ok((child, v, serving, pid)) => {
                self.pid = pid;
                if let Some(child) = child {
                    // Reap the one that died, if it was ours.
                    if let Some(mut old) = self.child.replace(child) {
                        let _ = old.try_wait();
                    }
                    out.notes.push(Note::Replaced(e.to_string()));
                }
                self.version = self.version.max(v);
                self.routed = baton_proxy_api::routed(&serving);
                self.served = Some(by_name(serving));
                self.last = None;
            }
            Err(e) => {
                self.retry_at = now + 500;
                tracing::warn!("{e}");
            }
        }
    }

    /// The services whose split changed from what the proxy served before.
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
                    .served
                    .as_ref()
                    .and_then(|l| l.get(&svc.name))
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

fn by_name(services: Vec<ServiceRoute>) -> BTreeMap<String, ServiceRoute> {
    services.into_iter().map(|s| (s.name.clone(), s)).collect()
}

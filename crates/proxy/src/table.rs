//! The routing table's compiled form, the one the hot path reads. The table itself
//! is a wire type, in `baton-proxy-api`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use baton_proxy_api::table::{
    BackendProtocol, RevisionRoute, RoutingTable, ServiceRoute, routed,
};

use crate::metrics::{Metrics, RevisionMetrics};

/// Passive outlier detection for one instance: consecutive failures, and how long it
/// is out. Kept per address across routing tables, which change at every step.
#[derive(Default)]
pub struct BackendHealth {
    consecutive: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Set by the active check while the instance refuses connections.
    unreachable: std::sync::atomic::AtomicBool,
}

/// Instances that failed `after` times in a row (connection refused or reset, 502,
/// 503, 504: signs of a sick instance rather than of a bad request) are left out for
/// `eject_ms`. When every instance of a revision is out, all are tried anyway.
pub struct Outliers {
    start: std::time::Instant,
    by_addr: Mutex<HashMap<SocketAddr, Arc<BackendHealth>>>,
    pub after: u32,
    pub eject_ms: u64,
}

impl Default for Outliers {
    fn default() -> Self {
        Outliers {
            start: std::time::Instant::now(),
            by_addr: Mutex::new(HashMap::new()),
            after: 5,
            eject_ms: 10_000,
        }
    }
}

impl Outliers {
    fn health(&self, addr: SocketAddr) -> Arc<BackendHealth> {
        let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Every instance address known, with its health.
    pub fn all(&self) -> Vec<(SocketAddr, Arc<BackendHealth>)> {
        let m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(a, h)| (*a, h.clone())).collect()
    }

    /// An active check could not connect: out of rotation until one can. True when
    /// this is news.
    pub fn unreachable(&self, h: &BackendHealth) -> bool {
        !h.unreachable.swap(true, Ordering::Relaxed)
    }

    /// An active check connected. (A passive ejection for bad answers still runs its
    /// course: accepting connections is not answering well.)
    pub fn reachable(&self, h: &BackendHealth) {
        h.unreachable.store(false, Ordering::Relaxed);
    }

    pub(crate) fn ejected(&self, h: &BackendHealth) -> bool {
        h.unreachable.load(Ordering::Relaxed)
            || h.ejected_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Records a failure; true when it ejected the instance.
    pub fn failed(&self, h: &BackendHealth) -> bool {
        let n = h.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.after && !self.ejected(h) {
            h.ejected_until_ms
                .store(self.now_ms() + self.eject_ms, Ordering::Relaxed);
            // Read first: a store on every success would pull the line from other cores.
            if h.consecutive.load(Ordering::Relaxed) != 0 {
                h.consecutive.store(0, Ordering::Relaxed);
            }
            return true;
        }
        false
    }

    pub fn succeeded(&self, h: &BackendHealth) {
        // Read first: a store on every success would pull the line from other cores.
        if h.consecutive.load(Ordering::Relaxed) != 0 {
            h.consecutive.store(0, Ordering::Relaxed);
        }
    }
}

/// One revision, ready for the hot path.
pub(crate) struct Target {
    pub name: Arc<str>,
    pub weight: u32,
    pub backends: Vec<SocketAddr>,
    health: Vec<Arc<BackendHealth>>,
    next: AtomicU64,
    pub metrics: Arc<RevisionMetrics>,
}

impl Target {
    /// The instances to try for one request, in order: round-robin picks the first,
    /// the others follow, each once; ejected instances only when all are ejected.
    pub fn backends_from_next<'a>(
        &'a self,
        outliers: &'a Outliers,
    ) -> impl Iterator<Item = (SocketAddr, &'a BackendHealth)> + 'a {
        let len = self.backends.len();
        // One instance: no rotation, and no shared counter to bump.
        let n = if len > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) as usize
        } else {
            0
        };
        let all_out = self.health.iter().all(|h| outliers.ejected(h));
        (0..len)
            .map(move |k| (n + k) % len)
            .filter(move |i| all_out || !outliers.ejected(&self.health[*i]))
            .map(move |i| (self.backends[i], &*self.health[i]))
    }
}

pub(crate) struct Route {
    pub service: Arc<str>,
    /// Stable first, the canary last: a canary that grows takes the top of the slot
    /// range, so sticky clients only ever move onto it.
    pub targets: Vec<Target>,
    counter: AtomicU64,
    pub canary: Option<usize>,
    pub stable: Option<usize>,
    sticky: Option<Sticky>,
    canary_header: Option<(hyper::header::HeaderName, String)>,
    pub shield: bool,
    /// HTTP/2 by prior knowledge to the instances (`backendProtocol: h2c`).
    pub h2c: bool,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub mirror_percent: u32,
    /// What is copied; empty: the safe methods.
    mirror_methods: Vec<hyper::Method>,
    mirror_counter: AtomicU64,
    /// Retry budget in tenths of a retry: each request earns one tenth, each retry
    /// spends ten, so retries stay under about 10 % of requests (plus a burst of ten),
    /// and a sick revision cannot double the load on the others.
    retry_budget: std::sync::atomic::AtomicI64,
}

enum Sticky {
    Header(hyper::header::HeaderName),
    Cookie(String),
}

/// FNV-1a: a fixed, tiny hash so a client's slot is the same in every proxy process
/// and version (std's hasher makes no such promise).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Ten retries' worth, in tenths.
const RETRY_BURST: i64 = 100;

impl Route {
    /// A request came in: it earns a tenth of a retry.
    pub fn earn_retry(&self) {
        let b = &self.retry_budget;
        if b.load(Ordering::Relaxed) < RETRY_BURST {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spends one retry from the budget, if there is one.
    pub fn spend_retry(&self) -> bool {
        self.retry_budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= 10).then_some(b - 10)
            })
            .is_ok()
    }

    /// Whether this request (served by stable) is copied to the canary. Only the
    /// listed methods, by default the safe ones (GET, HEAD, OPTIONS): an idempotent
    /// PUT or DELETE is still a write, and against data the canary shares with stable
    /// a copy runs it twice.
    pub fn mirror(&self, served_by: usize, method: &hyper::Method) -> Option<usize> {
        let canary = self.canary?;
        let listed = if self.mirror_methods.is_empty() {
            matches!(
                *method,
                hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
            )
        } else {
            self.mirror_methods.contains(method)
        };
        if self.mirror_percent == 0
            || !listed
            || Some(served_by) != self.stable
            || self.targets[canary].backends.is_empty()
        {
            return None;
        }
        let n = self.mirror_counter.fetch_add(1, Ordering::Relaxed);
        (((n.wrapping_mul(37)) % 100) as u32 >= 100 - self.mirror_percent).then_some(canary)
    }

    /// Picks a revision for a request: the canary header first, then the client's
    /// sticky slot, else by weight. Non-sticky requests are spread over 100 slots by
    /// stepping through them with a stride coprime to 100, so a 10 % canary gets
    /// every tenth request or so rather than bursts of ten.
    pub fn pick(&self, headers: &hyper::HeaderMap) -> Option<usize> {
        if let (Some((name, value)), Some(c)) = (&self.canary_header, self.canary)
            && headers
                .get(name)
                .is_some_and(|v| v.as_bytes() == value.as_bytes())
            && !self.targets[c].backends.is_empty()
        {
            return Some(c);
        }
        let key = match &self.sticky {
            Some(Sticky::Header(h)) => headers.get(h).map(|v| v.as_bytes()),
            Some(Sticky::Cookie(c)) => cookie(headers, c).map(str::as_bytes),
            None => None,
        };
        // Slots in hundredths of a percent for sticky clients, so that they spread
        // finely; whole percents for the rest.
        let (slot, scale) = match key {
            Some(k) => ((fnv1a(k) % 10_000) as u32, 100),
            None => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                ((n.wrapping_mul(37) % 100) as u32, 1)
            }
        };
        let mut acc = 0;
        for (i, t) in self.targets.iter().enumerate() {
            acc += t.weight * scale;
            if slot < acc && !t.backends.is_empty() {
                return Some(i);
            }
        }
        // The slot's revision has no ready instance: another weighted one that has.
        // Never a zero-weight revision (an aborted canary, an unpromoted preview).
        self.targets
            .iter()
            .position(|t| t.weight > 0 && !t.backends.is_empty())
    }
}

/// A TLS acceptor for a certificate and key in PEM files, offering HTTP/2 and
/// HTTP/1.1 by ALPN.
fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the certificate {cert}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{cert} holds no certificate"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("cannot read the key {key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The table as the hot path reads it: a route per listening address.
#[derive(Default)]
pub(crate) struct Compiled {
    pub version: u64,
    pub source: RoutingTable,
    pub routes: HashMap<SocketAddr, Arc<Route>>,
}

impl Compiled {
    pub fn build(
        table: &RoutingTable,
        metrics: &Metrics,
        outliers: &Outliers,
    ) -> Result<Compiled, String> {
        let mut routes = HashMap::new();
        for svc in &table.services {
            let service: Arc<str> = svc.name.as_str().into();
            let target = |r: &RevisionRoute, weight: u32| Target {
                name: r.name.as_str().into(),
                weight,
                backends: r.backends.clone(),
                health: r.backends.iter().map(|a| outliers.health(*a)).collect(),
                next: AtomicU64::new(0),
                metrics: metrics.revision(&svc.name, &r.name),
            };
            let listen: SocketAddr = svc.listen.parse().map_err(|_| {
                format!("service {}: bad listen address {:?}", svc.name, svc.listen)
            })?;
            let total: u32 = svc.revisions.iter().map(|r| r.weight).sum();
            if total != 100 && !svc.revisions.is_empty() {
                return Err(format!(
                    "service {}: weights sum to {total}, not 100",
                    svc.name
                ));
            }
            let mut ordered: Vec<&RevisionRoute> = svc.revisions.iter().collect();
            let rank = |r: &RevisionRoute| {
                if svc.stable.as_ref() == Some(&r.name) {
                    0
                } else if svc.canary.as_ref() == Some(&r.name) {
                    2
                } else {
                    1
                }
            };
            ordered.sort_by_key(|r| rank(r));
            let targets: Vec<Target> = ordered.iter().map(|r| target(r, r.weight)).collect();
            let find = |name: &Option<String>| {
                name.as_ref()
                    .and_then(|n| targets.iter().position(|t| &*t.name == n.as_str()))
            };
            let header = |h: &str| {
                hyper::header::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("service {}: {h:?} is not a header name", svc.name))
            };
            let sticky = match (&svc.sticky_header, &svc.sticky_cookie) {
                (Some(h), _) => Some(Sticky::Header(header(h)?)),
                (None, Some(c)) => Some(Sticky::Cookie(c.clone())),
                (None, None) => None,
            };
            let canary_header = match &svc.canary_header {
                Some((n, v)) => Some((header(n)?, v.clone())),
                None => None,
            };
            let main = Route {
                service: service.clone(),
                canary: find(&svc.canary),
                stable: find(&svc.stable),
                targets,
                counter: AtomicU64::new(0),
                sticky,
                canary_header,
                shield: svc.shield_canary,
                h2c: svc.backend_protocol == BackendProtocol::H2c,
                mirror_percent: svc.mirror_percent.min(100),
                mirror_methods: svc
                    .mirror_methods
                    .iter()
                    .map(|m| {
                        hyper::Method::from_bytes(m.as_bytes()).map_err(|_| {
                            format!("service {}: {m:?} is not a method to mirror", svc.name)
                        })
                    })
                    .collect::<Result<_, _>>()?,
                mirror_counter: AtomicU64::new(0),
                retry_budget: std::sync::atomic::AtomicI64::new(RETRY_BURST),
                tls: match &svc.tls {
                    Some((cert, key)) => Some(
                        tls_acceptor(cert, key)
                            .map_err(|e| format!("service {}: {e}", svc.name))?,
                    ),
                    None => None,
                },
            };
            if routes.insert(listen, Arc::new(main)).is_some() {
                return Err(format!("address {listen} is used twice"));
            }
            if let Some(p) = &svc.preview_listen {
                let addr: SocketAddr = p
                    .parse()
                    .map_err(|_| format!("service {}: bad preview address {p:?}", svc.name))?;
                let targets = svc
                    .revisions
                    .iter()
                    .filter(|r| svc.preview.as_ref() == Some(&r.name))
                    .map(|r| target(r, 100))
                    .collect();
                let preview = Route {
                    service: service.clone(),
                    targets,
                    counter: AtomicU64::new(0),
                    canary: None,
                    stable: None,
                    sticky: None,
                    canary_header: None,
                    shield: false,
                    h2c: svc.backend_protocol == BackendProtocol::H2c,
                    tls: None,
                    mirror_percent: 0,
                    mirror_methods: Vec::new(),
                    mirror_counter: AtomicU64::new(0),
                    retry_budget: std::sync::atomic::AtomicI64::new(RETRY_BURST),
                };
                if routes.insert(addr, Arc::new(preview)).is_some() {
                    return Err(format!("address {addr} is used twice"));
                }
            }
        }
        Ok(Compiled {
            version: table.version,
            source: table.clone(),
            routes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(weights: &[(&str, u32, usize)]) -> RoutingTable {
        RoutingTable {
            version: 1,
            services: vec![ServiceRoute {
                name: "svc".into(),
                listen: "127.0.0.1:1".into(),
                preview_listen: None,
                preview: None,
                stable: None,
                canary: None,
                sticky_header: None,
                sticky_cookie: None,
                canary_header: None,
                shield_canary: false,
                drain_ms: None,
                tls: None,
                mirror_percent: 0,
                mirror_methods: Vec::new(),
                backend_protocol: Default::default(),
                revisions: weights
                    .iter()
                    .enumerate()
                    .map(|(i, (n, w, b))| RevisionRoute {
                        name: (*n).into(),
                        weight: *w,
                        backends: (0..*b)
                            .map(|j| SocketAddr::from(([127, 0, 0, 1], (1000 + i * 10 + j) as u16)))
                            .collect(),
                    })
                    .collect(),
            }],
        }
    }

    fn share(t: &RoutingTable, n: usize) -> HashMap<String, usize> {
        let c = Compiled::build(t, &Metrics::default(), &Outliers::default()).expect("valid table");
        let route = c.routes.values().next().expect("one route");
        let mut out = HashMap::new();
        for _ in 0..n {
            let i = route.pick(&hyper::HeaderMap::new()).expect("a target");
            *out.entry(route.targets[i].name.to_string()).or_default() += 1;
        }
        out
    }

    #[test]
    fn weights_are_honoured_exactly_per_hundred() {
        let s = share(&table(&[("a", 90, 2), ("b", 10, 1)]), 1000);
        assert_eq!(s["a"], 900);
        assert_eq!(s["b"], 100);
        let s = share(&table(&[("a", 98, 2), ("b", 2, 1)]), 10_000);
        assert_eq!(s["b"], 200);
    }

    #[test]
    fn a_revision_without_instances_gets_nothing() {
        let s = share(&table(&[("a", 50, 0), ("b", 50, 1)]), 100);
        assert_eq!(s.get("a"), None);
        assert_eq!(s["b"], 100);
    }

    #[test]
    fn bad_tables_are_refused() {
        let bad = table(&[("a", 50, 1), ("b", 40, 1)]);
        let e = Compiled::build(&bad, &Metrics::default(), &Outliers::default())
            .err()
            .expect("refused");
        assert!(e.contains("sum to 90"), "{e}");
    }

    #[test]
    fn sticky_clients_only_move_onto_a_growing_canary() {
        let mut t = table(&[("stable", 90, 1), ("canary", 10, 1)]);
        t.services[0].stable = Some("stable".into());
        t.services[0].canary = Some("canary".into());
        t.services[0].sticky_header = Some("x-client-id".into());
        let place = |t: &RoutingTable| -> Vec<String> {
            let c = Compiled::build(t, &Metrics::default(), &Outliers::default()).expect("valid");
            let route = c.routes.values().next().expect("route");
            (0..2000)
                .map(|i| {
                    let mut h = hyper::HeaderMap::new();
                    h.insert("x-client-id", format!("client-{i}").parse().expect("value"));
                    // Twice per client: the same answer both times.
                    let a = route.pick(&h).expect("target");
                    assert_eq!(route.pick(&h), Some(a));
                    route.targets[a].name.to_string()
                })
                .collect()
        };
        let at10 = place(&t);
        for w in [25, 50, 100] {
            t.services[0].revisions[0].weight = 100 - w;
            t.services[0].revisions[1].weight = w;
            let next = place(&t);
            for (before, after) in at10.iter().zip(&next) {
                assert!(
                    !(before == "canary" && after == "stable"),
                    "a client went back to stable at {w} %"
                );
            }
            let on_canary = next.iter().filter(|n| *n == "canary").count();
            assert!(
                (on_canary as f64 / 2000.0 - f64::from(w) / 100.0).abs() < 0.05,
                "{on_canary} at {w} %"
            );
        }
        let share = at10.iter().filter(|n| *n == "canary").count();
        assert!(
            (150..=250).contains(&share),
            "about 10 % of clients start on the canary: {share}"
        );
    }

    #[test]
    fn the_canary_header_reaches_the_canary_at_any_weight() {
        let mut t = table(&[("stable", 100, 1), ("canary", 0, 1)]);
        t.services[0].stable = Some("stable".into());
        t.services[0].canary = Some("canary".into());
        t.services[0].canary_header = Some(("x-canary".into(), "always".into()));
        let c = Compiled::build(&t, &Metrics::default(), &Outliers::default()).expect("valid");
        let route = c.routes.values().next().expect("route");
        let mut h = hyper::HeaderMap::new();
        assert_eq!(
            route.targets[route.pick(&h).expect("t")].name.as_ref(),
            "stable"
        );
        h.insert("x-canary", "always".parse().expect("value"));
        assert_eq!(
            route.targets[route.pick(&h).expect("t")].name.as_ref(),
            "canary"
        );
        h.insert("x-canary", "sometimes".parse().expect("value"));
        assert_eq!(
            route.targets[route.pick(&h).expect("t")].name.as_ref(),
            "stable"
        );
    }

    #[test]
    fn backends_rotate() {
        let o = Outliers::default();
        let c = Compiled::build(
            &table(&[("a", 100, 3)]),
            &Metrics::default(),
            &Outliers::default(),
        )
        .expect("valid");
        let route = c.routes.values().next().expect("route");
        let picks: Vec<_> = (0..3)
            .map(|_| route.targets[0].backends_from_next(&o).next().map(|b| b.0))
            .collect();
        assert_eq!(
            picks.iter().collect::<std::collections::HashSet<_>>().len(),
            3
        );
        let order: Vec<_> = route.targets[0]
            .backends_from_next(&o)
            .map(|b| b.0)
            .collect();
        let distinct = order.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 3, "a request tries each instance once");
        // Five failures in a row eject an instance; it is skipped until it is back.
        let (first, health) = route.targets[0].backends_from_next(&o).next().expect("one");
        for _ in 0..4 {
            assert!(!o.failed(health));
        }
        assert!(o.failed(health), "the fifth failure ejects");
        for _ in 0..6 {
            assert!(
                route.targets[0]
                    .backends_from_next(&o)
                    .all(|(a, _)| a != first)
            );
        }
    }
}

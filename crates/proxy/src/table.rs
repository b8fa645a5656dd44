//! The routing table the controller sends, and its compiled form the hot path reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, RevisionMetrics};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTable {
    /// Monotonic; the proxy acknowledges the version it runs.
    pub version: u64,
    pub services: Vec<ServiceRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoute {
    pub name: String,
    pub listen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_listen: Option<String>,
    /// Revision served on the preview listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    pub revisions: Vec<RevisionRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRoute {
    pub name: String,
    /// Share of traffic, 0-100.
    pub weight: u32,
    /// Ready instances, `host:port`.
    pub backends: Vec<SocketAddr>,
}

/// Every instance address the services route to: what a table keeps serving.
pub fn routed(services: &[ServiceRoute]) -> std::collections::HashSet<SocketAddr> {
    services
        .iter()
        .flat_map(|s| s.revisions.iter().flat_map(|r| r.backends.iter().copied()))
        .collect()
}

/// One revision, ready for the hot path.
pub(crate) struct Target {
    pub name: Arc<str>,
    pub weight: u32,
    pub backends: Vec<SocketAddr>,
    next: AtomicU64,
    pub metrics: Arc<RevisionMetrics>,
}

impl Target {
    /// The instances to try for one request, in order: round-robin picks the first,
    /// the others follow, each once.
    pub fn backends_from_next(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let len = self.backends.len();
        (0..len).map(move |k| self.backends[(n + k) % len])
    }
}

pub(crate) struct Route {
    pub service: Arc<str>,
    pub targets: Vec<Target>,
    counter: AtomicU64,
}

impl Route {
    /// Picks a revision by weight. Requests are spread over 100 slots by stepping
    /// through them with a stride coprime to 100, so a 10 % canary gets every tenth
    /// request or so rather than bursts of ten.
    pub fn pick(&self) -> Option<usize> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let slot = ((n.wrapping_mul(37)) % 100) as u32;
        let mut acc = 0;
        for (i, t) in self.targets.iter().enumerate() {
            acc += t.weight;
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

/// The table as the hot path reads it: a route per listening address.
#[derive(Default)]
pub(crate) struct Compiled {
    pub version: u64,
    pub source: RoutingTable,
    pub routes: HashMap<SocketAddr, Arc<Route>>,
}

impl Compiled {
    pub fn build(table: &RoutingTable, metrics: &Metrics) -> Result<Compiled, String> {
        let mut routes = HashMap::new();
        for svc in &table.services {
            let service: Arc<str> = svc.name.as_str().into();
            let target = |r: &RevisionRoute, weight: u32| Target {
                name: r.name.as_str().into(),
                weight,
                backends: r.backends.clone(),
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
            let main = Route {
                service: service.clone(),
                targets: svc.revisions.iter().map(|r| target(r, r.weight)).collect(),
                counter: AtomicU64::new(0),
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
        let c = Compiled::build(t, &Metrics::default()).expect("valid table");
        let route = c.routes.values().next().expect("one route");
        let mut out = HashMap::new();
        for _ in 0..n {
            let i = route.pick().expect("a target");
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
        let e = Compiled::build(&bad, &Metrics::default())
            .err()
            .expect("refused");
        assert!(e.contains("sum to 90"), "{e}");
    }

    #[test]
    fn backends_rotate() {
        let c = Compiled::build(&table(&[("a", 100, 3)]), &Metrics::default()).expect("valid");
        let route = c.routes.values().next().expect("route");
        let picks: Vec<_> = (0..3)
            .map(|_| route.targets[0].backends_from_next().next())
            .collect();
        assert_eq!(
            picks.iter().collect::<std::collections::HashSet<_>>().len(),
            3
        );
        let order: Vec<_> = route.targets[0].backends_from_next().collect();
        let distinct = order.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 3, "a request tries each instance once");
    }
}

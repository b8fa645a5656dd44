//! Per-revision request counters and latency histograms: lock-free on the hot path,
//! read by the controller as snapshots and by Prometheus as text. The snapshots'
//! types are wire types, in `baton-proxy-api`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proxy_api::control::Unrouted;
pub use baton_proxy_api::metrics::{BUCKETS, RevisionStats, StatsSnapshot};
use baton_proxy_api::metrics::{FINE_BUCKETS, fine_index};

/// Counter sets per revision when the number of data-plane threads is not given
/// (tests): each thread writes its own set, so that threads never write to the same
/// cache line (shared counters bounced between the cores on every request).
const SHARDS: usize = 8;

thread_local! {
    /// This thread's counter set; `usize::MAX` (any thread not of the data plane)
    /// means the last one.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Makes the calling data-plane thread write counter set `i`.
pub fn use_shard(i: usize) {
    SHARD.with(|s| s.set(i));
}

/// The index of a status's class: 1xx..5xx.
fn class(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5)) - 1
}

pub struct RevisionMetrics {
    /// One per data-plane thread and one for every other thread: some 6.6 kB each,
    /// kept while the revision is routed or a request in flight holds it ([`Counters`]).
    shards: Box<[Shard]>,
}

#[repr(align(128))]
struct Shard {
    /// Responses by status class: 1xx..5xx.
    classes: [AtomicU64; 5],
    /// Requests that reached no instance at all (answered 502 by the proxy).
    upstream_errors: AtomicU64,
    /// Connection attempts that failed and were retried elsewhere.
    retries: AtomicU64,
    /// Instances of this revision left out after consecutive failures.
    ejections: AtomicU64,
    /// Copies of requests it answered, answers discarded.
    mirrored: AtomicU64,
    /// Non-cumulative bucket counts; the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// The same latencies, finely: what the judges read. Atomics indexed by a
    /// logarithm, not a sketch crate: the request path takes no lock, and the layout is
    /// part of the counters handed to the next proxy on a hot restart.
    fine: [AtomicU64; FINE_BUCKETS],
    sum_micros: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            classes: Default::default(),
            upstream_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            buckets: Default::default(),
            fine: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl RevisionMetrics {
    fn new(shards: usize) -> Self {
        RevisionMetrics {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
        }
    }
    fn mine(&self) -> &Shard {
        let last = self.shards.len() - 1;
        &self.shards[SHARD.with(|i| i.get()).min(last)]
    }
    pub fn observe(&self, status: u16, seconds: f64) {
        let me = self.mine();
        me.classes[class(status)].fetch_add(1, Ordering::Relaxed);
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        me.buckets[i].fetch_add(1, Ordering::Relaxed);
        me.fine[fine_index(seconds)].fetch_add(1, Ordering::Relaxed);
        me.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
    /// An answer the proxy gave before any instance saw the request (a body too
    /// large or too slow): counted by status, but no latency sample — that time is
    /// the client's, not the revision's.
    pub fn count(&self, status: u16) {
        self.mine().classes[class(status)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn upstream_error(&self) {
        self.mine().upstream_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn retry(&self) {
        self.mine().retries.fetch_add(1, Ordering::Relaxed);
    }
    pub fn ejection(&self) {
        self.mine().ejections.fetch_add(1, Ordering::Relaxed);
    }
    pub fn mirrored(&self) {
        self.mine().mirrored.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> RevisionStats {
        let sum = |f: &dyn Fn(&Shard) -> &AtomicU64| -> u64 {
            self.shards
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum()
        };
        RevisionStats {
            classes: std::array::from_fn(|i| sum(&|s| &s.classes[i])),
            upstream_errors: sum(&|s| &s.upstream_errors),
            retries: sum(&|s| &s.retries),
            ejections: sum(&|s| &s.ejections),
            mirrored: sum(&|s| &s.mirrored),
            buckets: (0..=BUCKETS.len())
                .map(|i| sum(&|s| &s.buckets[i]))
                .collect(),
            sum_seconds: sum(&|s| &s.sum_micros) as f64 / 1e6,
            bounds: Vec::new(),
            fine: (0..FINE_BUCKETS).map(|i| sum(&|s| &s.fine[i])).collect(),
        }
    }
}

/// Writes one revision's counts into a counter set, by `put`: replacing or adding.
fn put_stats(m: &Shard, s: &RevisionStats, put: impl Fn(&AtomicU64, u64)) {
    for (i, n) in s.classes.iter().enumerate() {
        put(&m.classes[i], *n);
    }
    put(&m.upstream_errors, s.upstream_errors);
    put(&m.retries, s.retries);
    put(&m.ejections, s.ejections);
    put(&m.mirrored, s.mirrored);
    for (i, n) in s.buckets.iter().enumerate().take(m.buckets.len()) {
        put(&m.buckets[i], *n);
    }
    // Fine buckets of another layout (another accuracy) would be read as wrong
    // latencies: windows that began before then read the classic ones.
    if s.fine.len() == m.fine.len() {
        for (i, n) in s.fine.iter().enumerate() {
            put(&m.fine[i], *n);
        }
    }
    put(&m.sum_micros, (s.sum_seconds * 1e6) as u64);
}

/// A per-revision counter family: name, help text, and how to read it.
type Counter = (&'static str, &'static str, fn(&RevisionStats) -> u64);

/// How long a revision's counters outlive the last table that routed to it: past its
/// instances' drain and a Prometheus scrape or two, so the last requests are seen.
pub const RETAIN_UNROUTED: Duration = Duration::from_secs(120);

/// A revision's counters: live while a table or a request in flight can count into
/// them, then frozen. A frozen one keeps what Prometheus reads (classes, classic
/// buckets, sums) in some 300 bytes, without the fine histograms: those are only
/// read by judges, and a revision out of every table is judged no more. Kept live
/// until [`RETAIN_UNROUTED`] ran out, the revisions of the last two minutes grew the
/// proxy's heap by 2–3 MB in the chaos soak (fine histograms in every counter set,
/// and again in every snapshot the controller reads), some 35 % of its memory.
enum Counters {
    Live(Arc<RevisionMetrics>),
    Final(Box<RevisionStats>),
}

impl Counters {
    fn snapshot(&self) -> RevisionStats {
        match self {
            Counters::Live(m) => m.snapshot(),
            Counters::Final(s) => (**s).clone(),
        }
    }
}

pub struct Metrics {
    /// Counter sets per revision: the data-plane threads' and one more.
    shards: usize,
    by_revision: Mutex<BTreeMap<(String, String), Counters>>,
    /// Revisions no table routes to, since when.
    unrouted_since: Mutex<HashMap<(String, String), Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(SHARDS - 1)
    }
}

impl Metrics {
    /// Counters for `workers` data-plane threads, thread `i` calling [`use_shard`]`(i)`.
    pub fn new(workers: usize) -> Self {
        Metrics {
            shards: workers + 1,
            by_revision: Mutex::default(),
            unrouted_since: Mutex::default(),
        }
    }

    /// The counters of one revision, created on first use and kept across tables so
    /// a weight change never resets them.
    ///
    /// A frozen revision routed again (an undo to the stack kept warm) comes back to
    /// life with its counts; its fine histograms start over, and windows that began
    /// before then read the classic buckets ([`RevisionStats::fine_complete`]).
    pub fn revision(&self, service: &str, revision: &str) -> Arc<RevisionMetrics> {
        let mut map = self.by_revision.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry((service.to_string(), revision.to_string()))
            .or_insert_with(|| Counters::Live(Arc::new(RevisionMetrics::new(self.shards))));
        match entry {
            Counters::Live(m) => m.clone(),
            Counters::Final(s) => {
                let m = Arc::new(RevisionMetrics::new(self.shards));
                put_stats(&m.shards[0], s, |a, n| a.store(n, Ordering::Relaxed));
                *entry = Counters::Live(m.clone());
                m
            }
        }
    }

    /// Freezes the counters of revisions out of every table that nothing can count
    /// into any more: the map holds the only reference, so no table routes to them
    /// and no request in flight (a draining answer, a gRPC stream) still holds them.
    fn freeze_unrouted(
        map: &mut BTreeMap<(String, String), Counters>,
        since: &HashMap<(String, String), Instant>,
    ) {
        for (k, c) in map.iter_mut() {
            if let Counters::Live(m) = c
                && since.contains_key(k)
                && Arc::strong_count(m) == 1
            {
                let mut s = m.snapshot();
                s.fine = Vec::new();
                *c = Counters::Final(Box::new(s));
            }
        }
    }

    /// Forgets the counters of revisions that no table has named for `keep`, and
    /// freezes those nothing can count into. Kept for every revision ever routed they
    /// grew the proxy by every deploy (and every stats read, and the exposition's
    /// series, with it).
    pub fn retire(&self, in_table: &HashSet<(String, String)>, now: Instant, keep: Duration) {
        let mut map = self.by_revision.lock().unwrap_or_else(|p| p.into_inner());
        let mut since = self
            .unrouted_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for k in map.keys() {
            if in_table.contains(k) {
                since.remove(k);
            } else {
                since.entry(k.clone()).or_insert(now);
            }
        }
        map.retain(|k, _| {
            since
                .get(k)
                .is_none_or(|t| now.saturating_duration_since(*t) < keep)
        });
        since.retain(|k, _| map.contains_key(k));
        Self::freeze_unrouted(&mut map, &since);
    }

    /// The revisions out of every table, with how long they have been (for the next
    /// process of a hot restart).
    pub fn unrouted(&self, now: Instant) -> Vec<Unrouted> {
        let since = self
            .unrouted_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        since
            .iter()
            .map(|((service, revision), t)| Unrouted {
                service: service.clone(),
                revision: revision.clone(),
                for_ms: now.saturating_duration_since(*t).as_millis() as u64,
            })
            .collect()
    }

    /// Takes over how long the previous process had these revisions out of every
    /// table, so that a hot restart does not keep them longer.
    pub fn carry_unrouted(&self, unrouted: &[Unrouted], now: Instant) {
        let mut since = self
            .unrouted_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for u in unrouted {
            let t = now
                .checked_sub(Duration::from_millis(u.for_ms))
                .unwrap_or(now);
            let e = since
                .entry((u.service.clone(), u.revision.clone()))
                .or_insert(t);
            *e = (*e).min(t);
        }
    }

    /// Starts from another process's counters (hot restart), so that rates and
    /// analysis windows see no reset.
    pub fn seed(&self, from: &StatsSnapshot) {
        self.carry(from, |a, n| a.store(n, Ordering::Relaxed));
    }

    /// Adds another process's counts (what an old process finished while draining
    /// after a hot restart).
    pub fn add(&self, more: &StatsSnapshot) {
        self.carry(more, |a, n| {
            a.fetch_add(n, Ordering::Relaxed);
        });
    }

    /// Writes another process's counters into one shard each (snapshots sum the
    /// shards), by `put`: replacing or adding.
    fn carry(&self, from: &StatsSnapshot, put: impl Fn(&AtomicU64, u64)) {
        for (svc, revs) in from {
            for (rev, s) in revs {
                // A frozen revision comes back to life for it, and is frozen again by
                // the next snapshot or table.
                put_stats(&self.revision(svc, rev).shards[0], s, &put);
            }
        }
    }

    /// Every revision's counters; freezes first those nothing can count into any
    /// more, so that a revision is not kept live until the next table comes.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut map = self.by_revision.lock().unwrap_or_else(|p| p.into_inner());
        {
            let since = self
                .unrouted_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Self::freeze_unrouted(&mut map, &since);
        }
        let mut out = StatsSnapshot::new();
        for ((svc, rev), m) in map.iter() {
            out.entry(svc.clone())
                .or_default()
                .insert(rev.clone(), m.snapshot());
        }
        out
    }

    /// Whether a revision's counters are live (not frozen); for tests.
    #[cfg(test)]
    fn is_live(&self, service: &str, revision: &str) -> bool {
        let map = self.by_revision.lock().unwrap_or_else(|p| p.into_inner());
        matches!(
            map.get(&(service.to_string(), revision.to_string())),
            Some(Counters::Live(_))
        )
    }

    /// Prometheus text exposition format, written from the atomics the request path
    /// bumps: a metrics crate's registry would put its own counters on that path.
    pub fn render(&self, table_version: u64, active_connections: u64, websockets: u64) -> String {
        let snap = self.snapshot();
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP http_requests_total Requests answered through the proxy, by revision and status class."
        );
        let _ = writeln!(o, "# TYPE http_requests_total counter");
        for (svc, revs) in &snap {
            for (rev, s) in revs {
                for (i, n) in s.classes.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "http_requests_total{{service=\"{svc}\",version=\"{rev}\",code=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        let _ = writeln!(
            o,
            "# HELP http_request_duration_seconds Time an instance of the revision took to answer: from the request, its body already received from the client, being sent to the instance, to the response headers. A client's slow upload is not in it."
        );
        let _ = writeln!(o, "# TYPE http_request_duration_seconds histogram");
        for (svc, revs) in &snap {
            for (rev, s) in revs {
                let mut cum = 0;
                for (i, n) in s.buckets.iter().enumerate() {
                    cum += n;
                    let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                    let _ = writeln!(
                        o,
                        "http_request_duration_seconds_bucket{{service=\"{svc}\",version=\"{rev}\",le=\"{le}\"}} {cum}"
                    );
                }
                let _ = writeln!(
                    o,
                    "http_request_duration_seconds_sum{{service=\"{svc}\",version=\"{rev}\"}} {}",
                    s.sum_seconds
                );
                let _ = writeln!(
                    o,
                    "http_request_duration_seconds_count{{service=\"{svc}\",version=\"{rev}\"}} {cum}"
                );
            }
        }
        let counters: [Counter; 4] = [
            (
                "baton_proxy_upstream_errors_total",
                "Requests that reached no instance (answered 502).",
                |s| s.upstream_errors,
            ),
            (
                "baton_proxy_retries_total",
                "Connection attempts retried on another instance.",
                |s| s.retries,
            ),
            (
                "baton_proxy_ejections_total",
                "Instances left out after consecutive failures.",
                |s| s.ejections,
            ),
            (
                "baton_proxy_mirrored_total",
                "Copies of stable's requests answered by this revision (answers discarded).",
                |s| s.mirrored,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            for (svc, revs) in &snap {
                for (rev, s) in revs {
                    let _ = writeln!(
                        o,
                        "{name}{{service=\"{svc}\",version=\"{rev}\"}} {}",
                        value(s)
                    );
                }
            }
        }
        let _ = writeln!(
            o,
            "# HELP baton_proxy_routing_table_version Version of the routing table in force."
        );
        let _ = writeln!(o, "# TYPE baton_proxy_routing_table_version gauge");
        let _ = writeln!(o, "baton_proxy_routing_table_version {table_version}");
        let _ = writeln!(
            o,
            "# HELP baton_proxy_active_connections Client connections open now."
        );
        let _ = writeln!(o, "# TYPE baton_proxy_active_connections gauge");
        let _ = writeln!(o, "baton_proxy_active_connections {active_connections}");
        let _ = writeln!(
            o,
            "# HELP baton_proxy_websocket_sessions WebSocket tunnels open now."
        );
        let _ = writeln!(o, "# TYPE baton_proxy_websocket_sessions gauge");
        let _ = writeln!(o, "baton_proxy_websocket_sessions {websockets}");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revision_out_of_every_table_is_forgotten_after_a_while() {
        let m = Metrics::default();
        let key = |r: &str| ("svc".to_string(), r.to_string());
        m.revision("svc", "v1").observe(200, 0.01);
        m.revision("svc", "v2").observe(200, 0.01);
        let t0 = Instant::now();
        let keep = Duration::from_secs(120);
        let both: HashSet<_> = [key("v1"), key("v2")].into();
        let v2: HashSet<_> = [key("v2")].into();
        let names = |m: &Metrics| m.snapshot()["svc"].keys().cloned().collect::<Vec<_>>();
        m.retire(&both, t0, keep);
        m.retire(&v2, t0 + Duration::from_secs(1), keep);
        m.retire(&v2, t0 + Duration::from_secs(100), keep);
        assert_eq!(names(&m), ["v1", "v2"], "kept for its last scrapes");
        // Routed again meanwhile: its clock starts over.
        m.retire(&both, t0 + Duration::from_secs(110), keep);
        m.retire(&v2, t0 + Duration::from_secs(120), keep);
        m.retire(&v2, t0 + Duration::from_secs(200), keep);
        assert_eq!(names(&m), ["v1", "v2"]);
        m.retire(&v2, t0 + Duration::from_secs(241), keep);
        assert_eq!(names(&m), ["v2"]);
        assert_eq!(m.snapshot()["svc"]["v2"].requests(), 1);
    }

    /// Out of every table and held by nothing else, a revision's counters are frozen
    /// without their fine histograms (each counter set's 6.6 kB, and again in every
    /// snapshot), and what Prometheus reads of them stays the same.
    #[test]
    fn a_revision_nothing_can_count_into_is_frozen_with_its_counts() {
        let m = Metrics::new(2);
        let key = |r: &str| ("svc".to_string(), r.to_string());
        let v2: HashSet<_> = [key("v2")].into();
        let t0 = Instant::now();
        let keep = Duration::from_secs(120);
        m.revision("svc", "v2").observe(200, 0.01);
        // A request still in flight to v1 holds its counters.
        let in_flight = m.revision("svc", "v1");
        in_flight.observe(500, 0.2);
        m.retire(&v2, t0, keep);
        assert!(
            m.is_live("svc", "v1"),
            "a request in flight can still count"
        );
        in_flight.observe(200, 0.02);
        let before = m.snapshot()["svc"]["v1"].clone();
        assert_eq!(before.fine.iter().sum::<u64>(), 2);
        let text = m.render(1, 0, 0);
        drop(in_flight);
        let after = m.snapshot()["svc"]["v1"].clone();
        assert!(!m.is_live("svc", "v1"), "frozen by the next snapshot");
        assert!(m.is_live("svc", "v2"), "a routed revision stays live");
        assert!(after.fine.is_empty());
        assert_eq!(
            after,
            RevisionStats {
                fine: Vec::new(),
                ..before
            }
        );
        assert_eq!(m.render(1, 0, 0), text, "Prometheus reads the same");
        // Still forgotten once its two minutes are over.
        m.retire(&v2, t0 + Duration::from_secs(121), keep);
        assert_eq!(m.snapshot()["svc"].keys().collect::<Vec<_>>(), ["v2"]);
    }

    /// An undo routes the stack kept warm again: its counters go on from where they
    /// were, and windows that begin after it read its fine histograms again.
    #[test]
    fn a_frozen_revision_routed_again_counts_on() {
        let m = Metrics::new(2);
        let key = |r: &str| ("svc".to_string(), r.to_string());
        let t0 = Instant::now();
        let keep = Duration::from_secs(120);
        for _ in 0..3 {
            m.revision("svc", "v1").observe(200, 0.01);
        }
        m.retire(&HashSet::new(), t0, keep);
        assert!(!m.is_live("svc", "v1"));
        let frozen = m.snapshot()["svc"]["v1"].clone();
        let back = m.revision("svc", "v1");
        m.retire(&[key("v1")].into(), t0 + Duration::from_secs(5), keep);
        back.observe(200, 0.01);
        back.observe(500, 0.01);
        let now = m.snapshot()["svc"]["v1"].clone();
        assert_eq!(now.requests(), 5);
        assert_eq!(now.classes[4], 1);
        let since_undo = now.since(&frozen);
        assert_eq!(since_undo.requests(), 2);
        assert!(since_undo.fine_complete().is_some(), "{since_undo:?}");
        assert!(m.is_live("svc", "v1"));
    }

    /// The soak restarts the proxy every 45 s or so: with each new process starting
    /// the two minutes again, no revision was ever forgotten.
    #[test]
    fn a_hot_restart_keeps_how_long_a_revision_has_been_out_of_every_table() {
        let key = |r: &str| ("svc".to_string(), r.to_string());
        let keep = Duration::from_secs(120);
        let v2: HashSet<_> = [key("v2")].into();
        let names = |m: &Metrics| m.snapshot()["svc"].keys().cloned().collect::<Vec<_>>();
        let old = Metrics::default();
        old.revision("svc", "v1").observe(200, 0.01);
        old.revision("svc", "v2").observe(200, 0.01);
        let t0 = Instant::now();
        old.retire(&v2, t0, keep);
        let t1 = t0 + Duration::from_secs(100);
        let handed = old.unrouted(t1);
        assert_eq!(handed.len(), 1);
        assert_eq!(
            (handed[0].revision.as_str(), handed[0].for_ms),
            ("v1", 100_000)
        );
        let new = Metrics::default();
        new.seed(&old.snapshot());
        new.carry_unrouted(&handed, t1);
        new.retire(&v2, t1, keep);
        new.retire(&v2, t1 + Duration::from_secs(19), keep);
        assert_eq!(names(&new), ["v1", "v2"]);
        new.retire(&v2, t1 + Duration::from_secs(21), keep);
        assert_eq!(names(&new), ["v2"], "kept past its two minutes");
    }

    /// A counter set per data-plane thread and one for the rest, and no more: each is
    /// 6.6 kB per revision, eight of them were kept on a two-core machine.
    #[test]
    fn each_data_plane_thread_counts_in_a_set_of_its_own() {
        let m = Metrics::new(2);
        let r = m.revision("svc", "v1");
        assert_eq!(r.shards.len(), 3);
        std::thread::scope(|s| {
            for i in [0, 1] {
                let r = &r;
                s.spawn(move || {
                    use_shard(i);
                    for _ in 0..=i {
                        r.observe(200, 0.01);
                    }
                });
            }
        });
        r.observe(500, 0.01);
        let per_set: Vec<u64> = r
            .shards
            .iter()
            .map(|s| s.classes.iter().map(|c| c.load(Ordering::Relaxed)).sum())
            .collect();
        assert_eq!(per_set, [1, 2, 1]);
        assert_eq!(r.snapshot().requests(), 4);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let m = RevisionMetrics::new(SHARDS);
        for _ in 0..99 {
            m.observe(200, 0.004);
        }
        m.observe(500, 0.95);
        let s = m.snapshot();
        assert_eq!(s.requests(), 100);
        assert_eq!(s.error_rate(), Some(0.01));
        // 99 of 100 in (0.0025, 0.005]: p50 interpolates inside that bucket.
        let p50 = s.quantile(0.5).expect("data");
        assert!((0.0025..=0.005).contains(&p50), "{p50}");
        let p999 = s.quantile(0.999).expect("data");
        assert!((0.9..=1.0).contains(&p999), "{p999}");
        assert_eq!(RevisionStats::default().quantile(0.99), None);
    }

    #[test]
    fn a_seed_keeps_fine_buckets_of_this_layout_only() {
        let from = Metrics::default();
        for _ in 0..20 {
            from.revision("web", "v1").observe(200, 0.004);
        }
        let mut snap = from.snapshot();
        let fresh = Metrics::default();
        fresh.seed(&snap);
        assert_eq!(fresh.snapshot(), snap, "same layout: carried whole");
        // Another layout (an earlier build's 400 buckets): classic counters only.
        let v1 = snap
            .get_mut("web")
            .and_then(|r| r.get_mut("v1"))
            .expect("v1");
        v1.fine = vec![1; 400];
        let other = Metrics::default();
        other.seed(&snap);
        let got = &other.snapshot()["web"]["v1"];
        assert_eq!(got.requests(), 20);
        assert_eq!(got.fine.iter().sum::<u64>(), 0);
        assert!(got.fine_complete().is_none());
    }

    #[test]
    fn windows_subtract() {
        let m = RevisionMetrics::new(SHARDS);
        m.observe(500, 0.01);
        let a = m.snapshot();
        for _ in 0..10 {
            m.observe(200, 0.01);
        }
        let w = m.snapshot().since(&a);
        assert_eq!(w.requests(), 10);
        assert_eq!(w.error_rate(), Some(0.0));
    }

    #[test]
    fn text_format_has_conventional_names() {
        let metrics = Metrics::default();
        metrics.revision("hello", "abc").observe(200, 0.02);
        let text = metrics.render(7, 1, 0);
        assert!(
            text.contains("http_requests_total{service=\"hello\",version=\"abc\",code=\"2xx\"} 1")
        );
        assert!(text.contains(
            "http_request_duration_seconds_bucket{service=\"hello\",version=\"abc\",le=\"0.025\"} 1"
        ));
        assert!(text.contains(
            "http_request_duration_seconds_bucket{service=\"hello\",version=\"abc\",le=\"+Inf\"} 1"
        ));
        assert!(
            text.contains(
                "http_request_duration_seconds_count{service=\"hello\",version=\"abc\"} 1"
            )
        );
        assert!(text.contains("baton_proxy_routing_table_version 7"));
        // Which time the histogram holds is said where it is read.
        assert!(text.contains("# HELP http_request_duration_seconds Time an instance"));
        assert!(text.contains("slow upload is not in it"));
    }
}

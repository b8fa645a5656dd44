//! The built-in provider: windows over the proxy's per-revision counters.
//!
//! A window starts at the first measurement of a gate on a revision and grows until it
//! holds `minRequests`; only then is it judged and a new window begun. So a canary at
//! 2 % of little traffic is judged on enough requests, later, rather than on three.
//!
//! A `continuous` error-rate gate is also measured on every cycle: its conditions and
//! its comparison with stable become sequential tests (`sequential.rs`) that fail the
//! canary the moment the evidence crosses the gate's bound, while the window above
//! still gives the verdict at each interval. A window whose point estimate misses the
//! conditions is then inconclusive, not failed, until the sequential test agrees: a
//! fixed threshold on a small window fails healthy versions by chance.

use std::collections::HashMap;

use baton_engine::{Measurement, Millis, Verdict};
use baton_proxy_api::RevisionStats;
use baton_spec::{BuiltinMetric, BurnRate, Compare, Gate, Judging, MetricSource};

use crate::sequential::{Bernoulli, RateRatio, log_threshold};
use crate::threshold::judge;
use baton_proxy_api::metrics::{fine_bounds, fine_index, fine_quantile};

/// (time, requests, errors) of a revision at one measurement.
type Snapshot = (Millis, u64, u64);

#[derive(Default)]
pub struct Measurer {
    /// (rollout, revision) → (time, requests, errors) at each burn-rate measurement.
    series: HashMap<(String, String), Vec<Snapshot>>,
    /// (rollout, gate, revision, epoch) → counters of the canary (and of stable, when
    /// the gate compares) at the window's start.
    windows: HashMap<(String, String, String, u64), (RevisionStats, RevisionStats)>,
    /// (rollout, gate, revision, epoch) → the sequential tests of a continuous gate.
    sequential: HashMap<(String, String, String, u64), Sequential>,
}

/// The sequential tests of one gate on one revision.
struct Sequential {
    /// Against the gate's conditions, when they bound the metric from above: for error
    /// rates, on errors; for a latency quantile `q` under a bound `b`, on the requests
    /// slower than `b` (at most `1 - q` of them under H0).
    threshold: Option<Bernoulli>,
    /// Against stable times the allowed ratio: for error rates, on errors; for a
    /// latency quantile, on the canary's requests slower than `factor` times stable's
    /// quantile against stable's requests slower than that quantile.
    ratio: Option<RateRatio>,
    /// Whether the tests cover every way the window's judgment can fail the canary.
    covers_all: bool,
    /// Counters of the canary and stable when last read.
    last: (RevisionStats, RevisionStats),
    latency: Option<Latency>,
}

/// What a latency gate's tests keep: the quantile, the conditions' bound, the
/// allowed factor over stable, and the fine counts since the tests began.
struct Latency {
    q: f64,
    bound: Option<f64>,
    factor: Option<f64>,
    canary: Vec<u64>,
    stable: Vec<u64>,
}

fn quantile_of(metric: BuiltinMetric) -> Option<f64> {
    match metric {
        BuiltinMetric::ErrorRate => None,
        BuiltinMetric::LatencyP50 => Some(0.5),
        BuiltinMetric::LatencyP90 => Some(0.9),
        BuiltinMetric::LatencyP99 => Some(0.99),
    }
}

fn add(into: &mut Vec<u64>, more: &[u64]) {
    if into.len() < more.len() {
        into.resize(more.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(more) {
        *a += b;
    }
}

impl Sequential {
    fn new(
        gate: &Gate,
        metric: BuiltinMetric,
        current: &RevisionStats,
        stable: &RevisionStats,
    ) -> Self {
        let q = quantile_of(metric);
        let bound = condition_bound(gate, if q.is_some() { LATENCY_RANGE } else { 1.0 });
        let has_conditions = gate.success_condition.is_some() || gate.failure_condition.is_some();
        let ratio_of =
            gate.compare
                .as_ref()
                .and_then(|c| match (c.max_increase_percent, c.max_increase) {
                    (Some(p), None) => Some(1.0 + p / 100.0),
                    _ => None,
                });
        let statistical = gate.statistical.as_ref().map(|st| {
            (st.direction == baton_spec::Direction::Increase).then_some(1.0 + st.tolerance)
        });
        let ratio = ratio_of.or(statistical.flatten());
        // A latency gate's statistical judges also look at the shape of the tail,
        // which the quantile's test does not: their failures stand.
        let covers_all = (!has_conditions || bound.is_some())
            && (gate.compare.is_none() || ratio_of.is_some())
            && statistical.is_none_or(|s| s.is_some() && q.is_none());
        let latency = q.map(|q| Latency {
            q,
            bound,
            factor: ratio,
            canary: Vec::new(),
            stable: Vec::new(),
        });
        Sequential {
            threshold: bound.map(|b| match q {
                // Conditions that pass any latency never fail.
                Some(q) => Bernoulli::new(if b >= LATENCY_RANGE { 1.0 } else { 1.0 - q }),
                None => Bernoulli::new(b),
            }),
            // Latency: the canary's share of "slower than" events is at most its share
            // of requests under H0, whatever the factor (it is in the events).
            ratio: ratio.map(|r| RateRatio::new(if q.is_some() { 1.0 } else { r })),
            covers_all,
            last: (current.clone(), stable.clone()),
            latency,
        }
    }

    /// Feeds one cycle's requests to the tests; the reason when one of them fails the
    /// canary at the gate's bound (`need`, a natural log).
    fn observe(
        &mut self,
        gate: &Gate,
        dc: &RevisionStats,
        ds: &RevisionStats,
        need: f64,
    ) -> Option<String> {
        let sure = gate.confidence * 100.0;
        let Some(l) = &mut self.latency else {
            let mut failed = None;
            if let Some(t) = &mut self.threshold {
                t.observe(dc.requests(), dc.classes[4]);
                if t.log_evidence() >= need {
                    failed = Some(format!(
                        "error_rate {:.4} over {} requests: sequential test {sure:.0} % sure it exceeds {:.4} (evidence {} of {} needed)",
                        rate(t.errors, t.requests),
                        t.requests,
                        t.p0(),
                        evidence(t.log_evidence()),
                        evidence(need),
                    ));
                }
            }
            if let Some(t) = &mut self.ratio {
                t.observe(
                    (dc.requests(), dc.classes[4]),
                    (ds.requests(), ds.classes[4]),
                );
                if failed.is_none() && t.log_evidence() >= need {
                    failed = Some(format!(
                        "error_rate {:.4} over {} requests against stable's {:.4} over {}: sequential test {sure:.0} % sure it exceeds stable's x {:.2} (evidence {} of {} needed)",
                        rate(t.canary.1, t.canary.0),
                        t.canary.0,
                        rate(t.stable.1, t.stable.0),
                        t.stable.0,
                        t.rho(),
                        evidence(t.log_evidence()),
                        evidence(need),
                    ));
                }
            }
            return failed;
        };
        // Latency is read from the fine histogram only: the classic buckets are too
        // coarse to tell a 5 % shift (a cluster's router histogram has none).
        let canary = dc.fine_complete().unwrap_or(&[]);
        let stable = ds.fine_complete().unwrap_or(&[]);
        let name = format!("latency_p{}", (l.q * 100.0).round());
        // The window's guard against "a quantile of a handful": a p99 needs 100.
        let needed = gate.min_requests.max((1.0 / (1.0 - l.q)).round() as u64);
        let mut failed = None;
        if let (Some(t), Some(b)) = (&mut self.threshold, l.bound) {
            let n: u64 = canary.iter().sum();
            let slower: u64 = canary
                .iter()
                .enumerate()
                .filter(|(i, _)| fine_bounds(*i).0 >= b)
                .map(|(_, n)| n)
                .sum();
            t.observe(n, slower);
            if t.requests >= needed && t.log_evidence() >= need {
                failed = Some(format!(
                    "{name}: {} of {} requests slower than {b:.4} s: sequential test {sure:.0} % sure the {name} exceeds {b:.4} s (evidence {} of {} needed)",
                    t.errors,
                    t.requests,
                    evidence(t.log_evidence()),
                    evidence(need),
                ));
            }
        }
        if let (Some(t), Some(f)) = (&mut self.ratio, l.factor) {
            // Stable's quantile from what came before this cycle, so that the events
            // are fixed before the requests they count are seen; with at least ten
            // expected above it.
            let enough = (10.0 / (1.0 - l.q)).ceil() as u64;
            if l.stable.iter().sum::<u64>() >= enough
                && let Some(sq) = fine_quantile(&l.stable, l.q)
            {
                // Events start at a bucket's lower bound: stable's at the bound of the
                // bucket holding its quantile, the canary's at the first bound at
                // least `f` times that.
                let cut = fine_index(sq);
                let from = fine_bounds(cut).0 * f * (1.0 - 1e-9);
                let count = |h: &[u64], keep: &dyn Fn(usize) -> bool| -> u64 {
                    h.iter()
                        .enumerate()
                        .filter(|(i, _)| keep(*i))
                        .map(|(_, n)| n)
                        .sum()
                };
                // Under H0 a canary request is at or above `from` no more often than
                // a stable one is at or above the bound `from / f`.
                let ce = count(canary, &|i| fine_bounds(i).0 >= from);
                let se = count(stable, &|i| i >= cut);
                t.observe((canary.iter().sum(), ce), (stable.iter().sum(), se));
                if failed.is_none() && t.canary.0 >= needed && t.log_evidence() >= need {
                    failed = Some(format!(
                        "{name}: {} of {} requests slower than {f:.2} x stable's {name} ({sq:.4} s), against {} of stable's {}: sequential test {sure:.0} % sure the {name} exceeds stable's x {f:.2} (evidence {} of {} needed)",
                        t.canary.1,
                        t.canary.0,
                        t.stable.1,
                        t.stable.0,
                        evidence(t.log_evidence()),
                        evidence(need),
                    ));
                }
            }
        }
        add(&mut l.canary, canary);
        add(&mut l.stable, stable);
        failed
    }

    /// The canary's value over the tests' requests, and how many.
    fn value(&self) -> (f64, u64) {
        if let Some(l) = &self.latency {
            return (
                fine_quantile(&l.canary, l.q).unwrap_or(0.0),
                l.canary.iter().sum(),
            );
        }
        self.threshold
            .as_ref()
            .map(|t| (rate(t.errors, t.requests), t.requests))
            .or_else(|| {
                self.ratio
                    .as_ref()
                    .map(|t| (rate(t.canary.1, t.canary.0), t.canary.0))
            })
            .unwrap_or_default()
    }
}

/// The range latency bounds are looked for in (seconds): the fine histogram's.
const LATENCY_RANGE: f64 = 300.0;

/// The value above which the gate's conditions fail, when they fail exactly the values
/// above one (`result < 0.05`, `result <= 0.01`, a failure condition `result > 0.1`)
/// within `0..=max`; `None` for any other shape. Found by bisection on the conditions
/// themselves, so any expression `evalexpr` takes works.
fn condition_bound(gate: &Gate, max: f64) -> Option<f64> {
    if gate.success_condition.is_none() && gate.failure_condition.is_none() {
        return None;
    }
    let passes = |v: f64| judge(gate, v).0 == Verdict::Pass;
    if !passes(0.0) {
        return None;
    }
    let (mut lo, mut hi) = (0.0_f64, max);
    if passes(max) {
        lo = max;
    }
    while hi - lo > max * 1e-12 {
        let mid = (lo + hi) / 2.0;
        if passes(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // Monotone: every value below passes, every value above fails (checked on a
    // linear and a logarithmic grid).
    let linear = (0..=100).map(|i| f64::from(i) / 100.0 * max);
    let log = (0..=60).map(|i| max * 0.8_f64.powi(i));
    let monotone = linear
        .chain(log)
        .all(|v| (v <= lo && passes(v)) || (v >= hi && !passes(v)) || (v > lo && v < hi));
    monotone.then_some(lo)
}

fn value_of(metric: BuiltinMetric, window: &RevisionStats) -> Option<f64> {
    match metric {
        BuiltinMetric::ErrorRate => window.error_rate(),
        BuiltinMetric::LatencyP50 => window.quantile(0.50),
        BuiltinMetric::LatencyP90 => window.quantile(0.90),
        BuiltinMetric::LatencyP99 => window.quantile(0.99),
    }
}

impl Measurer {
    /// Drops what it keeps for the rollout's revisions that `live` says are gone (all of
    /// them when the rollout is): a window holds two fine histograms, and one kept per
    /// revision ever analysed grew the controller by every rollout.
    pub fn retain(&mut self, rollout: &str, live: &dyn Fn(&str) -> bool) {
        self.series.retain(|(r, rev), _| r != rollout || live(rev));
        self.windows
            .retain(|(r, _, rev, _), _| r != rollout || live(rev));
        self.sequential
            .retain(|(r, _, rev, _), _| r != rollout || live(rev));
    }

    /// What it holds, for tests: series, windows, sequential tests.
    #[cfg(test)]
    fn held(&self) -> (usize, usize, usize) {
        (self.series.len(), self.windows.len(), self.sequential.len())
    }

    /// One measurement of `gate` on `revision` from its current counters; `stable`
    /// holds the stable revision's current counters, used when the gate compares.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &mut self,
        rollout: &str,
        gate: &Gate,
        revision: &str,
        epoch: u64,
        due: bool,
        current: &RevisionStats,
        stable: Option<&RevisionStats>,
        now: Millis,
    ) -> Option<Measurement> {
        let key = (
            rollout.to_string(),
            gate.name.clone(),
            revision.to_string(),
            epoch,
        );
        // Windows of older epochs will never be read again.
        self.windows
            .retain(|k, _| !(k.0 == key.0 && k.1 == key.1 && k.2 == key.2 && k.3 != epoch));
        self.sequential
            .retain(|k, _| !(k.0 == key.0 && k.1 == key.1 && k.2 == key.2 && k.3 != epoch));
        let continuous = gate.judging == Judging::Continuous && gate.burn_rate.is_none();
        let metric = match (&gate.metric, continuous) {
            (MetricSource::Builtin(m), true) => *m,
            _ => return due.then(|| self.window(&key, gate, current, stable, now)),
        };
        let stable_now = stable.cloned().unwrap_or_default();
        let Some(seq) = self.sequential.get_mut(&key) else {
            if !due {
                // The gate's first measurement (after its initialDelay) starts it.
                return None;
            }
            self.sequential.insert(
                key.clone(),
                Sequential::new(gate, metric, current, &stable_now),
            );
            // Opens the window; nothing to tell yet.
            self.window(&key, gate, current, stable, now);
            return None;
        };
        let (dc, ds) = (current.since(&seq.last.0), stable_now.since(&seq.last.1));
        seq.last = (current.clone(), stable_now.clone());
        let tests = usize::from(seq.threshold.is_some()) + usize::from(seq.ratio.is_some());
        // Two tests on one gate share its error bound.
        let alpha = (1.0 - gate.confidence) / tests.max(1) as f64;
        let need = log_threshold(1.0 - alpha);
        if let Some(detail) = seq.observe(gate, &dc, &ds, need) {
            let (value, requests) = seq.value();
            // A failure is one test's verdict; the next one starts afresh.
            let fresh = Sequential::new(gate, metric, current, &stable_now);
            self.sequential.insert(key.clone(), fresh);
            return Some(Measurement {
                gate: gate.name.clone(),
                revision: revision.to_string(),
                verdict: Verdict::Fail,
                value: Some(value),
                requests,
                at: now,
                detail,
            });
        }
        if !due {
            return None;
        }
        let covers_all = seq.covers_all;
        let strongest = [
            seq.threshold.as_ref().map(Bernoulli::log_evidence),
            seq.ratio.as_ref().map(RateRatio::log_evidence),
        ]
        .into_iter()
        .flatten()
        .fold(f64::NEG_INFINITY, f64::max);
        let mut m = self.window(&key, gate, current, stable, now);
        if m.verdict == Verdict::Fail && covers_all {
            m.verdict = Verdict::Inconclusive;
            m.detail = format!(
                "{}; not yet significant (sequential evidence {} of {} needed)",
                m.detail,
                evidence(strongest),
                evidence(need)
            );
        }
        Some(m)
    }

    /// The window judgment: at each interval, over at least `minRequests`.
    fn window(
        &mut self,
        key: &(String, String, String, u64),
        gate: &Gate,
        current: &RevisionStats,
        stable: Option<&RevisionStats>,
        now: Millis,
    ) -> Measurement {
        let revision = key.2.as_str();
        let rollout = key.0.as_str();
        let key = key.clone();
        let m = |verdict, value, requests, detail: String| Measurement {
            gate: gate.name.clone(),
            revision: revision.to_string(),
            verdict,
            value,
            requests,
            at: now,
            detail,
        };
        let metric = match &gate.metric {
            MetricSource::Builtin(metric) => *metric,
            // The window's size is counted in requests, whatever the card holds.
            MetricSource::Scorecard(_) => BuiltinMetric::ErrorRate,
            _ => return m(Verdict::Error, None, 0, "not a builtin metric".into()),
        };
        if let Some(b) = &gate.burn_rate {
            let series = self
                .series
                .entry((rollout.to_string(), revision.to_string()))
                .or_default();
            series.push((now, current.requests(), current.classes[4]));
            // Keep what the longest window needs: the last snapshot before it, and after.
            let longest = b
                .windows
                .iter()
                .map(|w| w.long.as_millis())
                .max()
                .unwrap_or(0);
            while series.len() > 2 && series[1].0 <= now.saturating_sub(longest) {
                series.remove(0);
            }
            let (verdict, value, n, detail) = burn(b, gate.min_requests, series, now);
            return m(verdict, value, n, detail);
        }
        let stable_now = stable.cloned().unwrap_or_default();
        let Some((start, stable_start)) = self.windows.get(&key) else {
            self.windows.insert(key, (current.clone(), stable_now));
            return m(
                Verdict::Inconclusive,
                None,
                0,
                "measurement window opened".into(),
            );
        };
        let window = current.since(start);
        let n = window.requests();
        // A quantile of fewer than 1/(1-q) requests is just the slowest one: a p99 needs
        // 100, so a handful of slow requests cannot pass for a slow version.
        let needed = match metric {
            BuiltinMetric::LatencyP99
                if gate.success_condition.is_some() || gate.failure_condition.is_some() =>
            {
                gate.min_requests.max(100)
            }
            BuiltinMetric::LatencyP90
                if gate.success_condition.is_some() || gate.failure_condition.is_some() =>
            {
                gate.min_requests.max(10)
            }
            _ => gate.min_requests,
        };
        if n < needed {
            return m(
                Verdict::Inconclusive,
                None,
                n,
                format!("{n} request(s) in the window, {needed} needed"),
            );
        }
        let compares = gate.compare.is_some() || gate.statistical.is_some();
        let baseline = compares.then(|| stable_now.since(stable_start));
        if let Some(b) = &baseline
            && b.requests() < gate.min_requests
        {
            return m(
                Verdict::Inconclusive,
                None,
                n,
                format!(
                    "stable has {} request(s) in the window, {} needed to compare",
                    b.requests(),
                    gate.min_requests
                ),
            );
        }
        self.windows.insert(key, (current.clone(), stable_now));
        if let (MetricSource::Scorecard(metrics), Some(st), Some(b)) =
            (&gate.metric, &gate.statistical, &baseline)
        {
            let (verdict, score, detail) = crate::statistical::scorecard(st, metrics, &window, b);
            return m(
                verdict,
                score,
                n,
                format!("scorecard over {n} requests: {detail}"),
            );
        }
        let Some(v) = value_of(metric, &window) else {
            return m(Verdict::Inconclusive, None, n, "no data".into());
        };
        let name = metric.as_str();
        let (mut verdict, mut detail) =
            if gate.success_condition.is_some() || gate.failure_condition.is_some() {
                judge(gate, v)
            } else {
                (Verdict::Pass, format!("result {v:.4}"))
            };
        if let (Some(c), Some(b)) = (&gate.compare, &baseline) {
            let Some(sv) = value_of(metric, b) else {
                return m(
                    Verdict::Inconclusive,
                    Some(v),
                    n,
                    "no stable data to compare with".into(),
                );
            };
            let (ok, text) = compare(c, v, sv);
            if !ok {
                verdict = Verdict::Fail;
            }
            detail = format!("{detail}; {text}");
        }
        if let (Some(st), Some(b)) = (&gate.statistical, &baseline) {
            let (ok, text) = crate::statistical::judge(st, metric, &window, b);
            if !ok {
                verdict = Verdict::Fail;
            }
            detail = format!("{detail}; {text}");
        }
        m(
            verdict,
            Some(v),
            n,
            format!("{name} over {n} requests: {detail}"),
        )
    }
}

fn rate(errors: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}

/// Evidence (an e-value) for a message: `12`, `3.4e5`.
fn evidence(log: f64) -> String {
    let e = log.exp();
    if e >= 1e4 {
        format!("{e:.1e}")
    } else if e >= 10.0 {
        format!("{e:.0}")
    } else {
        format!("{e:.2}")
    }
}

/// The error ratio since the snapshot a window ago (or the first, when the series is
/// younger than the window): `(ratio, requests)`.
fn ratio_over(series: &[Snapshot], now: Millis, window_ms: u64) -> (f64, u64) {
    let Some(last) = series.last() else {
        return (0.0, 0);
    };
    let from = now.saturating_sub(window_ms);
    let start = series
        .iter()
        .rev()
        .find(|s| s.0 <= from)
        .unwrap_or(&series[0]);
    let (n, e) = (
        last.1.saturating_sub(start.1),
        last.2.saturating_sub(start.2),
    );
    (if n == 0 { 0.0 } else { e as f64 / n as f64 }, n)
}

/// Multi-window, multi-burn-rate: fails when any pair burns faster than its factor over
/// both its windows. The value is the highest short-window burn rate.
fn burn(
    b: &BurnRate,
    min_requests: u64,
    series: &[Snapshot],
    now: Millis,
) -> (Verdict, Option<f64>, u64, String) {
    let budget = 1.0 - b.slo;
    let mut worst: Option<f64> = None;
    let mut parts = Vec::new();
    let mut fired = false;
    let mut enough = false;
    for w in &b.windows {
        let (long, _) = ratio_over(series, now, w.long.as_millis());
        let (short, n) = ratio_over(series, now, w.short.as_millis());
        if n < min_requests {
            continue;
        }
        enough = true;
        let (bl, bs) = (long / budget, short / budget);
        worst = Some(worst.map_or(bs, |x: f64| x.max(bs)));
        let fires = bl > w.factor && bs > w.factor;
        fired |= fires;
        parts.push(format!(
            "burn {bl:.1}x over {} and {bs:.1}x over {} (limit {}x){}",
            w.long,
            w.short,
            w.factor,
            if fires { " FIRING" } else { "" }
        ));
    }
    let n = ratio_over(series, now, u64::MAX).1;
    if !enough {
        return (
            Verdict::Inconclusive,
            None,
            n,
            format!("fewer than {min_requests} requests in the short windows"),
        );
    }
    let verdict = if fired { Verdict::Fail } else { Verdict::Pass };
    (
        verdict,
        worst,
        n,
        format!("error budget {:.3} %: {}", budget * 100.0, parts.join("; ")),
    )
}

/// Canary `v` against stable `sv` within the allowances; either allowance suffices.
pub fn compare(c: &Compare, v: f64, sv: f64) -> (bool, String) {
    let mut allowed: Option<f64> = None;
    let mut parts = Vec::new();
    if let Some(p) = c.max_increase_percent {
        allowed = Some(allowed.unwrap_or(f64::MIN).max(sv * (1.0 + p / 100.0)));
        parts.push(format!("+{p} %"));
    }
    if let Some(a) = c.max_increase {
        allowed = Some(allowed.unwrap_or(f64::MIN).max(sv + a));
        parts.push(format!("+{a}"));
    }
    let limit = allowed.unwrap_or(f64::INFINITY);
    let ok = v <= limit;
    let text = format!(
        "canary {v:.4} {} stable {sv:.4} {} (limit {limit:.4})",
        if ok { "within" } else { "exceeds" },
        parts.join(" or ")
    );
    (ok, text)
}

#[cfg(test)]
impl Measurer {
    /// A measurement that must give a verdict (every one of an `interval` gate does).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn judged(
        &mut self,
        rollout: &str,
        gate: &Gate,
        revision: &str,
        epoch: u64,
        current: &RevisionStats,
        stable: Option<&RevisionStats>,
        now: Millis,
    ) -> Measurement {
        self.measure(rollout, gate, revision, epoch, true, current, stable, now)
            .expect("a verdict")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_spec::Duration;

    fn gate(metric: BuiltinMetric, cond: &str, min: u64) -> Gate {
        Gate {
            success_condition: Some(cond.into()),
            interval: Duration::from_secs(1),
            min_requests: min,
            judging: baton_spec::Judging::Interval,
            ..Gate::new("g", MetricSource::Builtin(metric))
        }
    }

    fn stats(ok: u64, errors: u64) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        s.classes[1] = ok;
        s.classes[4] = errors;
        s.buckets[3] = ok + errors;
        s
    }

    #[test]
    fn windows_grow_until_they_hold_enough_requests() {
        let g = gate(BuiltinMetric::ErrorRate, "result < 0.1", 20);
        let mut m = Measurer::default();
        assert_eq!(
            m.judged("r", &g, "v2", 1, &stats(0, 0), None, 0).verdict,
            Verdict::Inconclusive
        );
        let few = m.judged("r", &g, "v2", 1, &stats(5, 5), None, 1);
        assert_eq!(few.verdict, Verdict::Inconclusive, "{}", few.detail);
        // The window kept growing from the start: 40 requests, 10 errors.
        let judged = m.judged("r", &g, "v2", 1, &stats(30, 10), None, 2);
        assert_eq!(judged.verdict, Verdict::Fail);
        assert_eq!(judged.value, Some(0.25));
        assert_eq!(judged.requests, 40);
        // A fresh window: 30 more good requests.
        let next = m.judged("r", &g, "v2", 1, &stats(60, 10), None, 3);
        assert_eq!(next.verdict, Verdict::Pass);
        assert_eq!(next.value, Some(0.0));
    }

    #[test]
    fn a_p99_threshold_waits_for_a_hundred_requests() {
        // With fewer, "p99" is the slowest request: one slow request would fail it.
        let g = gate(BuiltinMetric::LatencyP99, "result < 0.8", 20);
        let mut m = Measurer::default();
        m.judged("r", &g, "v2", 1, &stats(0, 0), None, 0);
        let small = m.judged("r", &g, "v2", 1, &stats(60, 0), None, 1);
        assert_eq!(small.verdict, Verdict::Inconclusive);
        assert!(small.detail.contains("100 needed"), "{}", small.detail);
        assert_eq!(
            m.judged("r", &g, "v2", 1, &stats(120, 0), None, 2).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn a_new_epoch_starts_a_new_window() {
        let g = gate(BuiltinMetric::LatencyP99, "result < 0.8", 1);
        let mut m = Measurer::default();
        m.judged("r", &g, "v2", 1, &stats(10, 0), None, 0);
        let again = m.judged("r", &g, "v2", 2, &stats(20, 0), None, 1);
        assert_eq!(again.verdict, Verdict::Inconclusive);
    }
}

#[cfg(test)]
mod burn_tests {
    use super::*;
    use baton_spec::{BurnWindow, Duration};

    fn rate(slo: f64) -> BurnRate {
        BurnRate {
            slo,
            windows: vec![BurnWindow {
                long: Duration::from_secs(60),
                short: Duration::from_secs(5),
                factor: 14.4,
            }],
        }
    }

    #[test]
    fn a_fast_burn_over_both_windows_fires() {
        // 2 % errors against a 0.1 % budget: 20x.
        let series = vec![(0, 0, 0), (30_000, 3000, 60), (60_000, 6000, 120)];
        let (v, value, _, detail) = burn(&rate(0.999), 20, &series, 60_000);
        assert_eq!(v, Verdict::Fail, "{detail}");
        assert!(value.is_some_and(|b| (b - 20.0).abs() < 0.5), "{value:?}");
    }

    #[test]
    fn a_short_spike_alone_does_not_fire() {
        // 60 s of clean traffic, then 5 s at 2 %: the long window stays under 14.4x.
        let series = vec![(0, 0, 0), (55_000, 5500, 0), (60_000, 6000, 10)];
        let (v, _, _, detail) = burn(&rate(0.999), 20, &series, 60_000);
        assert_eq!(v, Verdict::Pass, "{detail}");
    }

    #[test]
    fn too_few_requests_is_inconclusive() {
        let series = vec![(0, 0, 0), (5_000, 5, 5)];
        assert_eq!(
            burn(&rate(0.999), 20, &series, 5_000).0,
            Verdict::Inconclusive
        );
    }
}

#[cfg(test)]
mod compare_tests {
    use super::*;
    use baton_spec::Duration;

    fn stats(ok: u64, errors: u64, bucket: usize) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        s.classes[1] = ok;
        s.classes[4] = errors;
        s.buckets[bucket] = ok + errors;
        s
    }

    fn gate() -> Gate {
        Gate {
            interval: Duration::from_secs(1),
            min_requests: 10,
            compare: Some(Compare {
                max_increase_percent: Some(5.0),
                max_increase: None,
            }),
            judging: baton_spec::Judging::Interval,
            ..Gate::new(
                "vs-stable",
                MetricSource::Builtin(BuiltinMetric::LatencyP99),
            )
        }
    }

    #[test]
    fn the_canary_is_judged_against_stable_over_the_same_window() {
        let g = gate();
        let mut m = Measurer::default();
        // Bucket 7 is (0.075, 0.1]; bucket 13 is (0.4, 0.5].
        m.judged("r", &g, "c", 1, &stats(0, 0, 7), Some(&stats(0, 0, 7)), 0);
        let same = m.judged(
            "r",
            &g,
            "c",
            1,
            &stats(50, 0, 7),
            Some(&stats(500, 0, 7)),
            1,
        );
        assert_eq!(same.verdict, Verdict::Pass, "{}", same.detail);
        let slower = m.judged(
            "r",
            &g,
            "c",
            1,
            &stats(100, 0, 13),
            Some(&stats(1000, 0, 7)),
            2,
        );
        assert_eq!(slower.verdict, Verdict::Fail, "{}", slower.detail);
        assert!(slower.detail.contains("exceeds"), "{}", slower.detail);
    }

    #[test]
    fn allowances() {
        let pct = Compare {
            max_increase_percent: Some(5.0),
            max_increase: None,
        };
        assert!(compare(&pct, 0.104, 0.1).0);
        assert!(!compare(&pct, 0.106, 0.1).0);
        // A zero error rate on stable: only an absolute allowance lets any error through.
        let both = Compare {
            max_increase_percent: Some(5.0),
            max_increase: Some(0.001),
        };
        assert!(compare(&both, 0.0009, 0.0).0);
        assert!(!compare(&both, 0.002, 0.0).0);
    }
}

#[cfg(test)]
mod continuous_tests {
    use super::*;
    use baton_spec::Duration;

    fn gate(success: Option<&str>, compare: Option<f64>, interval: u64) -> Gate {
        Gate {
            success_condition: success.map(str::to_string),
            interval: Duration::from_secs(interval),
            compare: compare.map(|p| Compare {
                max_increase_percent: Some(p),
                max_increase: None,
            }),
            ..Gate::new("errors", MetricSource::Builtin(BuiltinMetric::ErrorRate))
        }
    }

    fn stats(ok: u64, errors: u64) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        s.classes[1] = ok;
        s.classes[4] = errors;
        s.buckets[3] = ok + errors;
        s
    }

    #[test]
    fn conditions_become_an_upper_bound_on_the_error_rate() {
        let bound = |s: Option<&str>, f: Option<&str>| {
            let mut g = gate(s, None, 1);
            g.failure_condition = f.map(str::to_string);
            condition_bound(&g, 1.0)
        };
        let near = |b: Option<f64>, v: f64| b.is_some_and(|b| (b - v).abs() < 1e-9);
        assert!(near(bound(Some("result < 0.05"), None), 0.05));
        assert!(near(bound(Some("result <= 0.01"), None), 0.01));
        assert!(near(bound(None, Some("result > 0.1")), 0.1));
        assert!(near(
            bound(Some("result < 0.2"), Some("result >= 0.1")),
            0.1
        ));
        // Not an upper bound: no sequential threshold.
        assert_eq!(bound(Some("result > 0.5"), None), None);
        assert_eq!(bound(Some("result < 0.1 || result > 0.9"), None), None);
        assert_eq!(bound(None, None), None);
    }

    #[test]
    fn a_canary_failing_every_request_fails_before_its_interval() {
        let g = gate(Some("result < 0.05"), None, 30);
        let mut m = Measurer::default();
        assert!(
            m.measure("r", &g, "v2", 1, true, &stats(0, 0), None, 0)
                .is_none(),
            "opening the window tells nothing"
        );
        assert!(
            m.measure("r", &g, "v2", 1, false, &stats(0, 1), None, 100)
                .is_none()
        );
        let failed = m
            .measure("r", &g, "v2", 1, false, &stats(0, 3), None, 200)
            .expect("failed at once");
        assert_eq!(failed.verdict, Verdict::Fail, "{}", failed.detail);
        assert_eq!(failed.requests, 3);
        assert_eq!(failed.value, Some(1.0));
        assert!(
            failed
                .detail
                .contains("sequential test 99 % sure it exceeds 0.0500"),
            "{}",
            failed.detail
        );
    }

    #[test]
    fn a_healthy_canary_is_told_once_per_interval() {
        let g = gate(Some("result < 0.05"), None, 1);
        let mut m = Measurer::default();
        let mut told = Vec::new();
        // 100 ms cycles over 3.5 s, 10 requests each, one error in 100.
        for i in 0..=35u64 {
            let n = i * 10;
            let due = i % 10 == 0;
            if let Some(v) = m.measure(
                "r",
                &g,
                "v2",
                1,
                due,
                &stats(n - n / 100, n / 100),
                None,
                i * 100,
            ) {
                told.push((v.at, v.verdict));
            }
        }
        assert_eq!(
            told,
            vec![
                (1000, Verdict::Pass),
                (2000, Verdict::Pass),
                (3000, Verdict::Pass)
            ]
        );
    }

    #[test]
    fn a_window_over_the_threshold_by_chance_is_inconclusive_not_failed() {
        // 3 errors in the first 20 requests of a gate allowing 10 %: the window's
        // estimate (15 %) misses the condition, the evidence is nowhere near.
        let g = gate(Some("result < 0.1"), None, 1);
        let mut m = Measurer::default();
        m.measure("r", &g, "v2", 1, true, &stats(0, 0), None, 0);
        let v = m
            .measure("r", &g, "v2", 1, true, &stats(17, 3), None, 1000)
            .expect("a verdict at the interval");
        assert_eq!(v.verdict, Verdict::Inconclusive, "{}", v.detail);
        assert!(v.detail.contains("not yet significant"), "{}", v.detail);
        // The same window under `judging: interval` fails.
        let mut fixed = g.clone();
        fixed.judging = Judging::Interval;
        let mut m = Measurer::default();
        m.judged("r", &fixed, "v2", 1, &stats(0, 0), None, 0);
        assert_eq!(
            m.judged("r", &fixed, "v2", 1, &stats(17, 3), None, 1000)
                .verdict,
            Verdict::Fail
        );
    }

    /// The controller grew by every rollout: windows and tests of every revision ever
    /// judged were kept. What a gone revision left is dropped, the rest stays.
    #[test]
    fn what_a_gone_revision_left_is_dropped() {
        let g = gate(None, Some(10.0), 60);
        let mut m = Measurer::default();
        for (rollout, rev) in [("r", "v1"), ("r", "v2"), ("other", "v1")] {
            m.measure(
                rollout,
                &g,
                rev,
                1,
                true,
                &stats(0, 0),
                Some(&stats(0, 0)),
                0,
            );
            m.measure(
                rollout,
                &g,
                rev,
                1,
                false,
                &stats(5, 0),
                Some(&stats(5, 0)),
                100,
            );
        }
        let before = m.held();
        assert!(before.1 + before.2 >= 3, "{before:?}");
        m.retain("r", &|rev| rev == "v2");
        let after = m.held();
        assert_eq!(
            after.1 + after.2,
            (before.1 + before.2) / 3 * 2,
            "{after:?}"
        );
        m.retain("other", &|_| false);
        m.retain("r", &|_| false);
        assert_eq!(m.held(), (0, 0, 0));
    }

    #[test]
    fn a_canary_worse_than_stable_fails_the_ratio_test() {
        let g = gate(None, Some(10.0), 60);
        let mut m = Measurer::default();
        m.measure("r", &g, "c", 1, true, &stats(0, 0), Some(&stats(0, 0)), 0);
        let mut failed = None;
        // Canary at 10 % failing a quarter of its requests, stable failing 1 in 100.
        for i in 1..=100u64 {
            let (c, s) = (stats(i * 3, i), stats(i * 89, i * 89 / 100));
            if let Some(v) = m.measure("r", &g, "c", 1, false, &c, Some(&s), i * 100) {
                failed = Some((i, v));
                break;
            }
        }
        let (at, v) = failed.expect("a verdict");
        assert_eq!(v.verdict, Verdict::Fail, "{}", v.detail);
        assert!(at < 20, "after {at} cycles: {}", v.detail);
        assert!(v.detail.contains("x 1.10"), "{}", v.detail);
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;
    use baton_proxy_api::metrics::FINE_BUCKETS;
    use baton_spec::Duration;

    fn gate(metric: BuiltinMetric, success: Option<&str>, compare: Option<f64>) -> Gate {
        Gate {
            success_condition: success.map(str::to_string),
            interval: Duration::from_secs(60),
            compare: compare.map(|p| Compare {
                max_increase_percent: Some(p),
                max_increase: None,
            }),
            ..Gate::new("latency", MetricSource::Builtin(metric))
        }
    }

    /// Cumulative counters with latencies added as the proxy counts them.
    #[derive(Clone)]
    struct Rev(RevisionStats);
    impl Rev {
        fn new() -> Rev {
            Rev(RevisionStats {
                buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
                fine: vec![0; FINE_BUCKETS],
                ..RevisionStats::default()
            })
        }
        fn add(&mut self, seconds: f64) {
            let s = &mut self.0;
            s.classes[1] += 1;
            let i = baton_proxy_api::BUCKETS
                .iter()
                .position(|b| seconds <= *b)
                .unwrap_or(baton_proxy_api::BUCKETS.len());
            s.buckets[i] += 1;
            s.fine[fine_index(seconds)] += 1;
        }
    }

    /// Seeded latencies: log-normal around `median` (sigma 0.4).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn latency(&mut self, median: f64) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
            median * (0.4 * z).exp()
        }
    }

    /// Cycles of 100 ms with `per_cycle` requests to each revision; when the gate
    /// first failed the canary (the cycle), if it did.
    fn first_failure(
        g: &Gate,
        canary_factor: f64,
        per_cycle: u32,
        cycles: u32,
        seed: u64,
    ) -> Option<(u32, Measurement)> {
        let mut rng = Rng(seed);
        let (mut c, mut s) = (Rev::new(), Rev::new());
        let mut m = Measurer::default();
        m.measure("r", g, "c", 1, true, &c.0, Some(&s.0), 0);
        for cycle in 1..=cycles {
            for _ in 0..per_cycle {
                c.add(rng.latency(0.1) * canary_factor);
                s.add(rng.latency(0.1));
            }
            if let Some(v) = m.measure(
                "r",
                g,
                "c",
                1,
                false,
                &c.0,
                Some(&s.0),
                u64::from(cycle) * 100,
            ) && v.verdict == Verdict::Fail
            {
                return Some((cycle, v));
            }
        }
        None
    }

    #[test]
    fn a_p99_over_its_bound_fails_once_a_hundred_requests_are_in() {
        let g = gate(BuiltinMetric::LatencyP99, Some("result < 0.8"), None);
        // Every canary request takes about 1 s: out at the guard, not before.
        let (cycle, v) = first_failure(&g, 10.0, 10, 100, 1).expect("failed");
        assert_eq!(cycle, 10, "{}", v.detail);
        assert!(
            v.detail.contains("of 100 requests slower than 0.8000 s"),
            "{}",
            v.detail
        );
        assert!(v.value.is_some_and(|p| p > 0.8), "{:?}", v.value);
        // A healthy canary (p99 near 0.25 s) is never failed.
        assert!(first_failure(&g, 1.0, 10, 600, 2).is_none());
    }

    #[test]
    fn a_latency_shift_against_stable_is_found_and_no_shift_is_not() {
        let g = gate(BuiltinMetric::LatencyP50, None, Some(5.0));
        // +30 % on the median at 10 requests per cycle each: found within seconds.
        let (cycle, v) = first_failure(&g, 1.3, 10, 600, 3).expect("found");
        assert!(cycle <= 50, "{cycle}: {}", v.detail);
        assert!(v.detail.contains("exceeds stable's x 1.05"), "{}", v.detail);
        // +10 %: found too, later.
        let (later, _) = first_failure(&g, 1.1, 10, 3000, 4).expect("found");
        assert!(later > cycle, "{later} vs {cycle}");
        // The same latencies: 20 runs of a minute each, none failed.
        let failed = (0..20)
            .filter(|seed| first_failure(&g, 1.0, 10, 600, 100 + seed).is_some())
            .count();
        assert_eq!(failed, 0);
        // p99 against stable's, +100 %: found.
        let g = gate(BuiltinMetric::LatencyP99, None, Some(10.0));
        assert!(first_failure(&g, 2.0, 10, 600, 5).is_some());
    }

    #[test]
    fn without_fine_buckets_latency_waits_for_the_window() {
        // A router's histogram (no fine buckets): no sequential latency test.
        let g = gate(BuiltinMetric::LatencyP99, Some("result < 0.8"), None);
        let mut m = Measurer::default();
        let mut slow = RevisionStats {
            buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        m.measure("r", &g, "c", 1, true, &slow, None, 0);
        slow.classes[1] = 500;
        slow.buckets[baton_proxy_api::BUCKETS.len()] = 500;
        assert!(
            m.measure("r", &g, "c", 1, false, &slow, None, 100)
                .is_none()
        );
    }
}

//! The built-in provider: windows over the proxy's per-revision counters.
//!
//! A window starts at the first measurement of a gate on a revision and grows until it
//! holds `minRequests`; only then is it judged and a new window begun. So a canary at
//! 2 % of little traffic is judged on enough requests, later, rather than on three.

use std::collections::HashMap;

use baton_engine::{Measurement, Millis, Verdict};
use baton_proxy_api::RevisionStats;
use baton_spec::{BuiltinMetric, BurnRate, Compare, Gate, MetricSource};

use crate::threshold::judge;

/// (time, requests, errors) of a revision at one measurement.
type Snapshot = (Millis, u64, u64);

#[derive(Default)]
pub struct Measurer {
    /// (rollout, revision) → (time, requests, errors) at each burn-rate measurement.
    series: HashMap<(String, String), Vec<Snapshot>>,
    /// (rollout, gate, revision, epoch) → counters of the canary (and of stable, when
    /// the gate compares) at the window's start.
    windows: HashMap<(String, String, String, u64), (RevisionStats, RevisionStats)>,
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
    /// One measurement of `gate` on `revision` from its current counters; `stable`
    /// holds the stable revision's current counters, used when the gate compares.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &mut self,
        rollout: &str,
        gate: &Gate,
        revision: &str,
        epoch: u64,
        current: &RevisionStats,
        stable: Option<&RevisionStats>,
        now: Millis,
    ) -> Measurement {
        let key = (
            rollout.to_string(),
            gate.name.clone(),
            revision.to_string(),
            epoch,
        );
        // Windows of older epochs will never be read again.
        self.windows
            .retain(|k, _| !(k.0 == key.0 && k.1 == key.1 && k.2 == key.2 && k.3 != epoch));
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
mod tests {
    use super::*;
    use baton_spec::Duration;

    fn gate(metric: BuiltinMetric, cond: &str, min: u64) -> Gate {
        Gate {
            name: "g".into(),
            metric: MetricSource::Builtin(metric),
            success_condition: Some(cond.into()),
            failure_condition: None,
            interval: Duration::from_secs(1),
            failure_limit: 0,
            count: 1,
            min_requests: min,
            initial_delay: Duration::default(),
            inconclusive_limit: None,
            consecutive_error_limit: 4,
            dry_run: false,
            on_failure: None,
            compare: None,
            statistical: None,
            burn_rate: None,
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
            m.measure("r", &g, "v2", 1, &stats(0, 0), None, 0).verdict,
            Verdict::Inconclusive
        );
        let few = m.measure("r", &g, "v2", 1, &stats(5, 5), None, 1);
        assert_eq!(few.verdict, Verdict::Inconclusive, "{}", few.detail);
        // The window kept growing from the start: 40 requests, 10 errors.
        let judged = m.measure("r", &g, "v2", 1, &stats(30, 10), None, 2);
        assert_eq!(judged.verdict, Verdict::Fail);
        assert_eq!(judged.value, Some(0.25));
        assert_eq!(judged.requests, 40);
        // A fresh window: 30 more good requests.
        let next = m.measure("r", &g, "v2", 1, &stats(60, 10), None, 3);
        assert_eq!(next.verdict, Verdict::Pass);
        assert_eq!(next.value, Some(0.0));
    }

    #[test]
    fn a_p99_threshold_waits_for_a_hundred_requests() {
        // With fewer, "p99" is the slowest request: one slow request would fail it.
        let g = gate(BuiltinMetric::LatencyP99, "result < 0.8", 20);
        let mut m = Measurer::default();
        m.measure("r", &g, "v2", 1, &stats(0, 0), None, 0);
        let small = m.measure("r", &g, "v2", 1, &stats(60, 0), None, 1);
        assert_eq!(small.verdict, Verdict::Inconclusive);
        assert!(small.detail.contains("100 needed"), "{}", small.detail);
        assert_eq!(
            m.measure("r", &g, "v2", 1, &stats(120, 0), None, 2).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn a_new_epoch_starts_a_new_window() {
        let g = gate(BuiltinMetric::LatencyP99, "result < 0.8", 1);
        let mut m = Measurer::default();
        m.measure("r", &g, "v2", 1, &stats(10, 0), None, 0);
        let again = m.measure("r", &g, "v2", 2, &stats(20, 0), None, 1);
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
            name: "vs-stable".into(),
            metric: MetricSource::Builtin(BuiltinMetric::LatencyP99),
            success_condition: None,
            failure_condition: None,
            interval: Duration::from_secs(1),
            failure_limit: 0,
            count: 1,
            min_requests: 10,
            initial_delay: Duration::default(),
            inconclusive_limit: None,
            consecutive_error_limit: 4,
            dry_run: false,
            on_failure: None,
            compare: Some(Compare {
                max_increase_percent: Some(5.0),
                max_increase: None,
            }),
            statistical: None,
            burn_rate: None,
        }
    }

    #[test]
    fn the_canary_is_judged_against_stable_over_the_same_window() {
        let g = gate();
        let mut m = Measurer::default();
        // Bucket 7 is (0.075, 0.1]; bucket 13 is (0.4, 0.5].
        m.measure("r", &g, "c", 1, &stats(0, 0, 7), Some(&stats(0, 0, 7)), 0);
        let same = m.measure(
            "r",
            &g,
            "c",
            1,
            &stats(50, 0, 7),
            Some(&stats(500, 0, 7)),
            1,
        );
        assert_eq!(same.verdict, Verdict::Pass, "{}", same.detail);
        let slower = m.measure(
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

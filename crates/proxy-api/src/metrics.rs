//! A revision's request counters as the proxy reports them: plain numbers to subtract
//! and to read quantiles from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds). Denser around the 100 ms - 1 s range where latency SLOs sit,
/// so a p99 threshold of 0.8 s can be judged from the buckets.
pub const BUCKETS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7,
    0.8, 0.9, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
];

/// The fine latency histogram's relative accuracy: a quantile read from it is within
/// 1 % of the true value, and tests against stable lose at most a bucket (2 %) to
/// rounding, so a 5 % latency shift can be judged.
pub const FINE_ACCURACY: f64 = 0.01;
/// Growth of the fine buckets' bounds: `(1 + a) / (1 - a)`, as in DDSketch.
pub const FINE_GAMMA: f64 = (1.0 + FINE_ACCURACY) / (1.0 - FINE_ACCURACY);
/// Lowest bound of the fine buckets (seconds); bucket 0 holds what is faster.
pub const FINE_MIN: f64 = 50e-6;
/// Fine buckets: 0 below [`FINE_MIN`], then `[FINE_MIN·γ^(i-1), FINE_MIN·γ^i)` up to
/// about 7 minutes, the last one for anything slower.
pub const FINE_BUCKETS: usize = 800;

/// The fine bucket of a latency (seconds).
pub fn fine_index(seconds: f64) -> usize {
    // NaN lands here too.
    if seconds.is_nan() || seconds < FINE_MIN {
        return 0;
    }
    let i = 1 + ((seconds / FINE_MIN).ln() / FINE_GAMMA.ln()) as usize;
    i.min(FINE_BUCKETS - 1)
}

/// `[lower, upper)` of fine bucket `i` (seconds).
pub fn fine_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        return (0.0, FINE_MIN);
    }
    let lower = FINE_MIN * FINE_GAMMA.powi(i as i32 - 1);
    if i >= FINE_BUCKETS - 1 {
        return (lower, f64::INFINITY);
    }
    (lower, lower * FINE_GAMMA)
}

/// The value a fine bucket stands for: within [`FINE_ACCURACY`] of anything in it.
pub fn fine_value(i: usize) -> f64 {
    let (lower, upper) = fine_bounds(i);
    if i == 0 {
        FINE_MIN / 2.0
    } else if upper.is_infinite() {
        lower
    } else {
        2.0 * lower * FINE_GAMMA / (FINE_GAMMA + 1.0)
    }
}

/// The q-quantile of fine bucket counts: the value of the bucket holding it.
pub fn fine_quantile(fine: &[u64], q: f64) -> Option<f64> {
    let total: u64 = fine.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    fine.iter().enumerate().find_map(|(i, n)| {
        seen += n;
        (seen >= rank).then(|| fine_value(i))
    })
}

/// Counters of one revision at one moment; subtract two to get a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStats {
    pub classes: [u64; 5],
    pub upstream_errors: u64,
    pub retries: u64,
    #[serde(default)]
    pub ejections: u64,
    #[serde(default)]
    pub mirrored: u64,
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    /// Upper bounds (seconds) of `buckets` when they are not [`BUCKETS`]: a router's
    /// histogram read from Prometheus has its own, coarser ones. Empty: [`BUCKETS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<f64>,
    /// The same latencies in [`FINE_BUCKETS`] fine buckets ([`fine_bounds`]); empty
    /// where there are none (a router's histogram, a proxy of an older version).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fine: Vec<u64>,
}

impl RevisionStats {
    /// The finite upper bounds of `buckets` (the last bucket is +Inf).
    pub fn bounds(&self) -> &[f64] {
        if self.bounds.is_empty() {
            &BUCKETS
        } else {
            &self.bounds
        }
    }
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }
    /// 5xx answers (including the proxy's own 502s) over all answers.
    pub fn error_rate(&self) -> Option<f64> {
        let n = self.requests();
        (n > 0).then(|| self.classes[4] as f64 / n as f64)
    }
    /// The window between `earlier` and `self`.
    pub fn since(&self, earlier: &RevisionStats) -> RevisionStats {
        RevisionStats {
            classes: std::array::from_fn(|i| self.classes[i].saturating_sub(earlier.classes[i])),
            upstream_errors: self.upstream_errors.saturating_sub(earlier.upstream_errors),
            retries: self.retries.saturating_sub(earlier.retries),
            ejections: self.ejections.saturating_sub(earlier.ejections),
            mirrored: self.mirrored.saturating_sub(earlier.mirrored),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_seconds: (self.sum_seconds - earlier.sum_seconds).max(0.0),
            bounds: self.bounds.clone(),
            fine: self
                .fine
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(earlier.fine.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }
    /// The fine buckets when they hold the latencies the classic ones do (a proxy
    /// restarted from an older version's counters has fine ones only for what came
    /// since): then they, not the classic buckets, are what judges read. A snapshot
    /// read while requests complete may count one in the classic buckets and not yet
    /// in the fine ones, hence the slack of 1 % (at least 2).
    pub fn fine_complete(&self) -> Option<&[u64]> {
        let fine: u64 = self.fine.iter().sum();
        let classic: u64 = self.buckets.iter().sum();
        (self.fine.len() == FINE_BUCKETS
            && fine > 0
            && fine.abs_diff(classic) <= (classic / 100).max(2))
        .then_some(self.fine.as_slice())
    }
    /// The q-quantile by linear interpolation inside the bucket, as Prometheus'
    /// `histogram_quantile` computes it, so both agree on what "p99" means.
    ///
    /// With complete fine buckets, the fine bucket's value instead: within 2 %.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if let Some(v) = self.fine_complete().and_then(|f| fine_quantile(f, q)) {
            return Some(v);
        }
        let bounds = self.bounds();
        let last = bounds.last().copied()?;
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, count) in self.buckets.iter().enumerate() {
            let before = seen;
            seen += count;
            if (seen as f64) >= rank && *count > 0 {
                let Some(upper) = bounds.get(i) else {
                    // In +Inf: the highest finite bound, as Prometheus answers.
                    return Some(last);
                };
                let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                let frac = (rank - before as f64) / *count as f64;
                return Some(lower + (upper - lower) * frac.clamp(0.0, 1.0));
            }
        }
        Some(last)
    }
}

/// All services' revisions: `service -> revision -> stats`.
pub type StatsSnapshot = BTreeMap<String, BTreeMap<String, RevisionStats>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` answers in bucket `i` (and `errors` of them 5xx).
    fn stats(i: usize, n: u64, errors: u64) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        s.buckets[i] = n;
        s.classes[1] = n - errors;
        s.classes[4] = errors;
        s
    }

    #[test]
    fn fine_buckets_hold_every_latency_within_one_percent() {
        let mut prev = 0;
        let mut x = 1e-6;
        while x < 600.0 {
            let i = fine_index(x);
            assert!(i >= prev, "monotone at {x}");
            prev = i;
            let (lo, hi) = fine_bounds(i);
            assert!(lo <= x && (x < hi || i == 0), "{x} in [{lo}, {hi}) of {i}");
            if (FINE_MIN..300.0).contains(&x) {
                let err = (fine_value(i) - x).abs() / x;
                assert!(err <= FINE_ACCURACY + 1e-9, "{x}: {err}");
            }
            x *= 1.003;
        }
        assert!(
            fine_bounds(FINE_BUCKETS - 2).1 > 300.0,
            "covers five minutes"
        );
        assert_eq!(fine_index(f64::NAN), 0);
        assert_eq!(fine_index(1e9), FINE_BUCKETS - 1);
    }

    #[test]
    fn a_quantile_reads_complete_fine_buckets_and_falls_back_otherwise() {
        // 100 requests at 0.1 s … 0.199 s (classic buckets: 0.1–0.15 and 0.15–0.2).
        let mut s = RevisionStats {
            buckets: vec![0; BUCKETS.len() + 1],
            fine: vec![0; FINE_BUCKETS],
            ..RevisionStats::default()
        };
        for k in 0..100 {
            let v = 0.1 + f64::from(k) * 0.001;
            s.fine[fine_index(v)] += 1;
            s.buckets[BUCKETS
                .iter()
                .position(|b| v <= *b)
                .unwrap_or(BUCKETS.len())] += 1;
        }
        s.classes[1] = 100;
        let p90 = s.quantile(0.9).expect("data");
        assert!((p90 - 0.189).abs() / 0.189 <= FINE_ACCURACY, "{p90}");
        // Fine buckets that miss some requests are not read.
        let mut partial = s.clone();
        for k in 0..10 {
            partial.fine[fine_index(0.1 + f64::from(k) * 0.001)] -= 1;
        }
        assert!(partial.fine_complete().is_none());
        let classic = partial.quantile(0.9).expect("data");
        assert!(
            (classic - 0.19).abs() < 1e-9,
            "classic interpolation: {classic}"
        );
        // One request read in the classic buckets and not yet in the fine ones.
        let mut racing = s.clone();
        racing.fine[fine_index(0.15)] -= 1;
        assert!(racing.fine_complete().is_some());
        // A window of fine buckets is their difference.
        assert_eq!(s.since(&partial).fine.iter().sum::<u64>(), 10);
    }

    #[test]
    fn counters_of_an_older_proxy_without_fine_buckets_are_read() {
        // What a proxy of the previous version sends over its control socket and in
        // its handover: no `fine`.
        let old = r#"{"classes":[0,7,0,0,1],"upstreamErrors":0,"retries":0,"buckets":[0,0,0,8,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"sumSeconds":0.05}"#;
        let s: RevisionStats = serde_json::from_str(old).expect("old counters");
        assert!(s.fine.is_empty() && s.fine_complete().is_none());
        assert_eq!(s.requests(), 8);
        assert!(s.quantile(0.5).is_some());
        // And a new one without latencies sends no `fine` either.
        let text = serde_json::to_string(&RevisionStats::default()).expect("json");
        assert!(!text.contains("fine"), "{text}");
    }

    #[test]
    fn fine_buckets_of_another_layout_are_not_read() {
        // An earlier layout (400 buckets at 2 %) holding every request: its indexes
        // mean other latencies, so the classic buckets answer.
        let mut s = stats(3, 50, 0);
        s.fine = vec![0; 400];
        s.fine[300] = 50;
        assert!(s.fine_complete().is_none());
        assert_eq!(s.quantile(0.5), stats(3, 50, 0).quantile(0.5));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_and_stop_at_the_last_bound() {
        // Bucket 2 is (0.0025, 0.005]: the median of 100 in it is halfway.
        let p50 = stats(2, 100, 0).quantile(0.5).expect("data");
        assert!((p50 - 0.00375).abs() < 1e-12, "{p50}");
        assert_eq!(
            stats(BUCKETS.len(), 3, 0).quantile(0.99),
            Some(BUCKETS[BUCKETS.len() - 1])
        );
        assert_eq!(RevisionStats::default().quantile(0.5), None);
    }

    #[test]
    fn quantiles_use_the_bounds_the_stats_came_with() {
        // A router's milliseconds-based histogram: 10, 50, 250 ms, +Inf.
        let s = RevisionStats {
            buckets: vec![0, 100, 0, 0],
            bounds: vec![0.01, 0.05, 0.25],
            ..RevisionStats::default()
        };
        let p50 = s.quantile(0.5).expect("data");
        assert!((p50 - 0.03).abs() < 1e-12, "{p50}");
        let overflow = RevisionStats {
            buckets: vec![0, 0, 0, 5],
            ..s.clone()
        };
        assert_eq!(overflow.quantile(0.99), Some(0.25));
        let w = s.since(&RevisionStats::default());
        assert_eq!(w.bounds, s.bounds, "a window keeps its bounds");
    }

    #[test]
    fn a_window_is_the_difference_and_never_negative() {
        let w = stats(3, 30, 3).since(&stats(3, 10, 1));
        assert_eq!(w.requests(), 20);
        assert_eq!(w.error_rate(), Some(0.1));
        // A restarted proxy's counters went down: an empty window, not a negative one.
        let reset = stats(3, 5, 0).since(&stats(3, 10, 1));
        assert_eq!(reset.requests(), 0);
        assert_eq!(reset.error_rate(), None);
    }
}

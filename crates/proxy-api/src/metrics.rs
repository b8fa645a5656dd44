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
        }
    }
    /// The q-quantile by linear interpolation inside the bucket, as Prometheus'
    /// `histogram_quantile` computes it, so both agree on what "p99" means.
    pub fn quantile(&self, q: f64) -> Option<f64> {
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

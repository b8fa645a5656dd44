//! The statistical judge: the canary against stable over the same window, built to
//! catch what a location test alone misses (Kayenta's documented blind spots):
//!
//! - a shift of the distribution: Mann-Whitney U, one-sided, with tie correction
//!   (latency from histogram buckets is heavily tied);
//! - a change of shape with the same median (more variance, a fatter tail): a
//!   bootstrap interval on the tail quantile's difference;
//! - sparse error counts: Fisher's exact test on errors as proportions, which needs no
//!   normal approximation and no mean (a zero mean cannot break it).

use baton_engine::Verdict;
use baton_proxy_api::RevisionStats;
use baton_spec::{BuiltinMetric, Direction, Statistical};

use crate::stats::{bootstrap_quantile_diff, fisher_greater, mann_whitney, quantile};

/// At most this many samples per side are drawn from a histogram.
const MAX_SAMPLES: u64 = 2000;
const BOOTSTRAP_ROUNDS: usize = 400;

/// Latency samples from a histogram window: each request at its fine bucket's value
/// when the fine buckets are complete, else at its classic bucket's upper bound (twice
/// the last bound for the overflow bucket), thinned evenly to `MAX_SAMPLES`.
pub fn samples(window: &RevisionStats) -> Vec<f64> {
    if let Some(fine) = window.fine_complete() {
        let total: u64 = fine.iter().sum();
        let mut out = Vec::new();
        for (i, n) in fine.iter().enumerate() {
            let keep = if total <= MAX_SAMPLES {
                *n
            } else {
                (n * MAX_SAMPLES).div_ceil(total)
            };
            out.extend(std::iter::repeat_n(
                baton_proxy_api::metrics::fine_value(i),
                keep as usize,
            ));
        }
        return out;
    }
    let total: u64 = window.buckets.iter().sum();
    let keep = |n: u64| {
        if total <= MAX_SAMPLES {
            n
        } else {
            (n * MAX_SAMPLES).div_ceil(total)
        }
    };
    let bounds = window.bounds();
    let overflow = bounds.last().copied().unwrap_or(0.0) * 2.0;
    let mut out = Vec::new();
    for (i, n) in window.buckets.iter().enumerate() {
        let bound = bounds.get(i).copied().unwrap_or(overflow);
        out.extend(std::iter::repeat_n(bound, keep(*n) as usize));
    }
    out
}

/// How one metric of the canary compares with stable, as Kayenta classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Class {
    Pass,
    /// Significantly worse (higher).
    High,
    /// Significantly lower; counts against the canary only with `direction: either`.
    Low,
    /// Either side had no data.
    NoData,
}

/// `(passes, detail)` for one metric of the canary against stable.
pub fn judge(
    st: &Statistical,
    metric: BuiltinMetric,
    canary: &RevisionStats,
    stable: &RevisionStats,
) -> (bool, String) {
    let (class, detail) = classify(st, metric, canary, stable);
    (!counts_against(st, class), detail)
}

fn counts_against(st: &Statistical, class: Class) -> bool {
    match class {
        Class::High => true,
        Class::Low => st.direction == Direction::Either,
        Class::Pass | Class::NoData => false,
    }
}

/// Kayenta's score over several metrics: `100 * passing / judged` (metrics with no
/// data are not judged), with `passScore` and `marginalScore` deciding the verdict:
/// at or above pass, Pass; below marginal, Fail; between, Inconclusive (a human may
/// look, through `inconclusiveLimit`).
pub fn scorecard(
    st: &Statistical,
    metrics: &[BuiltinMetric],
    canary: &RevisionStats,
    stable: &RevisionStats,
) -> (Verdict, Option<f64>, String) {
    let mut judged = 0u32;
    let mut passing = 0u32;
    let mut lines = Vec::new();
    for m in metrics {
        let (class, detail) = classify(st, *m, canary, stable);
        if class != Class::NoData {
            judged += 1;
            if !counts_against(st, class) {
                passing += 1;
            }
        }
        lines.push(format!("{}: {class:?} ({detail})", m.as_str()));
    }
    if judged == 0 {
        return (
            Verdict::Inconclusive,
            None,
            format!("no metric had data: {}", lines.join("; ")),
        );
    }
    let score = 100.0 * f64::from(passing) / f64::from(judged);
    let verdict = if score >= st.pass_score {
        Verdict::Pass
    } else if score >= st.marginal_score {
        Verdict::Inconclusive
    } else {
        Verdict::Fail
    };
    let detail = format!(
        "score {score:.0} (pass {}, marginal {}): {}",
        st.pass_score,
        st.marginal_score,
        lines.join("; ")
    );
    (verdict, Some(score), detail)
}

/// One metric of the canary against stable.
pub fn classify(
    st: &Statistical,
    metric: BuiltinMetric,
    canary: &RevisionStats,
    stable: &RevisionStats,
) -> (Class, String) {
    let alpha = 1.0 - st.confidence;
    if canary.requests() == 0 || stable.requests() == 0 {
        return (Class::NoData, "no requests on one side".into());
    }
    if metric == BuiltinMetric::ErrorRate {
        let (a, b) = (canary.classes[4], canary.requests() - canary.classes[4]);
        let (c, d) = (stable.classes[4], stable.requests() - stable.classes[4]);
        let rate = |e: u64, n: u64| if n == 0 { 0.0 } else { e as f64 / n as f64 };
        let (cr, sr) = (rate(a, a + b), rate(c, c + d));
        let p_high = fisher_greater(a, b, c, d);
        let p_low = fisher_greater(c, d, a, b);
        let class = if p_high < alpha && cr > sr * (1.0 + st.tolerance) {
            Class::High
        } else if p_low < alpha && sr > cr * (1.0 + st.tolerance) {
            Class::Low
        } else {
            Class::Pass
        };
        let mark = if class == Class::High { " HIGH" } else { "" };
        return (
            class,
            format!(
                "errors {a}/{} vs stable {c}/{}: Fisher p={p_high:.2e}{mark}",
                a + b,
                c + d
            ),
        );
    }
    let q = match metric {
        BuiltinMetric::LatencyP50 => 0.5,
        BuiltinMetric::LatencyP90 => 0.9,
        _ => 0.99,
    };
    let (mut x, mut y) = (samples(canary), samples(stable));
    x.sort_by(f64::total_cmp);
    y.sort_by(f64::total_cmp);
    let mut findings = Vec::new();
    let mut class = Class::Pass;
    if let (Some(up), Some(down)) = (mann_whitney(&x, &y), mann_whitney(&y, &x)) {
        let (mx, my) = (quantile(&x, 0.5), quantile(&y, 0.5));
        let high = up.p_greater < alpha && mx > my * (1.0 + st.tolerance);
        if high {
            class = Class::High;
        } else if down.p_greater < alpha && my > mx * (1.0 + st.tolerance) {
            class = Class::Low;
        }
        findings.push(format!(
            "shift: median {mx:.4} vs {my:.4}, Mann-Whitney p={:.2e}{}",
            up.p_greater,
            if high { " HIGH" } else { "" }
        ));
    }
    if let Some((lo, hi)) = bootstrap_quantile_diff(&x, &y, q, st.confidence, BOOTSTRAP_ROUNDS) {
        let sq = quantile(&y, q);
        let high = lo > sq * st.tolerance && lo > 0.0;
        if high {
            class = Class::High;
        }
        findings.push(format!(
            "tail: p{} difference in [{lo:.4}, {hi:.4}] s at {:.0} % confidence{}",
            (q * 100.0) as u32,
            st.confidence * 100.0,
            if high { " HIGH" } else { "" }
        ));
    }
    (class, findings.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proxy_api::BUCKETS;

    /// A window with `counts[i]` requests in bucket `i` and `errors` 5xx among them.
    fn window(counts: &[(usize, u64)], errors: u64) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; BUCKETS.len() + 1],
            ..RevisionStats::default()
        };
        for (i, n) in counts {
            s.buckets[*i] += n;
        }
        let total: u64 = counts.iter().map(|c| c.1).sum();
        s.classes[1] = total - errors;
        s.classes[4] = errors;
        s
    }

    fn st() -> Statistical {
        Statistical {
            confidence: 0.99,
            tolerance: 0.1,
            direction: Direction::Increase,
            pass_score: 95.0,
            marginal_score: 75.0,
        }
    }

    #[test]
    fn the_same_distribution_passes() {
        let w = window(&[(3, 400), (4, 80), (5, 20)], 0);
        assert!(judge(&st(), BuiltinMetric::LatencyP99, &w, &w).0);
        assert!(judge(&st(), BuiltinMetric::ErrorRate, &w, &w).0);
    }

    #[test]
    fn a_fatter_tail_with_the_same_median_fails() {
        // Kayenta's shape-change blind spot: the median stays in bucket 3, but 8 % of
        // the canary's requests now take 0.5 s.
        let stable = window(&[(3, 900), (4, 90), (5, 10)], 0);
        let canary = window(&[(3, 900), (4, 20), (13, 80)], 0);
        let (ok, detail) = judge(&st(), BuiltinMetric::LatencyP99, &canary, &stable);
        assert!(!ok, "{detail}");
        assert!(
            detail.contains("tail") && detail.contains("HIGH"),
            "{detail}"
        );
    }

    #[test]
    fn heavily_tied_shifts_fail() {
        // Kayenta#6278: seven 100s and three 1s against ten 1s passed its judge.
        let stable = window(&[(0, 10)], 0);
        let canary = window(&[(0, 3), (18, 7)], 0);
        let (ok, detail) = judge(&st(), BuiltinMetric::LatencyP50, &canary, &stable);
        assert!(!ok, "{detail}");
    }

    #[test]
    fn sparse_errors_are_judged_as_proportions() {
        // Kayenta#426: 3 errors in 200 against none in 2000 passed.
        let stable = window(&[(3, 2000)], 0);
        let canary = window(&[(3, 200)], 3);
        let (ok, detail) = judge(&st(), BuiltinMetric::ErrorRate, &canary, &stable);
        assert!(!ok, "{detail}");
        // One error against one error in equal traffic is noise.
        let (ok, _) = judge(
            &st(),
            BuiltinMetric::ErrorRate,
            &window(&[(3, 1000)], 1),
            &window(&[(3, 1000)], 1),
        );
        assert!(ok);
    }

    #[test]
    fn a_scorecard_scores_the_metrics_and_applies_its_thresholds() {
        let all = [
            BuiltinMetric::LatencyP50,
            BuiltinMetric::LatencyP99,
            BuiltinMetric::ErrorRate,
        ];
        let stable = window(&[(3, 900), (4, 90), (5, 10)], 0);
        let (v, score, _) = scorecard(&st(), &all, &stable, &stable);
        assert_eq!((v, score), (Verdict::Pass, Some(100.0)));
        // A fatter tail only: p99 is High, p50 and errors pass: 2 of 3 = 67 < 75.
        let canary = window(&[(3, 900), (4, 20), (13, 80)], 0);
        let (v, score, detail) = scorecard(&st(), &all, &canary, &stable);
        assert_eq!(v, Verdict::Fail, "{detail}");
        assert!(score.is_some_and(|s| (s - 66.7).abs() < 0.1), "{score:?}");
        // With a laxer marginal line the same card is marginal: inconclusive.
        let lax = Statistical {
            marginal_score: 60.0,
            ..st()
        };
        assert_eq!(
            scorecard(&lax, &all, &canary, &stable).0,
            Verdict::Inconclusive
        );
        // Faster than stable is fine unless the direction is `either`.
        let faster = window(&[(0, 1000)], 0);
        assert_eq!(scorecard(&st(), &all, &faster, &stable).0, Verdict::Pass);
        let either = Statistical {
            direction: Direction::Either,
            ..st()
        };
        assert_ne!(scorecard(&either, &all, &faster, &stable).0, Verdict::Pass);
        // No data at all is inconclusive, not a pass.
        let empty = window(&[], 0);
        assert_eq!(
            scorecard(&st(), &all, &empty, &stable).0,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn zero_error_rates_do_not_break_the_judge() {
        // Kayenta#510: a zero mean made its effect size NaN.
        let zero = window(&[(3, 500)], 0);
        let (ok, detail) = judge(&st(), BuiltinMetric::ErrorRate, &zero, &zero);
        assert!(ok, "{detail}");
        assert!(!detail.contains("NaN"), "{detail}");
    }
}

//! The built-in provider: windows over the proxy's per-revision counters.
//!
//! A window starts at the first measurement of a gate on a revision and grows until it
//! holds `minRequests`; only then is it judged and a new window begun. So a canary at
//! 2 % of little traffic is judged on enough requests, later, rather than on three.

use std::collections::HashMap;

use baton_engine::{Measurement, Millis, Verdict};
use baton_proxy::RevisionStats;
use baton_spec::{BuiltinMetric, Gate, MetricSource};

use crate::threshold::judge;

#[derive(Default)]
pub struct Measurer {
    /// (rollout, gate, revision, epoch) → counters at the window's start.
    windows: HashMap<(String, String, String, u64), RevisionStats>,
}

impl Measurer {
    /// One measurement of `gate` on `revision`, from the revision's current counters.
    pub fn measure(
        &mut self,
        rollout: &str,
        gate: &Gate,
        revision: &str,
        epoch: u64,
        current: &RevisionStats,
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
        let Some(start) = self.windows.get(&key) else {
            self.windows.insert(key, current.clone());
            return m(
                Verdict::Inconclusive,
                None,
                0,
                "measurement window opened".into(),
            );
        };
        let window = current.since(start);
        let n = window.requests();
        if n < gate.min_requests {
            return m(
                Verdict::Inconclusive,
                None,
                n,
                format!("{n} request(s) in the window, {} needed", gate.min_requests),
            );
        }
        let MetricSource::Builtin(metric) = gate.metric;
        let value = match metric {
            BuiltinMetric::ErrorRate => window.error_rate(),
            BuiltinMetric::LatencyP50 => window.quantile(0.50),
            BuiltinMetric::LatencyP90 => window.quantile(0.90),
            BuiltinMetric::LatencyP99 => window.quantile(0.99),
        };
        self.windows.insert(key, current.clone());
        match value {
            Some(v) => {
                let (verdict, detail) = judge(gate, v);
                m(
                    verdict,
                    Some(v),
                    n,
                    format!("{} over {n} requests: {detail}", metric.as_str()),
                )
            }
            None => m(Verdict::Inconclusive, None, n, "no data".into()),
        }
    }
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
        }
    }

    fn stats(ok: u64, errors: u64) -> RevisionStats {
        let mut s = RevisionStats {
            buckets: vec![0; baton_proxy::BUCKETS.len() + 1],
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
            m.measure("r", &g, "v2", 1, &stats(0, 0), 0).verdict,
            Verdict::Inconclusive
        );
        let few = m.measure("r", &g, "v2", 1, &stats(5, 5), 1);
        assert_eq!(few.verdict, Verdict::Inconclusive, "{}", few.detail);
        // The window kept growing from the start: 40 requests, 10 errors.
        let judged = m.measure("r", &g, "v2", 1, &stats(30, 10), 2);
        assert_eq!(judged.verdict, Verdict::Fail);
        assert_eq!(judged.value, Some(0.25));
        assert_eq!(judged.requests, 40);
        // A fresh window: 30 more good requests.
        let next = m.measure("r", &g, "v2", 1, &stats(60, 10), 3);
        assert_eq!(next.verdict, Verdict::Pass);
        assert_eq!(next.value, Some(0.0));
    }

    #[test]
    fn a_new_epoch_starts_a_new_window() {
        let g = gate(BuiltinMetric::LatencyP99, "result < 0.8", 1);
        let mut m = Measurer::default();
        m.measure("r", &g, "v2", 1, &stats(10, 0), 0);
        let again = m.measure("r", &g, "v2", 2, &stats(20, 0), 1);
        assert_eq!(again.verdict, Verdict::Inconclusive);
    }
}

//! The registry: picks a provider by the gate's `metric` field and judges its answer.
//! Kept apart from `provider.rs` so that the providers, which implement its trait, and
//! the registry, which calls them, do not import each other.

use baton_engine::{Measurement, Millis, Verdict};
use baton_spec::{Gate, MetricSource};

use crate::command::Command;
use crate::prometheus::Prometheus;
use crate::provider::{MetricProvider, ProviderError, Sample, Vars};
use crate::smoke::Smoke;
use crate::threshold::judge;
use crate::web::Web;

/// Takes one measurement of an external (non-builtin) gate and judges it.
pub async fn measure(gate: &Gate, vars: &Vars, now: Millis) -> Measurement {
    let result = match &gate.metric {
        MetricSource::Prometheus(p) => Prometheus(p).sample(vars).await,
        MetricSource::Web(w) => Web(w).sample(vars).await,
        MetricSource::Command(c) => Command(c).sample(vars).await,
        MetricSource::Smoke(tests) => Smoke(tests).sample(vars).await,
        MetricSource::Builtin(_) | MetricSource::Scorecard(_) => Err(ProviderError::Invalid(
            "builtin metrics are measured from the proxy's counters".into(),
        )),
    };
    judge_sample(gate, &vars.revision, now, result)
}

/// Turns a provider's answer into a verdict with the gate's conditions.
pub fn judge_sample(
    gate: &Gate,
    revision: &str,
    now: Millis,
    result: Result<Sample, ProviderError>,
) -> Measurement {
    let (verdict, value, detail) = match result {
        Ok(Sample::Value(v)) if v.is_nan() => (
            Verdict::Inconclusive,
            None,
            "the result is NaN (no data)".to_string(),
        ),
        Ok(Sample::Value(v)) => {
            let (verdict, detail) =
                if gate.success_condition.is_none() && gate.failure_condition.is_none() {
                    // Commands: the exit status is the verdict.
                    if v == 0.0 {
                        (Verdict::Pass, "exit status 0".to_string())
                    } else {
                        (Verdict::Fail, format!("exit status {v}"))
                    }
                } else {
                    judge(gate, v)
                };
            (verdict, Some(v), detail)
        }
        Ok(Sample::NoData(why)) => (Verdict::Inconclusive, None, why),
        Ok(Sample::Check { passed, detail }) => {
            let v = if passed { 0.0 } else { 1.0 };
            (
                if passed { Verdict::Pass } else { Verdict::Fail },
                Some(v),
                detail,
            )
        }
        Err(e) => (Verdict::Error, None, e.to_string()),
    };
    Measurement {
        gate: gate.name.clone(),
        revision: revision.to_string(),
        verdict,
        value,
        requests: 0,
        at: now,
        detail,
    }
}

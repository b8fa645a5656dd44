//! The threshold judge: a measured value against the gate's conditions.

use baton_engine::Verdict;
use baton_spec::Gate;
use evalexpr::{ContextWithMutableVariables, DefaultNumericTypes, HashMapContext, Value};

/// `Pass` when the success condition (if any) holds and the failure condition (if any)
/// does not; the detail says which expression decided and with what value.
pub fn judge(gate: &Gate, result: f64) -> (Verdict, String) {
    let mut ctx = HashMapContext::<DefaultNumericTypes>::new();
    if let Err(e) = ctx.set_value("result".into(), Value::Float(result)) {
        return (Verdict::Inconclusive, format!("cannot bind result: {e}"));
    }
    let eval = |c: &str| evalexpr::eval_boolean_with_context(c, &ctx);
    if let Some(c) = &gate.failure_condition {
        match eval(c) {
            Ok(true) => {
                return (
                    Verdict::Fail,
                    format!("result {result:.4} meets failureCondition `{c}`"),
                );
            }
            Ok(false) => {}
            Err(e) => {
                return (
                    Verdict::Inconclusive,
                    format!("failureCondition `{c}`: {e}"),
                );
            }
        }
    }
    if let Some(c) = &gate.success_condition {
        return match eval(c) {
            Ok(true) => (Verdict::Pass, format!("result {result:.4} meets `{c}`")),
            Ok(false) => (
                Verdict::Fail,
                format!("result {result:.4} does not meet `{c}`"),
            ),
            Err(e) => (
                Verdict::Inconclusive,
                format!("successCondition `{c}`: {e}"),
            ),
        };
    }
    (
        Verdict::Pass,
        format!("result {result:.4} does not meet failureCondition"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_spec::{BuiltinMetric, Duration, MetricSource};

    fn gate(success: Option<&str>, failure: Option<&str>) -> Gate {
        Gate {
            success_condition: success.map(str::to_string),
            failure_condition: failure.map(str::to_string),
            interval: Duration::from_secs(1),
            min_requests: 1,
            judging: baton_spec::Judging::Interval,
            ..Gate::new("g", MetricSource::Builtin(BuiltinMetric::LatencyP99))
        }
    }

    #[test]
    fn conditions_decide() {
        let g = gate(Some("result < 0.800"), None);
        assert_eq!(judge(&g, 0.2).0, Verdict::Pass);
        let (v, detail) = judge(&g, 0.9);
        assert_eq!(v, Verdict::Fail);
        assert!(
            detail.contains("0.9000") && detail.contains("result < 0.800"),
            "{detail}"
        );
        let g = gate(Some("result < 0.8"), Some("result > 0.5"));
        assert_eq!(judge(&g, 0.6).0, Verdict::Fail, "failureCondition wins");
        assert_eq!(judge(&g, 0.4).0, Verdict::Pass);
        let g = gate(None, Some("result >= 0.05"));
        assert_eq!(judge(&g, 0.01).0, Verdict::Pass);
        assert_eq!(judge(&g, 0.05).0, Verdict::Fail);
    }
}

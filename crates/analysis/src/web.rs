//! The web provider: an HTTP GET whose JSON answer holds the value.

use baton_spec::WebMetric;

use crate::provider::{MetricProvider, ProviderError, Sample, Vars, http_get};

pub struct Web<'a>(pub &'a WebMetric);

impl MetricProvider for Web<'_> {
    async fn sample(&self, vars: &Vars) -> Result<Sample, ProviderError> {
        let url = vars.apply(&self.0.url);
        let headers: Vec<(String, String)> = self
            .0
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), vars.apply(v)))
            .collect();
        let body = http_get(&url, &headers, self.0.timeout.0, "the web metric").await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Invalid(format!("the web metric's answer is not JSON: {e}"))
        })?;
        pick(&v, self.0.json_path.as_deref().unwrap_or(""))
    }
}

/// The number at a dotted path (`data.items.0.value`). A dotted path covers what a
/// gate reads; a JSONPath engine would be a dependency for features no gate needs.
pub fn pick(v: &serde_json::Value, path: &str) -> Result<Sample, ProviderError> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = match (cur, part.parse::<usize>()) {
            (serde_json::Value::Array(a), Ok(i)) => a.get(i),
            (serde_json::Value::Object(o), _) => o.get(part),
            _ => None,
        }
        .ok_or_else(|| {
            ProviderError::Invalid(format!(
                "the answer has nothing at {path:?} (stopped at {part:?})"
            ))
        })?;
    }
    match cur {
        serde_json::Value::Number(n) => Ok(Sample::Value(n.as_f64().unwrap_or(f64::NAN))),
        serde_json::Value::String(s) => s
            .parse()
            .map(Sample::Value)
            .map_err(|_| ProviderError::Invalid(format!("{path:?} holds {s:?}, not a number"))),
        serde_json::Value::Bool(b) => Ok(Sample::Value(if *b { 1.0 } else { 0.0 })),
        serde_json::Value::Null => Ok(Sample::NoData(format!("{path:?} is null"))),
        other => Err(ProviderError::Invalid(format!(
            "{path:?} holds {other}, not a number"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_reach_numbers() {
        let v = serde_json::json!({"data": {"items": [{"value": 0.5}, {"value": "7"}], "ok": true, "none": null}});
        assert_eq!(pick(&v, "data.items.0.value"), Ok(Sample::Value(0.5)));
        assert_eq!(pick(&v, "data.items.1.value"), Ok(Sample::Value(7.0)));
        assert_eq!(pick(&v, "data.ok"), Ok(Sample::Value(1.0)));
        assert!(matches!(pick(&v, "data.none"), Ok(Sample::NoData(_))));
        assert!(pick(&v, "data.items.5").is_err());
        assert!(
            pick(&v, "data")
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
    }
}

//! The Prometheus provider: an instant query over `/api/v1/query`.

use baton_spec::PrometheusMetric;

use crate::provider::{MetricProvider, ProviderError, Sample, Vars, http_get};

pub struct Prometheus<'a>(pub &'a PrometheusMetric);

impl MetricProvider for Prometheus<'_> {
    async fn sample(&self, vars: &Vars) -> Result<Sample, ProviderError> {
        let query = vars.apply(&self.0.query);
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", &query)
            .finish();
        let url = format!(
            "{}/api/v1/query?{encoded}",
            self.0.address.trim_end_matches('/')
        );
        let body = http_get(&url, &[], self.0.timeout.0, "Prometheus").await?;
        parse(&body, &query)
    }
}

/// The `data` of a query answer, or why the query gave none.
pub(crate) fn data(body: &[u8], query: &str) -> Result<serde_json::Value, ProviderError> {
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ProviderError::Invalid(format!(
            "Prometheus answered something that is not JSON: {e}"
        ))
    })?;
    if v["status"] != "success" {
        return Err(ProviderError::Invalid(format!(
            "Prometheus refused the query `{query}`: {}",
            v["error"].as_str().unwrap_or("no reason given")
        )));
    }
    Ok(v["data"].take())
}

/// Reads a query answer: one number, or why there is none.
pub fn parse(body: &[u8], query: &str) -> Result<Sample, ProviderError> {
    let data = &data(body, query)?;
    let number = |pair: &serde_json::Value| -> Result<f64, ProviderError> {
        let text = pair[1].as_str().unwrap_or("");
        text.parse::<f64>().map_err(|_| {
            ProviderError::Invalid(format!("Prometheus value {text:?} is not a number"))
        })
    };
    match data["resultType"].as_str() {
        Some("scalar") => number(&data["result"]).map(Sample::Value),
        Some("vector") => {
            let series = data["result"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            match series {
                [] => Ok(Sample::NoData(format!(
                    "`{query}` returned no series (no traffic yet, or a label that matches nothing)"
                ))),
                [one] => number(&one["value"]).map(Sample::Value),
                many => Err(ProviderError::Invalid(format!(
                    "`{query}` returned {} series; aggregate it to one (e.g. with sum or max)",
                    many.len()
                ))),
            }
        }
        other => Err(ProviderError::Invalid(format!(
            "`{query}` returned a {} result; a gate needs a scalar or a single-series vector",
            other.unwrap_or("missing")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_samples_or_clear_errors() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"0.25"]}]}}"#;
        assert_eq!(parse(vector, "q"), Ok(Sample::Value(0.25)));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.0,"3"]}}"#;
        assert_eq!(parse(scalar, "q"), Ok(Sample::Value(3.0)));
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"NaN"]}]}}"#;
        assert!(matches!(parse(nan, "q"), Ok(Sample::Value(v)) if v.is_nan()));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(matches!(parse(empty, "q"), Ok(Sample::NoData(r)) if r.contains("no series")));
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#;
        assert!(
            parse(two, "q")
                .unwrap_err()
                .to_string()
                .contains("2 series")
        );
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(
            parse(matrix, "q")
                .unwrap_err()
                .to_string()
                .contains("matrix")
        );
        let refused =
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        assert!(
            parse(refused, "q")
                .unwrap_err()
                .to_string()
                .contains("parse error")
        );
    }
}

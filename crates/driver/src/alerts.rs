//! Alertmanager as a trigger: the rollouts its webhook's firing alerts name, to abort.
//!
//! Both platforms take the same payload (Alertmanager's webhook, version 4) and the
//! same labels: `rollout` names the Rollout, `namespace` its namespace on a cluster
//! (ignored on one machine). Resolved alerts and alerts without a `rollout` label
//! abort nothing; they are counted so that the answer says why.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The label naming the Rollout an alert is about.
pub const ROLLOUT_LABEL: &str = "rollout";
/// The label naming its namespace (a cluster only).
pub const NAMESPACE_LABEL: &str = "namespace";

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error("not an Alertmanager webhook payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("Alertmanager webhook version {0:?}: Baton reads version 4")]
    Version(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    version: String,
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One abort an alert asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlertAbort {
    pub namespace: Option<String>,
    pub rollout: String,
    /// The alert's `alertname`, as the audit trail records it.
    pub alert: String,
}

impl AlertAbort {
    /// Who the audit trail says asked: the alert, by name.
    pub fn actor(&self) -> String {
        format!("alert:{}", self.alert)
    }
}

/// What a webhook delivery asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AlertBatch {
    /// One per (namespace, rollout, alert), in that order.
    pub aborts: Vec<AlertAbort>,
    /// Resolved alerts in the delivery.
    pub resolved: usize,
    /// Firing alerts with no `rollout` label.
    pub unlabelled: usize,
}

/// Names from alert labels go into audit records and log lines: printable, short.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-:/".contains(*c))
        .take(128)
        .collect()
}

/// Reads one webhook delivery.
pub fn parse(body: &[u8]) -> Result<AlertBatch, AlertsError> {
    let p: Payload = serde_json::from_slice(body)?;
    if p.version != "4" {
        return Err(AlertsError::Version(p.version.chars().take(16).collect()));
    }
    let mut batch = AlertBatch::default();
    for a in p.alerts {
        if a.status != "firing" {
            batch.resolved += 1;
            continue;
        }
        let rollout = a
            .labels
            .get(ROLLOUT_LABEL)
            .map(|r| clean(r))
            .unwrap_or_default();
        if rollout.is_empty() {
            batch.unlabelled += 1;
            continue;
        }
        let alert = a
            .labels
            .get("alertname")
            .map(|n| clean(n))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "unnamed".into());
        batch.aborts.push(AlertAbort {
            namespace: a.labels.get(NAMESPACE_LABEL).map(|n| clean(n)),
            rollout,
            alert,
        });
    }
    batch.aborts.sort();
    batch.aborts.dedup();
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firing_alerts_with_a_rollout_label_abort_it() {
        let body = br#"{"version":"4","groupKey":"{}:{}","status":"firing","receiver":"baton",
            "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am",
            "alerts":[
              {"status":"firing","labels":{"alertname":"TradeErrors","rollout":"trade","namespace":"exchange"},"annotations":{},"startsAt":"2026-11-30T10:00:00Z"},
              {"status":"firing","labels":{"alertname":"TradeErrors","rollout":"trade","namespace":"exchange","instance":"b"}},
              {"status":"resolved","labels":{"alertname":"Old","rollout":"trade"}},
              {"status":"firing","labels":{"alertname":"DiskFull"}},
              {"status":"firing","labels":{"rollout":"hello\n; rm -rf"}}
            ]}"#;
        let b = parse(body).expect("parsed");
        assert_eq!(
            b.aborts,
            vec![
                AlertAbort {
                    namespace: None,
                    rollout: "hellorm-rf".into(),
                    alert: "unnamed".into()
                },
                AlertAbort {
                    namespace: Some("exchange".into()),
                    rollout: "trade".into(),
                    alert: "TradeErrors".into()
                },
            ]
        );
        assert_eq!((b.resolved, b.unlabelled), (1, 1));
        assert_eq!(b.aborts[1].actor(), "alert:TradeErrors");
    }

    #[test]
    fn other_payloads_are_refused_with_the_reason() {
        let e = parse(br#"{"version":"3","alerts":[]}"#).expect_err("version");
        assert!(e.to_string().contains("version \"3\""), "{e}");
        let e = parse(b"not json").expect_err("json");
        assert!(
            e.to_string()
                .starts_with("not an Alertmanager webhook payload"),
            "{e}"
        );
        assert!(parse(br#"{"alerts":[]}"#).is_err(), "no version");
    }
}

//! The audit trail on a cluster: the same hash chain as on one machine
//! (`baton-audit`), one ConfigMap per Rollout (`baton-audit-NAME`, an entry a JSON
//! line under `entries`).
//!
//! Why a ConfigMap: Events expire within the hour and a Rollout's status is rewritten
//! at every step, so neither can hold history; a ConfigMap is durable, readable with
//! plain `kubectl`, and owned by no Rollout, so deleting a Rollout keeps its trail.
//! Appends are optimistic replaces (a concurrent writer makes the next try re-read),
//! so two operator replicas never fork the chain. The operator writes an event after
//! the status that produced it, from the driver's outbox: a retold event (same time,
//! actor, action and words as one of the last entries) is not written twice.
//! Limits: a ConfigMap holds about 1 MiB (a few thousand entries); and, as on one
//! machine without its head file, removing the newest entries leaves a shorter valid
//! chain.

use baton_audit::{Entry, NewEntry};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::Error;

/// Labels each trail with its Rollout.
pub const AUDIT_LABEL: &str = "baton.dev/audit-of";
const KEY: &str = "entries";
/// Optimistic appends tried before giving up (and logging).
const TRIES: usize = 5;

pub fn configmap_name(rollout: &str) -> String {
    format!("baton-audit-{rollout}")
}

fn entries_of(cm: &ConfigMap) -> Result<Vec<Entry>, Error> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .map(|text| {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(Error::from))
                .collect()
        })
        .unwrap_or_else(|| Ok(Vec::new()))
}

fn text_of(entries: &[Entry]) -> Result<String, Error> {
    let mut out = String::new();
    for e in entries {
        out.push_str(&serde_json::to_string(e)?);
        out.push('\n');
    }
    Ok(out)
}

/// Appends one entry to the Rollout's trail; `false` when it was already there.
pub async fn append(
    client: &Client,
    ns: &str,
    rollout: &str,
    new: NewEntry,
    at: u64,
) -> Result<bool, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let name = configmap_name(rollout);
    for _ in 0..TRIES {
        let existing = api.get_opt(&name).await?;
        let mut entries = match &existing {
            Some(cm) => entries_of(cm)?,
            None => Vec::new(),
        };
        let told = entries.iter().rev().take(64).any(|e| {
            e.at == at && e.actor == new.actor && e.action == new.action && e.reason == new.reason
        });
        if told {
            return Ok(false);
        }
        entries.push(Entry::after(entries.last(), new.clone(), at));
        let text = text_of(&entries)?;
        let written = match existing {
            Some(mut cm) => {
                cm.data
                    .get_or_insert_with(Default::default)
                    .insert(KEY.into(), text);
                cm.metadata.managed_fields = None;
                api.replace(&name, &PostParams::default(), &cm).await
            }
            None => {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns, "labels": {AUDIT_LABEL: rollout}},
                    "data": {KEY: text},
                }))?;
                api.create(&PostParams::default(), &cm).await
            }
        };
        match written {
            Ok(_) => return Ok(true),
            // Someone else appended (or created it) first: read again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Spec(format!(
        "the audit trail of {rollout} kept changing under {TRIES} appends"
    )))
}

/// Every trail in the namespace (or the one Rollout's), as `(rollout, entries)`.
pub async fn trails(
    client: &Client,
    ns: &str,
    rollout: Option<&str>,
) -> Result<Vec<(String, Vec<Entry>)>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let selector = match rollout {
        Some(r) => format!("{AUDIT_LABEL}={r}"),
        None => AUDIT_LABEL.to_string(),
    };
    let mut out = Vec::new();
    for cm in api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let of = cm
            .labels()
            .get(AUDIT_LABEL)
            .cloned()
            .unwrap_or_else(|| cm.name_any());
        out.push((of, entries_of(&cm)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

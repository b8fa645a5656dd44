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
//!
//! Whoever may edit ConfigMaps in a Rollout's namespace (the built-in `edit` role
//! may) could rewrite or truncate a bare chain. So, as on one machine, each entry is
//! signed with a key the operator alone holds (`BATON_AUDIT_KEY` in its environment,
//! from a Secret), and every trail's head (`SEQ HASH`, the high-water mark) is kept
//! in the ConfigMap `baton-audit-heads` in the operator's own namespace, out of those
//! editors' reach. An append to a trail that no longer reaches its head is refused.
//! Limits: a ConfigMap holds about 1 MiB (a few thousand entries per trail; the
//! heads of some five thousand trails).

use std::collections::BTreeMap;

use baton_audit::{Entry, Head, Key, NewEntry, check_tail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::Error;

/// The ConfigMap, in the operator's namespace, that holds the head of every trail
/// under the key `NAMESPACE.ROLLOUT`.
pub const HEADS: &str = "baton-audit-heads";
/// The operator's environment variable with the key that signs entries.
pub const KEY_ENV: &str = "BATON_AUDIT_KEY";

/// What protects the trails: the key, and where their heads are kept.
#[derive(Debug, Clone, Default)]
pub struct Seal {
    pub key: Option<Key>,
    /// The operator's own namespace, where `baton-audit-heads` lives; `None` keeps no
    /// heads (tests of other things).
    pub heads_namespace: Option<String>,
}

impl Seal {
    /// The operator's: the key from `BATON_AUDIT_KEY` when set, the heads in `heads_namespace`.
    pub fn from_env(heads_namespace: &str) -> Result<Seal, Error> {
        let key = match std::env::var(KEY_ENV) {
            Ok(text) => {
                Some(Key::from_text(&text).map_err(|e| Error::Audit(format!("{KEY_ENV}: {e}")))?)
            }
            Err(_) => None,
        };
        Ok(Seal {
            key,
            heads_namespace: Some(heads_namespace.to_string()),
        })
    }
}

fn head_key(ns: &str, rollout: &str) -> String {
    // A namespace has no dots, so the first one splits the key.
    format!("{ns}.{rollout}")
}

/// Every head recorded in `heads_namespace`, by `NAMESPACE.ROLLOUT`; `None` when no
/// head was ever recorded there.
pub async fn heads(
    client: &Client,
    heads_namespace: &str,
) -> Result<Option<BTreeMap<String, Head>>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), heads_namespace);
    let Some(cm) = api.get_opt(HEADS).await? else {
        return Ok(None);
    };
    let at = |k: &str| format!("ConfigMap {HEADS} in {heads_namespace}, key {k}");
    cm.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let h = Head::parse(&v, &at(&k)).map_err(|e| Error::Audit(e.to_string()))?;
            Ok((k, h))
        })
        .collect::<Result<_, Error>>()
        .map(Some)
}

/// Records `head` as the trail's newest; never moves a head back (a slower writer's
/// older head loses).
async fn write_head(api: &Api<ConfigMap>, key: &str, head: &Head) -> Result<(), Error> {
    for _ in 0..TRIES {
        let existing = api.get_opt(HEADS).await?;
        let text = head.text();
        let written = match existing {
            Some(mut cm) => {
                let data = cm.data.get_or_insert_with(Default::default);
                let newer = data
                    .get(key)
                    .and_then(|t| Head::parse(t, key).ok())
                    .is_some_and(|h| h.seq >= head.seq);
                if newer {
                    return Ok(());
                }
                data.insert(key.to_string(), text);
                cm.metadata.managed_fields = None;
                api.replace(HEADS, &crate::post_params(), &cm).await
            }
            None => {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": HEADS},
                    "data": {key: text},
                }))?;
                api.create(&crate::post_params(), &cm).await
            }
        };
        match written {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Audit(format!(
        "{HEADS} kept changing under {TRIES} writes of {key}"
    )))
}

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

/// Appends one entry to the Rollout's trail, signed with the seal's key, then records
/// the new head; `false` when it was already there. A trail that no longer reaches
/// its recorded head (truncated, rewritten, or with an unsigned or forged entry after
/// it) is refused: the append would hide that.
pub async fn append(
    client: &Client,
    seal: &Seal,
    ns: &str,
    rollout: &str,
    new: NewEntry,
    at: u64,
) -> Result<bool, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let heads_api: Option<Api<ConfigMap>> = seal
        .heads_namespace
        .as_deref()
        .map(|h| Api::namespaced(client.clone(), h));
    let name = configmap_name(rollout);
    let hk = head_key(ns, rollout);
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
        let head = match &heads_api {
            Some(h) => read_head(h, &hk).await?,
            None => None,
        };
        let last_seq = entries.last().map_or(0, |e| e.seq);
        let from = head.as_ref().map_or(last_seq, |h| h.seq.min(last_seq));
        let tail: Vec<Entry> = entries.iter().filter(|e| e.seq >= from).cloned().collect();
        if let Some(p) = check_tail(&tail, last_seq, head.as_ref(), seal.key.as_ref()) {
            return Err(Error::Audit(format!(
                "nothing appended to the trail of {rollout} (ConfigMap {name}): {p}; if it was reset on purpose, remove the key {hk} from ConfigMap {HEADS} in {}",
                seal.heads_namespace.as_deref().unwrap_or("")
            )));
        }
        if let (None, Some(e)) = (&seal.key, entries.last().filter(|e| e.mac.is_some())) {
            return Err(Error::Audit(format!(
                "nothing appended to the trail of {rollout}: it is signed (entry {} carries a MAC), and the operator has no {KEY_ENV}",
                e.seq
            )));
        }
        entries.push(Entry::after(
            entries.last(),
            new.clone(),
            at,
            seal.key.as_ref(),
        ));
        let new_head = entries.last().map(Head::of);
        let text = text_of(&entries)?;
        let written = match existing {
            Some(mut cm) => {
                cm.data
                    .get_or_insert_with(Default::default)
                    .insert(KEY.into(), text);
                cm.metadata.managed_fields = None;
                api.replace(&name, &crate::post_params(), &cm).await
            }
            None => {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns, "labels": {AUDIT_LABEL: rollout}},
                    "data": {KEY: text},
                }))?;
                api.create(&crate::post_params(), &cm).await
            }
        };
        match written {
            Ok(_) => {
                if let (Some(h), Some(head)) = (&heads_api, new_head) {
                    // The entry is written: a head that lags is caught up by the next
                    // append, and entries after it must be signed meanwhile.
                    if let Err(e) = write_head(h, &hk, &head).await {
                        tracing::warn!(rollout = %rollout, error = %e, "cannot record the audit trail's head");
                    }
                }
                return Ok(true);
            }
            // Someone else appended (or created it) first: read again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Spec(format!(
        "the audit trail of {rollout} kept changing under {TRIES} appends"
    )))
}

async fn read_head(api: &Api<ConfigMap>, key: &str) -> Result<Option<Head>, Error> {
    let Some(cm) = api.get_opt(HEADS).await? else {
        return Ok(None);
    };
    cm.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|t| Head::parse(t, &format!("ConfigMap {HEADS}, key {key}")))
        .transpose()
        .map_err(|e| Error::Audit(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use baton_audit::{Problem, check};

    const NS: &str = "default";

    async fn client() -> (baton_kube_fake::FakeApi, Client) {
        let api = baton_kube_fake::FakeApi::start().await.expect("fake api");
        let config = kube::Config::new(api.url().parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        (api, client)
    }

    fn entry(i: u64) -> NewEntry {
        NewEntry {
            actor: "baton".into(),
            action: "step".into(),
            rollout: "web".into(),
            revision: None,
            spec_digest: None,
            reason: format!("step {i}"),
        }
    }

    fn seal() -> Seal {
        Seal {
            key: Some(Key::from_text("0123456789abcdef0123456789abcdef").expect("key")),
            heads_namespace: Some("baton-system".into()),
        }
    }

    /// What `verify` finds in the trail of `web`, against its head.
    async fn problem(client: &Client) -> Option<Problem> {
        let heads = heads(client, "baton-system").await.expect("heads");
        let head = heads.as_ref().and_then(|h| h.get("default.web"));
        let trails = trails(client, NS, Some("web")).await.expect("trails");
        let entries = trails.first().map(|t| t.1.clone()).unwrap_or_default();
        check(&entries, head, seal().key.as_ref()).problem
    }

    /// Rewrites the trail's text as whoever may edit ConfigMaps in its namespace can.
    async fn edit(client: &Client, f: impl FnOnce(&mut Vec<Entry>)) {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let mut cm = api.get(&configmap_name("web")).await.expect("trail");
        let mut entries = entries_of(&cm).expect("entries");
        f(&mut entries);
        let text = text_of(&entries).expect("text");
        cm.data
            .get_or_insert_with(Default::default)
            .insert(KEY.into(), text);
        cm.metadata.managed_fields = None;
        api.replace(&configmap_name("web"), &crate::post_params(), &cm)
            .await
            .expect("edit");
    }

    #[tokio::test]
    async fn a_truncated_or_forged_trail_is_caught_and_never_healed() {
        let (_api, client) = client().await;
        let seal = seal();
        for i in 1..=6 {
            assert!(
                append(&client, &seal, NS, "web", entry(i), 1000 + i)
                    .await
                    .expect("append")
            );
        }
        assert_eq!(problem(&client).await, None);
        let heads = heads(&client, "baton-system").await.expect("heads");
        assert_eq!(
            heads.and_then(|h| h.get("default.web").map(|h| h.seq)),
            Some(6)
        );

        // The newest two entries cut off: caught, and the next append is refused
        // rather than reusing their sequence numbers.
        let mut kept = Vec::new();
        edit(&client, |e| kept = e.split_off(4)).await;
        let truncated = Some(Problem::Truncated {
            head_seq: 6,
            last_seq: 4,
        });
        assert_eq!(problem(&client).await, truncated);
        let refused = append(&client, &seal, NS, "web", entry(7), 2000).await;
        assert!(
            matches!(&refused, Err(Error::Audit(m)) if m.contains("truncated")),
            "{refused:?}"
        );
        assert_eq!(problem(&client).await, truncated);

        // Put back, then an entry forged after the head without the key.
        edit(&client, |e| {
            e.extend(kept);
            let forged = Entry::after(e.last(), entry(99), 3000, None);
            e.push(forged);
        })
        .await;
        assert_eq!(problem(&client).await, Some(Problem::Unsigned { seq: 7 }));
        let refused = append(&client, &seal, NS, "web", entry(8), 4000).await;
        assert!(
            matches!(&refused, Err(Error::Audit(m)) if m.contains("entry 7 carries no MAC")),
            "{refused:?}"
        );

        // Without the forged entry it is whole again.
        edit(&client, |e| {
            e.pop();
        })
        .await;
        assert_eq!(problem(&client).await, None);
    }
}

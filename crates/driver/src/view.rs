//! One typed view of a rollout, behind `status` on both platforms and the dashboard:
//! each platform supplies what it sees of a revision's instances, the rest comes from
//! the status. Its JSON field names are what `--output json` has always printed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write;

use baton_engine::{Measurement, Status};
use serde::{Deserialize, Serialize};

/// A string as a terminal may safely show it: control characters (`\n`, `\x1b`, C1),
/// bidirectional overrides and the backslash itself escaped, so a name, version or
/// env value can neither draw a forged row nor send a terminal escape. Every text
/// renderer (status, history, audit, on both platforms) prints through this; JSON
/// output is escaped by serde already.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        // Bidirectional marks, embeddings, overrides and isolates reorder what
        // follows them on screen.
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub phase: String,
    pub message: String,
    /// `canary`, `blueGreen` or `rolling`.
    pub strategy: String,
    pub stable_revision: Option<String>,
    pub canary_revision: Option<String>,
    /// The revision the spec asks for now: Healthy with it stable is a finished rollout.
    pub spec_revision: String,
    pub stable_version: Option<String>,
    pub canary_version: Option<String>,
    /// The canary's weight as the status desires it (`revisions[].weight` likewise);
    /// `routerAcked` against `routeVersion` says whether the router confirmed it.
    pub canary_weight: u32,
    pub aborted: bool,
    pub step: Option<StepView>,
    pub route_version: u64,
    pub router_acked: u64,
    /// Where traffic enters: a listen address, or the namespace on a cluster.
    pub listen: String,
    /// Why the router does not serve this rollout's route as asked (it keeps the
    /// route it had): `revisions[].servedWeight` is what it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_error: Option<String>,
    /// A failure of Baton's own that holds the rollout back (on one machine, a full
    /// state disk): said apart, never laid on the rollout's instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baton_error: Option<String>,
    pub revisions: Vec<RevisionView>,
    pub gates: Vec<GateView>,
    /// Kubernetes conditions, on a cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub index: usize,
    pub total: usize,
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionView {
    pub name: String,
    pub number: u64,
    pub app_version: Option<String>,
    /// `stable`, `canary`, `aborted` or `previous`.
    pub role: String,
    /// The weight the status desires.
    pub weight: u32,
    /// The weight the router confirmed serving; `null` while that is not known (a
    /// change not yet confirmed on a router that does not report its table).
    #[serde(default)]
    pub served_weight: Option<u32>,
    pub preview: bool,
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    pub available_replicas: u32,
    pub restarts: u32,
    /// One machine: each instance (address, pid, state).
    pub instances: Vec<serde_json::Value>,
    /// A cluster: the revision's ReplicaSet and its replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateView {
    pub name: String,
    pub passes: u32,
    pub failures: u32,
    pub inconclusive: u32,
    pub last: Option<Measurement>,
}

/// What a platform sees of one revision's instances.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The platform has instances (or a ReplicaSet) of it: shown even when the status
    /// no longer wants it.
    pub present: bool,
    pub ready: u32,
    pub available: u32,
    pub restarts: u32,
    pub instances: Vec<serde_json::Value>,
    pub replica_set: Option<String>,
    pub replicas: Option<u32>,
}

/// What the platform knows of the router's side of a rollout.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// The highest route version the router confirmed serving.
    pub acked: u64,
    /// The weight per revision the router serves, when the platform can read it back
    /// (the built-in proxy's table); otherwise the desired weights count as served
    /// once `acked` reaches the status' route version.
    pub served: Option<BTreeMap<String, u32>>,
    /// Why the router does not serve the route asked for.
    pub refusal: Option<String>,
}

/// The view of a rollout from its status and what the platform sees of each revision.
pub fn rollout(
    name: &str,
    spec: &baton_spec::Rollout,
    status: &Status,
    routing: Routing,
    listen: String,
    seen: impl Fn(&str) -> Seen,
) -> RolloutView {
    let router_acked = routing.acked;
    let served = |rev: &str| match &routing.served {
        Some(m) => Some(m.get(rev).copied().unwrap_or(0)),
        None => (router_acked >= status.route_version).then(|| status.weight(rev)),
    };
    let (strategy, steps): (&str, Vec<String>) = match spec.spec.strategy.kind() {
        baton_spec::StrategyRef::Canary(c) => (
            "canary",
            c.steps.iter().map(baton_engine::describe).collect(),
        ),
        baton_spec::StrategyRef::BlueGreen(_) => ("blueGreen", vec![]),
        baton_spec::StrategyRef::Rolling(_) => ("rolling", vec![]),
    };
    let version = |rev: &Option<String>| {
        rev.as_ref()
            .and_then(|r| status.revision(r))
            .and_then(|r| r.run.app_version().map(str::to_string))
    };
    let mut revisions: Vec<RevisionView> = status
        .revisions
        .iter()
        .filter_map(|r| {
            let s = seen(&r.name);
            let wanted = Some(&r.name) == status.stable.as_ref()
                || Some(&r.name) == status.canary.as_ref()
                || status.desired.contains_key(&r.name)
                || served(&r.name).is_some_and(|w| w > 0);
            if !wanted && !s.present {
                return None;
            }
            let role = if Some(&r.name) == status.stable.as_ref() {
                "stable"
            } else if Some(&r.name) == status.canary.as_ref() {
                if status.aborted { "aborted" } else { "canary" }
            } else {
                "previous"
            };
            Some(RevisionView {
                name: r.name.clone(),
                number: r.number,
                app_version: r.run.app_version().map(str::to_string),
                role: role.into(),
                weight: status.weight(&r.name),
                served_weight: served(&r.name),
                preview: status.preview.as_ref() == Some(&r.name),
                desired_replicas: status.desired.get(&r.name).copied().unwrap_or(0),
                ready_replicas: s.ready,
                available_replicas: s.available,
                restarts: s.restarts,
                instances: s.instances,
                replica_set: s.replica_set,
                replicas: s.replicas,
            })
        })
        .collect();
    revisions.sort_by_key(|r| r.number);
    RolloutView {
        name: name.to_string(),
        namespace: None,
        phase: status.phase.as_str().into(),
        message: status.message.clone(),
        strategy: strategy.into(),
        stable_revision: status.stable.clone(),
        canary_revision: status.canary.clone(),
        spec_revision: spec.spec.run.revision_hash(),
        stable_version: version(&status.stable),
        canary_version: version(&status.canary),
        canary_weight: status.canary.as_ref().map_or(0, |c| status.weight(c)),
        aborted: status.aborted,
        step: (!steps.is_empty()).then(|| StepView {
            index: status.step_index.min(steps.len()),
            total: steps.len(),
            steps,
        }),
        route_version: status.route_version,
        router_acked,
        listen,
        routing_error: routing.refusal,
        baton_error: None,
        revisions,
        gates: status
            .gates
            .iter()
            .map(|(n, g)| GateView {
                name: n.clone(),
                passes: g.passes,
                failures: g.failures,
                inconclusive: g.inconclusive,
                last: g.last.clone(),
            })
            .collect(),
        conditions: Vec::new(),
        observed_generation: None,
        generation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("v2"), "v2");
        assert!(matches!(
            printable("plain v2.1-rc"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            printable("v2\x1b[2J\nforged\trow\r\u{7f}\u{9b}"),
            "v2\\x1b[2J\\nforged\\trow\\r\\x7f\\u{9b}"
        );
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
        // A literal backslash is escaped too, so `\\n` typed by hand never reads as an
        // escaped newline.
        assert_eq!(printable("C:\\n"), "C:\\\\n");
        assert_eq!(printable("naïve ✔ 日本"), "naïve ✔ 日本");
    }
}

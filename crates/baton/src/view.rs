//! What `status` and `history` show: one JSON shape for `--output json` and for the
//! human rendering, so both always agree.

use std::fmt::Write;

use baton_audit::Entry;
use baton_driver::view::Seen;
use baton_engine::Status;
use baton_local::Platform;
use baton_spec::Rollout;
use serde_json::{Value, json};

pub use baton_local::machine::clock;

/// One rollout as `status` shows it: the driver's typed view, with what this machine's
/// processes say of each revision.
pub fn rollout(
    name: &str,
    spec: &Rollout,
    status: &Status,
    acked: u64,
    platform: &Platform,
) -> Value {
    let now = crate::now_ms();
    let obs = platform.observe(name, spec.spec.min_ready_seconds.saturating_mul(1000), now);
    let instances = platform.instances(name);
    let v = baton_driver::view::rollout(
        name,
        spec,
        status,
        acked,
        spec.spec.traffic.listen.clone(),
        |rev| {
            let mine: Vec<Value> = instances
                .iter()
                .filter(|i| i.revision == rev)
                .filter_map(|i| serde_json::to_value(i).ok())
                .collect();
            let o = obs.get(rev).copied().unwrap_or_default();
            Seen {
                present: !mine.is_empty(),
                ready: o.ready,
                available: o.available,
                restarts: platform.restarts(name, rev),
                instances: mine,
                ..Seen::default()
            }
        },
    );
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub fn history(name: &str, status: &Status, events: &[Entry]) -> Value {
    let revisions: Vec<Value> = status
        .revisions
        .iter()
        .map(|r| {
            let outcome = if Some(&r.name) == status.stable.as_ref() {
                "stable"
            } else if r.aborted_at.is_some() && Some(&r.name) == status.canary.as_ref() {
                "aborted"
            } else if Some(&r.name) == status.canary.as_ref() {
                "in progress"
            } else if r.aborted_at.is_some() {
                "aborted"
            } else if r.promoted_at.is_some() || status.stable_history.contains(&r.name) {
                "superseded"
            } else {
                "abandoned"
            };
            let ended = r.promoted_at.or(r.aborted_at);
            json!({
                "number": r.number,
                "name": r.name,
                "appVersion": r.run.app_version(),
                "createdAt": r.created_at,
                "promotedAt": r.promoted_at,
                "abortedAt": r.aborted_at,
                "abortReason": r.abort_reason,
                "durationSeconds": ended.map(|e| e.saturating_sub(r.created_at) as f64 / 1000.0),
                "outcome": outcome,
                "run": r.run,
            })
        })
        .collect();
    json!({ "name": name, "revisions": revisions, "events": events })
}

/// The human form of one rollout's status: name and phase, the steps with the current
/// one marked, a weight bar per revision, and each gate's last result — what
/// `baton status NAME --watch` redraws.
pub fn render(v: &Value) -> String {
    let mut o = String::new();
    let phase = v["phase"].as_str().unwrap_or("");
    let icon = match phase {
        "Healthy" => "✔",
        "Progressing" => "◐",
        "Paused" => "॥",
        "Degraded" => "✖",
        _ => "·",
    };
    let _ = match v["namespace"].as_str() {
        Some(ns) => writeln!(
            o,
            "Name:      {} (namespace {ns})",
            v["name"].as_str().unwrap_or("")
        ),
        None => writeln!(o, "Name:      {}", v["name"].as_str().unwrap_or("")),
    };
    let _ = writeln!(
        o,
        "Phase:     {icon} {phase} — {}",
        v["message"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        o,
        "Strategy:  {}   listen: {}",
        v["strategy"].as_str().unwrap_or(""),
        v["listen"].as_str().unwrap_or("")
    );
    if let Some(step) = v["step"].as_object() {
        let total = step["total"].as_u64().unwrap_or(0) as usize;
        // Without a canary in flight every step is behind us.
        let current = if v["canaryRevision"].is_null() {
            total
        } else {
            step["index"].as_u64().unwrap_or(0) as usize
        };
        let _ = writeln!(o, "Steps:");
        for (i, s) in step["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .enumerate()
        {
            let mark = match i.cmp(&current) {
                std::cmp::Ordering::Less => "✔",
                std::cmp::Ordering::Equal if v["aborted"] == true => "✖",
                std::cmp::Ordering::Equal => "▶",
                std::cmp::Ordering::Greater => " ",
            };
            let _ = writeln!(o, "  {mark} {:>2}. {s}", i + 1);
        }
    }
    let _ = writeln!(o, "Revisions:");
    let _ = writeln!(
        o,
        "  {:<4} {:<10} {:<11} {:<15} {:<26} {:<6} INSTANCES",
        "REV", "VERSION", "NAME", "ROLE", "WEIGHT", "READY"
    );
    for r in v["revisions"].as_array().into_iter().flatten() {
        let w = r["weight"].as_u64().unwrap_or(0);
        let filled = ((w as usize) * 20).div_ceil(100).min(20);
        let bar = format!("{}{}", "█".repeat(filled), "░".repeat(20 - filled));
        let insts: Vec<String> = r["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                format!(
                    "{} {}",
                    i["address"].as_str().unwrap_or(""),
                    i["state"].as_str().unwrap_or("")
                )
            })
            .collect();
        let role = if r["preview"].as_bool() == Some(true) {
            format!("{}+preview", r["role"].as_str().unwrap_or(""))
        } else {
            r["role"].as_str().unwrap_or("").to_string()
        };
        let _ = writeln!(
            o,
            "  #{:<3} {:<10} {:<11} {:<15} {bar} {:>3}%  {:>2}/{:<3} {}",
            r["number"].as_u64().unwrap_or(0),
            r["appVersion"].as_str().unwrap_or("-"),
            r["name"].as_str().unwrap_or(""),
            role,
            w,
            r["readyReplicas"].as_u64().unwrap_or(0),
            r["desiredReplicas"].as_u64().unwrap_or(0),
            insts.join(", ")
        );
    }
    let gates = v["gates"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !gates.is_empty() {
        let _ = writeln!(o, "Gates:");
        for g in gates {
            let last = &g["last"];
            let _ = writeln!(
                o,
                "  {:<14} pass {:>3}  fail {:>2}  last: {:<12} {}",
                g["name"].as_str().unwrap_or(""),
                g["passes"].as_u64().unwrap_or(0),
                g["failures"].as_u64().unwrap_or(0),
                last["verdict"].as_str().unwrap_or("-"),
                last["detail"].as_str().unwrap_or("")
            );
        }
    }
    o
}

/// One `--watch` frame for a terminal: home the cursor, rewrite each line clearing
/// what was there, clear below — no flicker, no scrolling.
pub fn redraw(frame: &str) -> String {
    let mut out = String::from("\x1b[?25l\x1b[H");
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J\x1b[?25h");
    out
}

pub fn render_history(v: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<4} {:<12} {:<10} {:<12} {:>10}  {:<13} REASON",
        "REV", "VERSION", "NAME", "CREATED", "DURATION", "OUTCOME"
    );
    for r in v["revisions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "#{:<3} {:<12} {:<10} {:<12} {:>10}  {:<13} {}",
            r["number"].as_u64().unwrap_or(0),
            r["appVersion"].as_str().unwrap_or("-"),
            r["name"].as_str().unwrap_or(""),
            clock(r["createdAt"].as_u64().unwrap_or(0)),
            r["durationSeconds"]
                .as_f64()
                .map(|d| format!("{d:.1}s"))
                .unwrap_or_else(|| "-".into()),
            r["outcome"].as_str().unwrap_or(""),
            r["abortReason"].as_str().unwrap_or("")
        );
    }
    let events = v["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !events.is_empty() {
        let _ = writeln!(o, "\nlatest events (all with --output json):");
        for e in &events[events.len().saturating_sub(15)..] {
            let _ = writeln!(
                o,
                "  {} {:<15} {}",
                clock(e["at"].as_u64().unwrap_or(0)),
                e["action"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            );
        }
    }
    o
}

/// A unified diff of the specs (as YAML) of two revisions, by number: what
/// `history --diff A B` prints on both platforms.
pub fn spec_diff(name: &str, (from, a): (u64, &str), (to, b): (u64, &str)) -> String {
    similar::TextDiff::from_lines(a, b)
        .unified_diff()
        .header(&format!("{name} #{from}"), &format!("{name} #{to}"))
        .to_string()
}

//! What `status` and `history` show: one JSON shape for `--output json` and for the
//! human rendering, so both always agree.

use std::borrow::Cow;
use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use baton_audit::Entry;
use baton_driver::view::Seen;
pub use baton_driver::view::printable;
use baton_engine::Status;
use baton_local::Platform;
use baton_spec::Rollout;
use serde_json::{Value, json};

pub use baton_local::machine::clock;

pub use baton_driver::view::Routing;

/// Columns as wide as their widest cell, so a long name never pushes the others out of
/// line; two spaces between columns, `right` ones right-aligned (numbers), each line
/// after `indent`. Cells are escaped (`printable`) by the caller.
fn table(indent: &str, header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> String {
    use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.lines()
        .map(|l| format!("{indent}{}\n", l.trim_end()))
        .collect()
}

/// A time as people read it in a table: `2026-11-30 19:20:13` (UTC).
fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms))
        .to_string()
        .replacen('T', " ", 1)
        .trim_end_matches('Z')
        .to_string()
}

/// A string field of a view, as a terminal may show it (`printable`); `or` when absent.
fn text<'a>(v: &'a Value, or: &'a str) -> Cow<'a, str> {
    printable(v.as_str().unwrap_or(or))
}

/// One rollout as `status` shows it: the driver's typed view, with what this machine's
/// processes say of each revision.
pub fn rollout(
    name: &str,
    spec: &Rollout,
    status: &Status,
    routing: Routing,
    platform: &Platform,
) -> Value {
    let now = crate::now_ms();
    let obs = platform.observe(name, spec.spec.min_ready_seconds.saturating_mul(1000), now);
    let instances = platform.instances(name);
    let mut v = baton_driver::view::rollout(
        name,
        spec,
        status,
        routing,
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
    v.baton_error = platform.state_disk_full();
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
    let phase = text(&v["phase"], "");
    let icon = match &*phase {
        "Healthy" => "✔",
        "Progressing" => "◐",
        "Paused" => "॥",
        "Degraded" => "✖",
        _ => "·",
    };
    let _ = match v["namespace"].as_str().map(printable) {
        Some(ns) => writeln!(o, "Name:      {} (namespace {ns})", text(&v["name"], "")),
        None => writeln!(o, "Name:      {}", text(&v["name"], "")),
    };
    let _ = writeln!(o, "Phase:     {icon} {phase} — {}", text(&v["message"], ""));
    let _ = writeln!(
        o,
        "Strategy:  {}   listen: {}",
        text(&v["strategy"], ""),
        text(&v["listen"], "")
    );
    if v["routingError"].is_string() {
        let _ = writeln!(
            o,
            "Routing:   ✖ not served as asked: {}",
            text(&v["routingError"], "")
        );
    }
    if v["batonError"].is_string() {
        let _ = writeln!(
            o,
            "Baton:     ✖ its own problem, not the rollout's: {}",
            text(&v["batonError"], "")
        );
    }
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
            let _ = writeln!(o, "  {mark} {:>2}. {}", i + 1, printable(s));
        }
    }
    let _ = writeln!(o, "Revisions:");
    let mut rows = Vec::new();
    for r in v["revisions"].as_array().into_iter().flatten() {
        let w = r["weight"].as_u64().unwrap_or(0);
        // The bar is what the router confirmed serving; the desired weight is shown
        // beside it only while the two differ.
        let served = r["servedWeight"].as_u64();
        let shown = served.unwrap_or(w);
        let filled = ((shown as usize) * 20).div_ceil(100).min(20);
        let bar = format!("{}{}", "█".repeat(filled), "░".repeat(20 - filled));
        let insts: Vec<String> = r["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| format!("{} {}", text(&i["address"], ""), text(&i["state"], "")))
            .collect();
        let role = if r["preview"].as_bool() == Some(true) {
            format!("{}+preview", text(&r["role"], ""))
        } else {
            text(&r["role"], "").to_string()
        };
        let pending = match served {
            Some(s) if s == w => String::new(),
            Some(_) => format!(" (desired {w}%, not served)"),
            None => " (desired, unconfirmed)".to_string(),
        };
        rows.push(vec![
            format!("#{}", r["number"].as_u64().unwrap_or(0)),
            text(&r["appVersion"], "-").into_owned(),
            text(&r["name"], "").into_owned(),
            role,
            format!("{bar} {shown:>3}%"),
            format!(
                "{}/{}",
                r["readyReplicas"].as_u64().unwrap_or(0),
                r["desiredReplicas"].as_u64().unwrap_or(0)
            ),
            format!("{}{pending}", insts.join(", ")),
        ]);
    }
    o.push_str(&table(
        "  ",
        &[
            "REV",
            "VERSION",
            "NAME",
            "ROLE",
            "WEIGHT",
            "READY",
            "INSTANCES",
        ],
        &[],
        rows,
    ));
    let gates = v["gates"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !gates.is_empty() {
        let _ = writeln!(o, "Gates:");
        for g in gates {
            let last = &g["last"];
            let _ = writeln!(
                o,
                "  {:<14} pass {:>3}  fail {:>2}  last: {:<12} {}",
                text(&g["name"], ""),
                g["passes"].as_u64().unwrap_or(0),
                g["failures"].as_u64().unwrap_or(0),
                text(&last["verdict"], "-"),
                text(&last["detail"], "")
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
    let rows = v["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                format!("#{}", r["number"].as_u64().unwrap_or(0)),
                text(&r["appVersion"], "-").into_owned(),
                text(&r["name"], "").into_owned(),
                when(r["createdAt"].as_u64().unwrap_or(0)),
                r["durationSeconds"]
                    .as_f64()
                    .map(|d| format!("{d:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                text(&r["outcome"], "").into_owned(),
                text(&r["abortReason"], "").into_owned(),
            ]
        })
        .collect();
    o.push_str(&table(
        "",
        &[
            "REV",
            "VERSION",
            "NAME",
            "CREATED (UTC)",
            "DURATION",
            "OUTCOME",
            "REASON",
        ],
        &[4],
        rows,
    ));
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
                when(e["at"].as_u64().unwrap_or(0)),
                text(&e["action"], ""),
                text(&e["reason"], "")
            );
        }
    }
    o
}

/// The audit trail as a table, oldest first: what `baton audit` prints on both
/// platforms.
pub fn render_audit(entries: &[Entry]) -> String {
    let mut o = String::new();
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(e.at))
                    .to_string(),
                printable(&e.actor).into_owned(),
                printable(&e.action).into_owned(),
                printable(&e.rollout).into_owned(),
                printable(e.revision.as_deref().unwrap_or("-")).into_owned(),
                printable(&e.reason).into_owned(),
            ]
        })
        .collect();
    o.push_str(&table(
        "",
        &[
            "SEQ",
            "TIME (UTC)",
            "ACTOR",
            "ACTION",
            "ROLLOUT",
            "REVISION",
            "REASON",
        ],
        &[0],
        rows,
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    const FORGED: &str = "v2\x1b[2J\n    #9   v9         forged";

    fn no_raw_controls(text: &str) {
        assert!(
            !text.contains('\x1b'),
            "a terminal escape got through: {text:?}"
        );
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with("#9")),
            "a forged row: {text}"
        );
    }

    #[test]
    fn status_and_history_show_control_characters_escaped() {
        let v = json!({
            "name": "web", "namespace": "ns\x1b]0;pwned\x07", "phase": "Progressing",
            "message": FORGED, "strategy": "canary", "listen": "127.0.0.1:8080",
            "step": {"index": 0, "total": 1, "steps": [FORGED]},
            "revisions": [{"number": 2, "appVersion": FORGED, "name": "abc", "role": "canary",
                "weight": 10, "instances": [{"address": FORGED, "state": "ready"}]}],
            "gates": [{"name": "errors", "last": {"verdict": "Pass", "detail": FORGED}}],
        });
        let text = render(&v);
        no_raw_controls(&text);
        assert!(text.contains("v2\\x1b[2J\\n    #9"), "{text}");
        assert!(text.contains("ns\\x1b]0;pwned\\x07"), "{text}");
        let h = json!({
            "revisions": [{"number": 2, "appVersion": FORGED, "name": "abc",
                "outcome": "aborted", "abortReason": FORGED}],
            "events": [{"at": 0, "action": "step", "reason": FORGED}],
        });
        no_raw_controls(&render_history(&h));
    }

    /// The soak filled the state disk: status said only "Progressing", the instances
    /// exiting for want of room went unexplained.
    #[test]
    fn status_shows_batons_own_problem_on_a_line_of_its_own() {
        let mut v = json!({
            "name": "web", "phase": "Progressing", "message": "rolling out #2 (v2)",
            "strategy": "canary", "listen": "127.0.0.1:8080", "revisions": [], "gates": [],
        });
        assert!(!render(&v).contains("Baton:"), "{}", render(&v));
        v["batonError"] =
            json!("the disk of Baton's state directory is full (4096 bytes free under /s/logs)");
        let text = render(&v);
        let line = text
            .lines()
            .find(|l| l.starts_with("Baton:"))
            .unwrap_or_else(|| panic!("no Baton line: {text}"));
        assert!(line.contains("not the rollout's"), "{line}");
        assert!(line.contains("4096 bytes free"), "{line}");
    }

    #[test]
    fn history_columns_fit_long_names_and_show_dates() {
        let long = "v2-with-a-very-long-release-name-from-ci-1234";
        let h = json!({
            "revisions": [
                {"number": 1, "appVersion": "v1", "name": "abc", "createdAt": 1_796_061_600_000u64,
                    "durationSeconds": 12.5, "outcome": "superseded"},
                {"number": 2, "appVersion": long, "name": "def", "createdAt": 1_796_061_660_000u64,
                    "outcome": "stable"},
            ],
        });
        let text = render_history(&h);
        let lines: Vec<&str> = text.lines().collect();
        // Every row's NAME starts where the header's does, however long a version is.
        let col = lines[0].find("NAME").expect("NAME");
        assert_eq!(lines[1].find("abc"), Some(col), "{text}");
        assert_eq!(lines[2].find("def"), Some(col), "{text}");
        assert!(text.contains(long), "{text}");
        assert!(
            text.contains("2026-11-30 18:00:00"),
            "a date, not only a time: {text}"
        );
    }

    #[test]
    fn the_audit_table_shows_control_characters_escaped() {
        let e = baton_audit::Entry::after(
            None,
            baton_audit::NewEntry {
                actor: "admin/\x1b[8m".into(),
                action: "apply".into(),
                rollout: "web".into(),
                revision: Some(FORGED.into()),
                spec_digest: None,
                reason: FORGED.into(),
            },
            0,
            None,
        );
        let text = render_audit(&[e]);
        no_raw_controls(&text);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("admin/\\x1b[8m"), "{text}");
    }
}

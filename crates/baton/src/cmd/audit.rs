//! `baton audit`: the hash-chained trail, listed or verified, read straight from the
//! state directory so that it works without a controller; with `-n NS`, the trails
//! the operator keeps in the namespace (one ConfigMap per Rollout).

use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use anyhow::{Result, anyhow, bail};
use baton::paths::Paths;
use clap::{Args, Subcommand};

use super::target::kube_client;
use super::{Output, Target, print_json};

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    verify: Option<AuditCmd>,
    /// Only this rollout's entries.
    #[arg(long)]
    rollout: Option<String>,
    /// Only entries this recent (`10m`, `2h`) or since this time (`2026-11-25T17:00:00Z`).
    #[arg(long)]
    since: Option<String>,
    /// Only the newest N entries.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check the hash chain; names the first entry altered, removed or reordered, and
    /// catches truncation against the head file.
    Verify {
        /// The head recorded outside the database (default: `audit.head` in the state
        /// directory, when present).
        #[arg(long, value_name = "FILE")]
        head: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

pub async fn run(target: &Target, mut args: AuditArgs) -> Result<()> {
    match (target, args.verify.take()) {
        (Target::Local(paths), Some(AuditCmd::Verify { head, output })) => {
            verify(paths, head, output)
        }
        (Target::Local(paths), None) => list(paths, args),
        (Target::Cluster { namespace }, verify) => {
            let (client, ns) = kube_client(namespace.as_deref()).await?;
            let trails = baton_k8s::audit::trails(&client, &ns, args.rollout.as_deref()).await?;
            match verify {
                Some(AuditCmd::Verify { head: Some(_), .. }) => {
                    bail!("--head is for the trail on one machine")
                }
                Some(AuditCmd::Verify { output, .. }) => verify_trails(&ns, &trails, output),
                None => {
                    let since = args.since.as_deref().map(parse_since).transpose()?;
                    let mut all: Vec<baton_audit::Entry> =
                        trails.into_iter().flat_map(|(_, e)| e).collect();
                    all.retain(|e| since.is_none_or(|s| e.at >= s));
                    all.sort_by_key(|e| e.at);
                    if let Some(n) = args.limit {
                        all.drain(..all.len().saturating_sub(n));
                    }
                    show(&all, args.output)
                }
            }
        }
    }
}

/// Each Rollout's chain checked on its own; the first broken one is named.
fn verify_trails(
    ns: &str,
    trails: &[(String, Vec<baton_audit::Entry>)],
    output: Output,
) -> Result<()> {
    let problems: Vec<(String, baton_audit::Problem)> = trails
        .iter()
        .filter_map(|(r, e)| baton_audit::verify_entries(e).map(|p| (r.clone(), p)))
        .collect();
    let n: usize = trails.iter().map(|(_, e)| e.len()).sum();
    if output == Output::Json {
        print_json(&serde_json::json!({
            "intact": problems.is_empty(),
            "entries": n,
            "trails": trails.len(),
            "problems": problems.iter().map(|(r, p)| serde_json::json!({
                "rollout": r, "detail": p, "message": p.to_string(),
            })).collect::<Vec<_>>(),
        }))?;
        if !problems.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Some((r, p)) = problems.first() {
        bail!("audit trail of {r} (ConfigMap baton-audit-{r} in {ns}) broken: {p}");
    }
    println!(
        "audit trails intact: {n} entries in {} trail(s) in {ns} (the newest entries' removal cannot be checked: there is no head outside the trail)",
        trails.len()
    );
    Ok(())
}

fn open(paths: &Paths) -> Result<baton_audit::AuditLog> {
    if !paths.exists() {
        bail!("no audit trail: no state in {}", paths.root.display());
    }
    Ok(baton_audit::AuditLog::open(&paths.db(), None)?)
}

fn parse_since(s: &str) -> Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        return Ok(d.as_millis() as u64);
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| anyhow!("--since {s:?}: give a duration such as 10m or 2h, or a time such as 2026-11-25T17:00:00Z"))?;
    Ok(baton::now_ms().saturating_sub(d.as_millis() as u64))
}

fn list(paths: &Paths, args: AuditArgs) -> Result<()> {
    let log = open(paths)?;
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let entries = log.list(&baton_audit::Filter {
        rollout: args.rollout,
        since,
        limit: args.limit,
    })?;
    show(&entries, args.output)
}

fn show(entries: &[baton_audit::Entry], output: Output) -> Result<()> {
    if output == Output::Json {
        return print_json(&serde_json::to_value(entries)?);
    }
    print!("{}", baton::view::render_audit(entries));
    Ok(())
}

/// In JSON a broken chain is reported on stdout with exit status 1; in text it is
/// the error.
fn verify(paths: &Paths, head: Option<PathBuf>, output: Output) -> Result<()> {
    let log = open(paths)?;
    let head_path = head.unwrap_or_else(|| paths.root.join("audit.head"));
    let head = baton_audit::Head::read(&head_path)?;
    let (n, problem) = log.verify(head.as_ref())?;
    if output == Output::Json {
        print_json(&serde_json::json!({
            "intact": problem.is_none(),
            "entries": n,
            "head": head,
            "problem": problem.as_ref().map(|p| serde_json::json!({ "detail": p, "message": p.to_string() })),
        }))?;
        if problem.is_some() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Some(p) = problem {
        bail!("audit trail broken: {p}");
    }
    let against = match &head {
        Some(h) => format!(
            ", up to the recorded head #{} in {}",
            h.seq,
            head_path.display()
        ),
        None => " (no head file: truncation of the newest entries cannot be checked)".into(),
    };
    println!("audit trail intact: {n} entries{against}");
    Ok(())
}

//! `baton audit`: the hash-chained trail, listed or verified, read straight from the
//! state directory so that it works without a controller; with `-n NS`, the trails
//! the operator keeps in the namespace (one ConfigMap per Rollout).

use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use anyhow::{Result, anyhow, bail};
use baton::paths::Paths;
use baton::trail::Seal;
use clap::{Args, Subcommand};

use super::target::kube_client;
use super::{Output, Target, print_as};

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
    /// Check the hash chain and the entries' MACs (with the audit key); names the
    /// first entry altered, forged, removed or reordered, and catches truncation
    /// against the head recorded outside the trail.
    Verify {
        /// The head recorded outside the database (default: `--audit-head`, else
        /// `$XDG_STATE_HOME/baton/ID/audit.head`).
        #[arg(long, value_name = "FILE")]
        head: Option<PathBuf>,
        /// On a cluster: the operator's namespace, where the ConfigMap
        /// `baton-audit-heads` keeps every trail's head.
        #[arg(long, value_name = "NS", default_value = "baton-system")]
        heads_namespace: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

pub async fn run(target: &Target, seal: &Seal, mut args: AuditArgs) -> Result<()> {
    match (target, args.verify.take()) {
        (Target::Local(paths), Some(AuditCmd::Verify { head, output, .. })) => {
            verify(paths, seal, head, output)
        }
        (Target::Local(paths), None) => list(paths, args),
        (Target::Cluster { namespace }, verify) => {
            let (client, ns) = kube_client(namespace.as_deref()).await?;
            let trails = baton_k8s::audit::trails(&client, &ns, args.rollout.as_deref()).await?;
            match verify {
                Some(AuditCmd::Verify { head: Some(_), .. }) => {
                    bail!("--head is for the trail on one machine")
                }
                Some(AuditCmd::Verify {
                    output,
                    heads_namespace,
                    ..
                }) => {
                    let check = ClusterCheck {
                        seal,
                        heads_namespace: &heads_namespace,
                        rollout: args.rollout.as_deref(),
                    };
                    verify_trails(&client, &ns, check, &trails, output).await
                }
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

/// Each Rollout's chain checked on its own, against its head in the operator's
/// namespace (a head without a trail is a trail removed whole); the first broken one
/// is named.
async fn verify_trails(
    client: &kube::Client,
    ns: &str,
    check: ClusterCheck<'_>,
    trails: &[(String, Vec<baton_audit::Entry>)],
    output: Output,
) -> Result<()> {
    let key = check.seal.explicit_key()?;
    let heads_ns = check.heads_namespace;
    let (heads, heads_said) = match baton_k8s::audit::heads(client, heads_ns).await {
        Ok(Some(h)) => (
            h,
            format!(
                "against their heads in ConfigMap {} in {heads_ns}",
                baton_k8s::audit::HEADS
            ),
        ),
        Ok(None) => (
            Default::default(),
            format!(
                "no heads in {heads_ns} (ConfigMap {}): removal of the newest entries cannot be checked",
                baton_k8s::audit::HEADS
            ),
        ),
        Err(e) => (
            Default::default(),
            format!(
                "the heads in {heads_ns} could not be read ({e}): removal of the newest entries cannot be checked"
            ),
        ),
    };
    let head_of = |r: &str| heads.get(&format!("{ns}.{r}"));
    let mut problems: Vec<(String, baton_audit::Problem)> = trails
        .iter()
        .filter_map(|(r, e)| {
            let v = baton_audit::check(e, head_of(r), key.as_ref().map(|k| &k.key));
            v.problem.map(|p| (r.clone(), p))
        })
        .collect();
    // A head whose trail is gone: the trail was removed whole.
    let prefix = format!("{ns}.");
    for (k, h) in &heads {
        let Some(r) = k.strip_prefix(&prefix) else {
            continue;
        };
        if check.rollout.is_none_or(|want| want == r) && !trails.iter().any(|(t, _)| t == r) {
            problems.push((
                r.to_string(),
                baton_audit::Problem::Truncated {
                    head_seq: h.seq,
                    last_seq: 0,
                },
            ));
        }
    }
    let n: usize = trails.iter().map(|(_, e)| e.len()).sum();
    let signed: usize = trails
        .iter()
        .flat_map(|(_, e)| e)
        .filter(|e| e.mac.is_some())
        .count();
    if output.structured() {
        print_as(
            output,
            &serde_json::json!({
                "intact": problems.is_empty(),
                "entries": n,
                "signed": signed,
                "macsChecked": key.is_some(),
                "trails": trails.len(),
                "heads": heads_said,
                "problems": problems.iter().map(|(r, p)| serde_json::json!({
                    "rollout": r, "detail": p, "message": p.to_string(),
                })).collect::<Vec<_>>(),
            }),
        )?;
        if !problems.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Some((r, p)) = problems.first() {
        bail!("audit trail of {r} (ConfigMap baton-audit-{r} in {ns}) broken: {p}");
    }
    let macs = match &key {
        Some(k) => format!("MACs checked with the key in {}", k.from),
        None => format!(
            "MACs not checked: give the operator's key in {} or --audit-key-file",
            baton::trail::KEY_ENV
        ),
    };
    println!(
        "audit trails intact: {n} entries in {} trail(s) in {ns} ({signed} signed, {macs}); {heads_said}",
        trails.len()
    );
    Ok(())
}

/// What a cluster's verification needs besides the trails.
struct ClusterCheck<'a> {
    seal: &'a Seal,
    heads_namespace: &'a str,
    rollout: Option<&'a str>,
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
    if output.structured() {
        return print_as(output, &serde_json::to_value(entries)?);
    }
    print!("{}", baton::view::render_audit(entries));
    Ok(())
}

/// In JSON a broken chain is reported on stdout with exit status 1; in text it is
/// the error.
fn verify(paths: &Paths, seal: &Seal, head: Option<PathBuf>, output: Output) -> Result<()> {
    let key = seal.key(paths, false)?;
    let log = open(paths)?.with_key(key.as_ref().map(|k| k.key.clone()));
    let head_path = match head {
        Some(p) => p,
        None => seal.head_path(paths)?,
    };
    let head = baton_audit::Head::read(&head_path)?;
    let v = log.verify(head.as_ref())?;
    if output.structured() {
        print_as(
            output,
            &serde_json::json!({
                "intact": v.problem.is_none(),
                "entries": v.entries,
                "signed": v.signed,
                "macsChecked": v.macs_checked,
                "key": key.as_ref().map(|k| &k.from),
                "head": head,
                "headFile": head_path,
                "problem": v.problem.as_ref().map(|p| serde_json::json!({ "detail": p, "message": p.to_string() })),
            }),
        )?;
        if v.problem.is_some() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Some(p) = v.problem {
        bail!("audit trail broken: {p}");
    }
    let signed = match &key {
        Some(k) => format!(
            "{} signed, MACs checked with the key in {}",
            v.signed, k.from
        ),
        None => format!(
            "{} signed; MACs not checked: no audit key ({}, --audit-key-file or the default file)",
            v.signed,
            baton::trail::KEY_ENV
        ),
    };
    let against = match &head {
        Some(h) => format!(
            "up to the recorded head #{} in {}",
            h.seq,
            head_path.display()
        ),
        None => format!(
            "no head in {}: removal of the newest entries cannot be checked",
            head_path.display()
        ),
    };
    println!(
        "audit trail intact: {} entries ({signed}); {against}",
        v.entries
    );
    Ok(())
}

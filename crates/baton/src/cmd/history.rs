//! `baton history`: a rollout's revisions and events, locally or on a cluster, and
//! the diff between two revisions (their specs locally, their pod templates on a
//! cluster).

use anyhow::{Result, bail};
use baton::api::ApiClient;
use baton::paths::Paths;
use baton::view::{self, printable};
use clap::Args;
use serde_json::Value;

use super::target::kube_client;
use super::{Output, Target, check, print_as};

#[derive(Args, Debug)]
pub struct HistoryArgs {
    name: String,
    /// Show what changed between the specs of two revisions, by number:
    /// `--diff 2 3`.
    #[arg(long, num_args = 2, value_names = ["FROM", "TO"])]
    diff: Option<Vec<u64>>,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

pub async fn run(target: &Target, args: HistoryArgs) -> Result<()> {
    match (target, &args.diff) {
        (Target::Local(paths), Some(d)) => diff(paths, &args.name, d).await,
        (Target::Local(paths), None) => local(paths, &args.name, args.output).await,
        (Target::Cluster { namespace }, None) => {
            cluster(namespace.as_deref(), &args.name, args.output).await
        }
        (Target::Cluster { namespace }, Some(d)) => {
            cluster_diff(namespace.as_deref(), &args.name, d).await
        }
    }
}

async fn local(paths: &Paths, name: &str, output: Output) -> Result<()> {
    let client = ApiClient::from_paths(paths)?;
    let v = check(client.get(&format!("/v1/rollouts/{name}/history")).await?)?;
    if output.structured() {
        return print_as(output, &v);
    }
    print!("{}", view::render_history(&v));
    Ok(())
}

async fn diff(paths: &Paths, name: &str, d: &[u64]) -> Result<()> {
    // clap takes exactly two values.
    let &[from, to] = d else {
        bail!("--diff takes two revision numbers");
    };
    let client = ApiClient::from_paths(paths)?;
    let v = check(
        client
            .get(&format!("/v1/rollouts/{name}/diff?from={from}&to={to}"))
            .await?,
    )?;
    let text = v["diff"].as_str().unwrap_or("");
    if text.is_empty() {
        println!("#{from} and #{to} have the same spec");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// On a cluster a revision is a pod template: its ReplicaSet keeps it.
async fn cluster_diff(namespace: Option<&str>, name: &str, d: &[u64]) -> Result<()> {
    let &[from, to] = d else {
        bail!("--diff takes two revision numbers");
    };
    let (client, ns) = kube_client(namespace).await?;
    let [a, b] = baton_k8s::cli::revision_templates(&client, &ns, name, [from, to]).await?;
    let text = view::spec_diff(name, (from, &a), (to, &b));
    if text.is_empty() {
        println!("#{from} and #{to} have the same pod template");
    } else {
        print!("{text}");
    }
    Ok(())
}

async fn cluster(namespace: Option<&str>, name: &str, output: Output) -> Result<()> {
    let (client, ns) = kube_client(namespace).await?;
    let v = baton_k8s::cli::history(&client, &ns, name).await?;
    if output.structured() {
        return print_as(output, &v);
    }
    print_cluster(&v);
    Ok(())
}

/// One line per ReplicaSet revision (its version and, if aborted, why), then the
/// Rollout's events.
fn print_cluster(v: &Value) {
    for r in v["revisions"].as_array().into_iter().flatten() {
        println!(
            "#{:<3} {:<14} {}{}",
            r["number"].as_u64().unwrap_or(0),
            printable(r["run"]["env"]["APP_VERSION"].as_str().unwrap_or("-")),
            printable(r["name"].as_str().unwrap_or("")),
            r["abortReason"]
                .as_str()
                .map(|a| format!("  aborted: {}", printable(a)))
                .unwrap_or_default()
        );
    }
    for e in v["events"].as_array().into_iter().flatten() {
        println!(
            "  {} {:<12} {}",
            printable(e["at"].as_str().unwrap_or("")),
            printable(e["reason"].as_str().unwrap_or("")),
            printable(e["note"].as_str().unwrap_or(""))
        );
    }
}

//! `baton validate`: a spec checked, for `baton up` or (when every document is a
//! cluster Rollout) for the operator; changes nothing.

use std::path::Path;

use anyhow::{Result, anyhow};
use baton_spec::SpecErrors;
use clap::Args;
use serde_json::{Value, json};

use super::{Output, SpecArgs, print_as, read_spec};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

pub fn run(args: ValidateArgs) -> Result<()> {
    let text = read_spec(&args.spec.file)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_default();
    if !docs.is_empty() && docs.iter().all(baton_k8s::cli::is_cluster_form) {
        return cluster_form(&args, &docs);
    }
    let file = &args.spec.file;
    let rollouts = baton_spec::parse(&text).or_else(|e| invalid(file, args.output, e))?;
    if args.output.structured() {
        let names: Vec<_> = rollouts.iter().map(|r| &r.metadata.name).collect();
        return print_as(args.output, &json!({ "valid": true, "rollouts": names }));
    }
    for r in &rollouts {
        println!(
            "{}: rollout {} is valid (revision {})",
            file.display(),
            r.metadata.name,
            r.spec.run.revision_hash()
        );
    }
    Ok(())
}

fn cluster_form(args: &ValidateArgs, docs: &[Value]) -> Result<()> {
    let file = &args.spec.file;
    let list = baton_k8s::cli::parse_cluster(docs).or_else(|e| invalid(file, args.output, e))?;
    let names: Vec<String> = list
        .iter()
        .map(|r| r.metadata.name.clone().unwrap_or_default())
        .collect();
    if args.output.structured() {
        return print_as(
            args.output,
            &json!({ "valid": true, "rollouts": names, "target": "kubernetes" }),
        );
    }
    for n in names {
        println!(
            "{}: rollout {n} is valid (for the Kubernetes operator)",
            file.display()
        );
    }
    Ok(())
}

/// Every problem with its field path; in JSON on stdout with exit status 1, so a
/// script gets both the list and the failure.
fn invalid<T>(file: &Path, output: Output, e: SpecErrors) -> Result<T> {
    if output.structured() {
        print_as(output, &json!({ "valid": false, "errors": e.0 }))?;
        std::process::exit(1);
    }
    Err(anyhow!("{}: {e}", file.display()))
}

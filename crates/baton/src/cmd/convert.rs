//! `baton convert`: Argo Rollouts and Flagger resources into Baton Rollouts.

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde_json::Value;

use super::{Output, SpecArgs, print_as, read_spec};

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

/// YAML (or JSON) on stdout; on stderr what could not be carried over, so a pipe
/// into `kubectl apply` still shows it.
pub fn run(args: ConvertArgs) -> Result<()> {
    let file = &args.spec.file;
    let text = read_spec(file)?;
    let out = baton_k8s::convert::convert(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    for c in &out {
        for n in &c.notes {
            eprintln!("baton convert: {}: not carried over: {n}", c.name);
        }
    }
    if args.output.structured() {
        let list: Vec<&Value> = out.iter().map(|c| &c.rollout).collect();
        return print_as(args.output, &serde_json::json!(list));
    }
    for c in &out {
        print!(
            "---\n{}",
            serde_saphyr::to_string(&c.rollout).context("cannot write YAML")?
        );
    }
    Ok(())
}

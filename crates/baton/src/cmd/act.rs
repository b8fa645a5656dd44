//! `baton promote`, `abort`, `retry`, `pause`, `resume` and `undo`: one word of the shared command
//! vocabulary, sent to the controller or to the cluster's operator.

use std::time::Duration;

use anyhow::Result;
use baton::api::{ApiClient, CommandKind};

use super::target::kube_client;
use super::{Target, check};

/// `promote`, or with `--full` straight to 100 %.
pub fn promote(full: bool) -> CommandKind {
    if full {
        CommandKind::PromoteFull
    } else {
        CommandKind::Promote
    }
}

pub async fn run(target: &Target, name: &str, kind: CommandKind) -> Result<()> {
    match target {
        Target::Local(paths) => {
            let client = ApiClient::from_paths(paths)?;
            let path = format!("/v1/rollouts/{name}/{}", kind.as_str());
            let v = check(client.post(&path, None).await?)?;
            println!("{}", v["result"].as_str().unwrap_or("done"));
        }
        Target::Cluster { namespace } => {
            let (client, ns) = kube_client(namespace.as_deref()).await?;
            let said = match kind {
                // Undo puts the previous revision's spec back; no request to wait on.
                CommandKind::Undo => baton_k8s::cli::undo(&client, &ns, name).await?,
                k => {
                    let by = baton::api::local_user();
                    let wait = Duration::from_secs(60);
                    baton_k8s::cli::request(&client, &ns, name, k.as_str(), &by, wait).await?
                }
            };
            println!("{said}");
        }
    }
    Ok(())
}

//! `baton promote`, `abort`, `retry`, `pause`, `resume` and `undo`: one word of the shared command
//! vocabulary, sent to the controller or to the cluster's operator.

use std::time::Duration;

use anyhow::{Result, bail};
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

/// `set image NAME CONTAINER=IMAGE...`: a cluster Rollout's template only.
pub async fn set_image(target: &Target, name: &str, images: &[String]) -> Result<()> {
    let Target::Cluster { namespace } = target else {
        bail!(
            "set image changes a cluster Rollout's pod template (use -n NAMESPACE); on one machine, change `run` in the spec and `baton apply -f` it"
        );
    };
    let pairs = images
        .iter()
        .map(|p| match p.split_once('=') {
            Some((c, i)) if !c.is_empty() && !i.is_empty() => Ok((c.to_string(), i.to_string())),
            _ => bail!("{p:?}: expected CONTAINER=IMAGE (or *=IMAGE for every container)"),
        })
        .collect::<Result<Vec<_>>>()?;
    let (client, ns) = kube_client(namespace.as_deref()).await?;
    println!(
        "{}",
        baton_k8s::cli::set_image(&client, &ns, name, &pairs).await?
    );
    Ok(())
}

//! Where the everyday commands act: the local state directory, or a cluster's
//! Rollouts. Chosen once, from the global flags.

use std::path::Path;

use anyhow::{Context, Result};
use baton::paths::Paths;

pub enum Target {
    Local(Paths),
    /// `None`: the kubeconfig context's namespace.
    Cluster {
        namespace: Option<String>,
    },
}

impl Target {
    /// A cluster when `--namespace` is given or the binary runs as `kubectl-baton`.
    pub fn choose(paths: &Paths, namespace: Option<String>) -> Target {
        if namespace.is_some() || as_kubectl_plugin() {
            Target::Cluster { namespace }
        } else {
            Target::Local(paths.clone())
        }
    }
}

/// The kubectl plugin is this binary under the name `kubectl-baton`.
fn as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().starts_with("kubectl-baton"))
        })
        .unwrap_or(false)
}

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the pod's service
/// account, and the namespace to use (`--namespace`, else the context's).
pub async fn kube_client(namespace: Option<&str>) -> Result<(kube::Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG, or run inside a cluster")?;
    let ns = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("cannot build a Kubernetes client")?;
    Ok((client, ns))
}

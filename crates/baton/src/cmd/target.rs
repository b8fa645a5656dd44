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
    /// A cluster when `--namespace`, `--kubeconfig` or `--context` is given, or the
    /// binary runs as `kubectl-baton`.
    pub fn choose(paths: &Paths, namespace: Option<String>, kube: &Kube) -> Target {
        let named = kube.kubeconfig.is_some() || kube.context.is_some();
        if namespace.is_some() || named || as_kubectl_plugin() {
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
    let kube = KUBE.get().cloned().unwrap_or_default();
    let options = kube::config::KubeConfigOptions {
        context: kube.context.clone(),
        ..Default::default()
    };
    let config = match (&kube.kubeconfig, &kube.context) {
        (Some(path), _) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: cannot read it", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| match &kube.context {
                    Some(c) => format!("--kubeconfig {} --context {c}", path.display()),
                    None => format!("--kubeconfig {}", path.display()),
                })?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("--context {context}"))?,
        (None, None) => kube::Config::infer()
            .await
            .context("no Kubernetes configuration: set KUBECONFIG, or run inside a cluster")?,
    };
    let ns = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    // Named in the API server's audit log and as the default field manager of the CLI's
    // writes (kubectl's `kubectl/v1.x` likewise).
    let mut config = config;
    config.headers.push((
        hyper::header::USER_AGENT,
        hyper::header::HeaderValue::from_static(concat!("baton/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = kube::Client::try_from(config).context("cannot build a Kubernetes client")?;
    Ok((client, ns))
}

/// Which kubeconfig and context `--kubeconfig` and `--context` chose (none: the
/// client's usual inference).
#[derive(Debug, Clone, Default)]
pub struct Kube {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub context: Option<String>,
}

/// Set once from the global flags, before any command runs.
static KUBE: std::sync::OnceLock<Kube> = std::sync::OnceLock::new();

pub fn use_kube(kube: Kube) {
    let _ = KUBE.set(kube);
}

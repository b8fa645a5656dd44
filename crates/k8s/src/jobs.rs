//! What runs on a cluster as Jobs in the Rollout's namespace: `command` gates (the
//! user's command in the user's image) and blue-green smoke tests (`baton smoke` in the
//! operator's image). Never in the operator's pod, never with its service account, and
//! never as shell text: a command is the container's argv and smoke requests are JSON
//! handed to `baton smoke` as one argument.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use baton_analysis::{ProviderError, Sample, Vars};
use baton_driver::CommandRunner;
use baton_spec::{FieldError, Gate, MetricSource};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::Error;
use crate::crd::Rollout;
use crate::router::services;
use crate::workload;

/// The operator's settings for Jobs.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The operator's own image (`--job-image`): smoke Jobs run `baton smoke` in it.
    pub image: Option<String>,
    /// Service accounts a Rollout may name in `spec.jobs.serviceAccountName`
    /// (`--job-service-accounts`): without the list, editing a Rollout could borrow any
    /// account of its namespace.
    pub accounts: BTreeSet<String>,
}

/// How often a running Job is looked at.
const POLL: Duration = Duration::from_millis(500);

/// A Job's pod: no privilege escalation, the runtime's seccomp profile, and the
/// service account's token mounted only when an allowed account was named.
fn job(
    ro: &Rollout,
    ns: &str,
    name: (&str, String),
    revision: &str,
    account: Option<&str>,
    container: Value,
    deadline: Duration,
) -> Value {
    let labels =
        json!({workload::ROLLOUT_LABEL: ro.name_any(), services::REVISION_LABEL: revision});
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            name.0: name.1,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [ro.controller_owner_ref(&())],
        },
        "spec": {
            "backoffLimit": 0, "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": deadline.as_secs().max(1),
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": account.unwrap_or("default"),
                    "automountServiceAccountToken": account.is_some(),
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                },
            },
        },
    })
}

fn locked_down(mut container: Value) -> Value {
    container["securityContext"] =
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    container
}

/// Runs a Rollout's `command` gates as Jobs.
pub struct JobRunner {
    pub client: Client,
    pub ro: Arc<Rollout>,
    pub ns: String,
}

impl CommandRunner for JobRunner {
    fn run(
        &self,
        gate: Gate,
        vars: Vars,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Sample, ProviderError>> + Send>> {
        let (client, ro, ns) = (self.client.clone(), self.ro.clone(), self.ns.clone());
        Box::pin(async move { run_command(client, &ro, &ns, &gate, &vars).await })
    }
}

async fn run_command(
    client: Client,
    ro: &Rollout,
    ns: &str,
    gate: &Gate,
    vars: &Vars,
) -> Result<Sample, ProviderError> {
    let MetricSource::Command(c) = &gate.metric else {
        return Err(ProviderError::Invalid("not a command gate".into()));
    };
    let jobs_spec = ro.spec.jobs.clone().unwrap_or_default();
    let Some(image) = jobs_spec.image else {
        return Err(ProviderError::Invalid(
            "a command gate on a cluster runs as a Job: set spec.jobs.image".into(),
        ));
    };
    let env: Vec<Value> = [
        ("BATON_SERVICE", vars.service.as_str()),
        ("BATON_REVISION", vars.revision.as_str()),
        ("BATON_STABLE", vars.stable.as_deref().unwrap_or("")),
        ("BATON_NAMESPACE", ns),
    ]
    .iter()
    .map(|(k, v)| json!({"name": k, "value": v}))
    .collect();
    let container = locked_down(json!({
        "name": "gate", "image": image, "command": c.command, "env": env,
    }));
    let spec = job(
        ro,
        ns,
        ("generateName", format!("{}-gate-", ro.name_any())),
        &vars.revision,
        jobs_spec.service_account_name.as_deref(),
        container,
        c.timeout.0,
    );
    let what = format!("gate {}'s Job", gate.name);
    let fail = |e: kube::Error| ProviderError::Unreachable {
        what: what.clone(),
        detail: e.to_string(),
    };
    let spec: Job =
        serde_json::from_value(spec).map_err(|e| ProviderError::Invalid(format!("{what}: {e}")))?;
    let api: Api<Job> = Api::namespaced(client.clone(), ns);
    let created = api
        .create(&crate::post_params(), &spec)
        .await
        .map_err(fail)?;
    let name = created.name_any();
    let deadline = tokio::time::Instant::now() + c.timeout.0;
    loop {
        let st = api
            .get(&name)
            .await
            .map_err(fail)?
            .status
            .unwrap_or_default();
        if st.succeeded.unwrap_or(0) > 0 {
            return Ok(Sample::Value(0.0));
        }
        if st.failed.unwrap_or(0) > 0 {
            return Ok(Sample::Value(exit_code(&client, ns, &name).await));
        }
        if tokio::time::Instant::now() >= deadline {
            let bg = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            let _ = api.delete(&name, &bg).await;
            return Err(ProviderError::Timeout {
                what: format!("Job {name}"),
                seconds: c.timeout.0.as_secs_f64(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A failed Job's exit status, from its pod (1 when the pod is gone or never ran).
async fn exit_code(client: &Client, ns: &str, job: &str) -> f64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let listed = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await;
    listed
        .ok()
        .and_then(|l| {
            l.items.iter().find_map(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .iter()
                    .find_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
            })
        })
        .map_or(1.0, f64::from)
}

/// One smoke Job per Rollout and revision.
fn smoke_name(rollout: &str, revision: &str) -> String {
    format!("{rollout}-smoke-{revision}")
}

/// Starts the smoke Job of `revision` unless one exists: `baton smoke` in the
/// operator's image, the tests as JSON data.
pub async fn start_smoke(
    client: &Client,
    settings: &Settings,
    ro: &Rollout,
    ns: &str,
    revision: &str,
) -> Result<(), Error> {
    let Some(bg) = &ro.spec.strategy.blue_green else {
        return Ok(());
    };
    if find_smoke(client, ro, ns, revision).await?.is_some() {
        return Ok(());
    }
    let Some(image) = &settings.image else {
        return Err(Error::Spec(
            "spec.strategy.blueGreen.smoke: smoke tests run as a Job of Baton's image: start the operator with --job-image".into(),
        ));
    };
    let host = bg
        .preview_service
        .clone()
        .unwrap_or_else(|| bg.active_service.clone());
    let container = locked_down(json!({
        "name": "smoke", "image": image,
        "args": ["smoke", "--url", format!("http://{host}.{ns}.svc"), "--tests", serde_json::to_string(&bg.smoke)?],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }));
    let spec = job(
        ro,
        ns,
        ("name", smoke_name(&ro.name_any(), revision)),
        revision,
        ro.spec
            .jobs
            .as_ref()
            .and_then(|j| j.service_account_name.as_deref()),
        container,
        Duration::from_secs(300),
    );
    let job: Job = serde_json::from_value(spec)?;
    Api::<Job>::namespaced(client.clone(), ns)
        .create(&crate::post_params(), &job)
        .await?;
    Ok(())
}

async fn find_smoke(
    client: &Client,
    ro: &Rollout,
    ns: &str,
    revision: &str,
) -> Result<Option<Job>, Error> {
    Ok(Api::<Job>::namespaced(client.clone(), ns)
        .get_opt(&smoke_name(&ro.name_any(), revision))
        .await?)
}

/// A finished smoke Job's verdict, once: `(revision, passed, detail)`.
pub async fn take_smoke(
    client: &Client,
    ro: &Rollout,
    ns: &str,
    prev: &baton_engine::Status,
) -> Result<Option<(String, bool, String)>, Error> {
    let Some(rev) = prev.canary.clone() else {
        return Ok(None);
    };
    if !matches!(prev.smoke, baton_engine::SmokeState::Running { .. }) {
        return Ok(None);
    }
    let Some(job) = find_smoke(client, ro, ns, &rev).await? else {
        return Ok(None);
    };
    let st = job.status.clone().unwrap_or_default();
    if st.succeeded.unwrap_or(0) > 0 {
        return Ok(Some((rev, true, "smoke Job succeeded".into())));
    }
    if st.failed.unwrap_or(0) > 0 {
        let detail = format!("smoke Job {} failed: see its logs", job.name_any());
        return Ok(Some((rev, false, detail)));
    }
    Ok(None)
}

/// A command gate needs the image that holds its command (`baton validate` and the
/// operator both check).
pub fn spec_problems(ro: &Rollout, gates: &[Gate]) -> Vec<FieldError> {
    let command = gates
        .iter()
        .any(|g| matches!(g.metric, MetricSource::Command(_)));
    let image = ro.spec.jobs.as_ref().and_then(|j| j.image.as_ref());
    if command && image.is_none() {
        return vec![FieldError {
            field: "spec.jobs.image".into(),
            reason: "a command gate on a cluster runs as a Job: name the image holding its command"
                .into(),
        }];
    }
    Vec::new()
}

/// What this operator's Job settings refuse: a service account not on its list, smoke
/// tests without its image.
pub fn operator_problems(ro: &Rollout, settings: &Settings) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(sa) = ro
        .spec
        .jobs
        .as_ref()
        .and_then(|j| j.service_account_name.as_ref())
        && !settings.accounts.contains(sa)
    {
        errors.push(FieldError {
            field: "spec.jobs.serviceAccountName".into(),
            reason: format!(
                "{sa:?} is not among the accounts the operator lets Jobs use (its --job-service-accounts)"
            ),
        });
    }
    let smoke = ro
        .spec
        .strategy
        .blue_green
        .as_ref()
        .is_some_and(|b| !b.smoke.is_empty());
    if smoke && settings.image.is_none() {
        errors.push(FieldError {
            field: "spec.strategy.blueGreen.smoke".into(),
            reason:
                "smoke tests run as a Job of Baton's image: start the operator with --job-image"
                    .into(),
        });
    }
    errors
}

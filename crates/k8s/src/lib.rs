//! Baton on Kubernetes: the `Rollout` custom resource, and an operator that drives
//! the same pure engine as `baton up`, with ReplicaSets for revisions and Services,
//! Gateway API or Istio for traffic.

pub mod admission;
pub mod alerts;
pub mod audit;
pub mod cli;
pub mod controller;
pub mod convert;
pub mod crd;
pub mod engine_spec;
pub mod jobs;
pub mod leader;
pub mod requests;
pub mod router;
pub mod workload;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Spec(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Record(#[from] baton_driver::RecordError),
    /// The audit trail refused an entry, or its key or head is unusable.
    #[error("audit trail: {0}")]
    Audit(String),
    /// The ReplicaSet watch ended before its first full list: nothing to reconcile on.
    #[error("the ReplicaSet cache ended before it held what exists")]
    CacheGone,
}

/// Milliseconds since the Unix epoch: read here, handed to the pure engine.
/// Every write the operator makes names it as the field manager (`managedFields`), so
/// a GitOps tool can tell its fields from the user's (`ignoreDifferences` by manager).
pub fn post_params() -> kube::api::PostParams {
    kube::api::PostParams {
        field_manager: Some(workload::FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// As `post_params`, for patches.
pub fn patch_params() -> kube::api::PatchParams {
    kube::api::PatchParams {
        field_manager: Some(workload::FIELD_MANAGER.into()),
        ..Default::default()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

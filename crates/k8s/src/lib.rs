//! Baton on Kubernetes: the `Rollout` custom resource, and an operator that drives
//! the same pure engine as `baton up`, with ReplicaSets for revisions and Services,
//! Gateway API or Istio for traffic.

pub mod crd;

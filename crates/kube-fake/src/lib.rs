//! An in-memory Kubernetes API server, at the HTTP level, for testing controllers
//! with the real `kube` client and `kube-runtime` watchers — no cluster needed.
//!
//! Generic storage for any `group/version/resource` path (namespaced or cluster
//! scoped), resourceVersions, 409 on stale updates, list and watch (newline-delimited
//! events, bookmarks, resuming from a resourceVersion, 410 when it is too old), label
//! and field selectors, merge / strategic-merge (as merge) / JSON patches and
//! server-side apply (as a merge that may create), the status and scale subresources, finalizers
//! and ownerReference garbage collection. `sim` plays the cluster's part: ReplicaSets
//! and Deployments get pods that become ready, routes get accepted, Jobs complete;
//! `prometheus` runs a real Prometheus beside it for gates that read one.
//!
//! Not a conformance suite: what it does, it does the way the API server does, and
//! what it does not do (admission, defaulting, OpenAPI validation, pagination) it
//! does not pretend to.

mod discovery;
pub mod prometheus;
mod select;
mod server;
pub mod sim;
mod store;

pub use server::FakeApi;
pub use store::{Key, Store, StoreError};

//! An in-memory Kubernetes API server, at the HTTP level, for testing controllers
//! with the real `kube` client and `kube-runtime` watchers — no cluster needed.
//!
//! Generic storage for any `group/version/resource` path (namespaced or cluster
//! scoped), resourceVersions, 409 on stale updates, list and watch (newline-delimited
//! events, bookmarks, resuming from a resourceVersion, 410 when it is too old), label
//! and field selectors, merge / strategic-merge (lists merged by their keys) / JSON patches and
//! server-side apply (as a merge that may create), the status and scale subresources, finalizers
//! and ownerReference garbage collection. `sim` plays the cluster's part: ReplicaSets
//! and Deployments get pods that become ready, routes get accepted, Jobs complete;
//! `prometheus` runs a real Prometheus beside it for gates that read one.
//!
//! The cluster in a box: with `SimConfig::real_pods`, [`kubelet`] runs pods (and Jobs'
//! pods) as real processes with real probes, EndpointSlices follow them, Services get
//! ClusterIPs with a userspace proxy and names; [`gateway`] serves HTTPRoutes with a real
//! Envoy. `docs/architecture.md` says what is real and what is simulated.
//!
//! Not a conformance suite: what it does, it does the way the API server does, and
//! what it does not do (admission, defaulting, OpenAPI validation, pagination) it
//! does not pretend to.
//!
//! # For kubectl
//!
//! The `baton-kube-fake` binary (`--listen ADDR`, `--kubeconfig PATH`, `--sim`) serves
//! this over plain http so real clients can use it; `tests/kubectl.rs` drives kubectl
//! 1.32 against it. What kubectl gets:
//!
//! - `/version`, and legacy discovery: `/api`, `/apis`, `/api/v1` and
//!   `/apis/GROUP/VERSION` from a table of the built-in resources the project uses plus
//!   every stored CustomResourceDefinition (served versions, names, shortNames, scope,
//!   `status`/`scale` subresources). kubectl asks `/api` and `/apis` for aggregated
//!   discovery (`as=APIGroupDiscoveryList`) first and falls back to these documents when
//!   the answer is plain `application/json`.
//! - Server-side Tables (`Accept: ...;as=Table;g=meta.k8s.io;v=v1`) for `kubectl get`:
//!   Name plus a CRD version's `additionalPrinterColumns` (simple `.a.b` paths, `date`
//!   cells as ages), or Name and Age when there are none (built-ins get no richer columns).
//! - No OpenAPI schemas. `/openapi/v3` is an index without paths; kubectl then tries
//!   `/openapi/v2` (404), so `kubectl apply` must run with `--validate=false` (with a 404
//!   on v3 it fails the same way). Strategic merge patches merge the keyed lists of the
//!   built-in kinds the project uses (containers, env, ports, volumes...; `smp.rs`).
//! - No aggregated discovery, protobuf, authentication, pagination (`limit` is ignored,
//!   everything comes in one page) or `kubectl exec`/`logs`/`port-forward`; a
//!   `dryRun` request is refused with 400 rather than written.

mod admission;
mod discovery;
mod endpoints;
pub mod gateway;
pub mod kubelet;
mod kubeproxy;
pub mod prometheus;
mod select;
mod server;
pub mod sim;
mod smp;
mod store;

pub use server::FakeApi;
pub use store::{Key, Store, StoreError};

//! The rollout driver: the cycle around the pure engine — observe, step, persist,
//! act — written once. Each platform (processes and the built-in proxy on one
//! machine; ReplicaSets and a router on Kubernetes) implements the small traits
//! below, and whatever is written here reaches both.
//!
//! The cycle's rules, each tested with in-memory fakes in `tests/cycle.rs`:
//! - the status is persisted before anything is acted on, with the events it produced
//!   (audited in the same write where the platform can);
//! - traffic moves only once the router confirms it, and nothing is scaled down before
//!   (the engine keeps revisions desired until then; the driver hands the router's
//!   confirmation to the engine and nothing else);
//! - every event is audited once, and emitted and notified at least once with a stable
//!   id, also across a restart (the outbox is written with the status).
#![warn(clippy::too_many_lines)]

pub mod alerts;
mod command;
mod cycle;
pub mod event;
mod gauges;
pub mod metrics;
mod record;
pub mod view;
pub mod webhook;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use baton_engine::{Millis, RevisionObs, Status};
use baton_proxy_api::RevisionStats;

pub use command::Command;
pub use cycle::{Answer, CycleError, Driver, Outcome, Request};
pub use event::{Event, Kind};
pub use gauges::Gauges;
pub use metrics::RolloutMetrics;
pub use record::{Record, RecordError};
pub use view::RolloutView;
pub use webhook::{Delivery, Notice, Notifier};

/// The rollout a cycle is about: its platform-neutral engine spec and identity.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Unique among the controller's rollouts (`name`, or `namespace/name`).
    pub key: &'a str,
    /// The rollout's own name (the `service` label of metrics).
    pub name: &'a str,
    pub spec: &'a baton_spec::Rollout,
    /// SHA-256 of the spec, recorded with every audit entry.
    pub digest: &'a str,
}

/// The error type every trait of one platform shares.
pub trait Port {
    type Error: std::error::Error + Send + Sync + 'static;
}

/// The platform's instances of each revision.
pub trait Workloads: Port {
    /// Ready and available instances per revision, now.
    fn observe(
        &mut self,
        t: &Target<'_>,
        prev: &Status,
        now: Millis,
    ) -> impl Future<Output = Result<BTreeMap<String, RevisionObs>, Self::Error>> + Send;

    /// Makes `status.desired` true (replicas per revision; a revision not listed has none).
    fn apply(
        &mut self,
        t: &Target<'_>,
        status: &Status,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The traffic router: weights and preview of `status`, and what it confirmed serving.
pub trait Traffic: Port {
    /// The highest route version the router has confirmed serving for this rollout.
    fn confirmed(&mut self, t: &Target<'_>) -> u64;

    /// Asks the router to serve the status' table. Answers whether it is seen serving
    /// it already (a router that confirms later reports it through `confirmed`).
    fn route(
        &mut self,
        t: &Target<'_>,
        status: &Status,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError<E: std::error::Error + 'static> {
    /// Someone else wrote the status since it was read: nothing was written, and the
    /// next cycle starts from what is there.
    #[error("the status changed since it was read")]
    Conflict,
    #[error(transparent)]
    Other(E),
}

/// Where the record lives (SQLite on one machine; the status subresource on a cluster).
pub trait StatusStore: Port {
    /// Persists `record` and appends `audit` to the audit trail — in one transaction
    /// where the platform has one. `changed` says whether the record differs from the
    /// one read; a store may write derived fields even when it does not.
    fn save(
        &mut self,
        t: &Target<'_>,
        record: &Record,
        changed: bool,
        audit: &[Event],
    ) -> impl Future<Output = Result<(), SaveError<Self::Error>>> + Send;
}

/// Blue-green smoke tests against the preview.
pub trait Smoke: Port {
    fn start(
        &mut self,
        t: &Target<'_>,
        revision: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// A finished run's `(revision, passed, detail)`, once.
    fn take(
        &mut self,
        t: &Target<'_>,
        prev: &Status,
    ) -> impl Future<Output = Result<Option<(String, bool, String)>, Self::Error>> + Send;
}

/// Per-revision request counters of the data plane, which builtin gates judge.
#[derive(Debug, Clone)]
pub enum Counters {
    Read(BTreeMap<String, RevisionStats>),
    /// Baton's own data plane did not answer: no verdict at all (Baton's failure is
    /// never counted against a user's version).
    Unreadable,
    /// This platform has no such counters: the gate errors with this reason.
    Unsupported(String),
    /// The user's metrics source (a cluster's Prometheus) failed: the gate errors with
    /// this reason, as a Prometheus gate's query error does.
    Failed(String),
}

/// Runs `command` gates where a platform wants them run (a cluster: as Jobs, never in
/// the operator's pod). The answer is the command's exit status as a sample, judged by
/// the driver as any provider's is.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        gate: baton_spec::Gate,
        vars: baton_analysis::Vars,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<baton_analysis::Sample, baton_analysis::ProviderError>>
                + Send,
        >,
    >;
}

pub trait DataPlane: Port {
    /// Counters of `revisions` (the measured one first, then stable); a platform whose
    /// counters cost a query per revision reads only these.
    fn counters(
        &mut self,
        t: &Target<'_>,
        revisions: &[&str],
    ) -> impl Future<Output = Counters> + Send;
    /// A ready instance of the revision, for checks that probe one directly.
    fn address(&self, t: &Target<'_>, revision: &str) -> Option<SocketAddr>;
    /// Where `command` gates run: `None`, here (child processes of the controller).
    fn commands(&self, _: &Target<'_>) -> Option<std::sync::Arc<dyn CommandRunner>> {
        None
    }
}

/// Where events are shown as they happen (a terminal, Kubernetes Events). Failures
/// are the sink's to log: an event is never worth failing a cycle.
pub trait Publish {
    fn emit(&mut self, t: &Target<'_>, event: &Event) -> impl Future<Output = ()> + Send;
}

/// Where notifications go (webhooks); delivery is in the background and never blocks.
pub trait Notify: Send + Sync {
    fn notify(&self, t: &Target<'_>, event: &Event);
}

/// Everything a platform implements for the driver.
pub trait Platform: Workloads + Traffic + StatusStore + Smoke + DataPlane + Publish {}
impl<T: Workloads + Traffic + StatusStore + Smoke + DataPlane + Publish> Platform for T {}

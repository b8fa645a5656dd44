//! The rollout engine: a pure function from (spec, status, observations, now) to
//! (status, actions).
//!
//! No I/O, no clock, no randomness: everything comes in as data and every decision goes
//! out as data, so the whole state machine is tested without processes or sockets.
//!
//! The engine's output is mostly *declarative*: `Status::desired` (replicas per
//! revision) and `Status::weights` (the routing table, with a version) are what the
//! platform and the router must make true. `Action`s are the few one-shot things:
//! measure a gate, run the smoke tests, record an event.
//!
//! The rule behind most of the code: **a change of traffic counts only once the router
//! has acknowledged it** (`Observations::router_acked >= Status::route_version`). No
//! step advances, no revision is promoted and nothing is scaled down before that.

mod strategy;

use std::collections::BTreeMap;

use baton_spec::{Rollout, RunSpec};
use serde::{Deserialize, Serialize};

pub use strategy::{describe, undo_target};

/// Milliseconds on the controller's clock (wall clock since the epoch in practice).
pub type Millis = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    /// Moving towards the desired revision.
    #[default]
    Progressing,
    /// Waiting for `promote` (a pause without duration, a blue-green without autoPromote,
    /// or a failed gate with `rollback.onFailure: false`).
    Paused,
    /// One revision serves all traffic and is available.
    Healthy,
    /// The new revision was aborted (by a human, a gate or the progress deadline); all
    /// traffic is on stable. `retry` tries again; a new spec starts over.
    Degraded,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Healthy => "Healthy",
            Phase::Degraded => "Degraded",
        }
    }
}

/// One revision of the rollout: one distinct `run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The revision hash of `run`.
    pub name: String,
    /// 1, 2, 3... in order of first appearance.
    pub number: u64,
    pub run: RunSpec,
    pub created_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
}

impl Revision {
    /// `#3 (v2, 1a2b3c4d5e)`: what people read in logs.
    pub fn label(&self) -> String {
        match self.run.app_version() {
            Some(v) => format!("#{} ({v}, {})", self.number, self.name),
            None => format!("#{} ({})", self.number, self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Pass,
    Fail,
    /// Too little data (below `minRequests`, an empty query); not counted either way,
    /// but too many pause the rollout (`inconclusiveLimit`).
    Inconclusive,
    /// The measurement could not be taken (the provider failed). Not a failed metric;
    /// too many in a row fail the gate (`consecutiveErrorLimit`).
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    pub gate: String,
    pub revision: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub requests: u64,
    pub at: Millis,
    /// Why: the condition and value, or why there was no verdict.
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    pub failures: u32,
    /// Passes since the current step began (an `analysis` step waits on these).
    pub passes: u32,
    pub inconclusive: u32,
    /// Provider errors since the last measurement that worked.
    #[serde(default)]
    pub consecutive_errors: u32,
    pub next_due: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Measurement>,
    /// When the gate's current run of failures began (a gate with `for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<Millis>,
}

/// A blue-green switch under judgment (`postPromotionAnalysis`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostPromotion {
    pub revision: String,
    pub previous: String,
    pub until: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SmokeState {
    #[default]
    NotRun,
    Running {
        since: Millis,
    },
    Passed,
    Failed,
}

/// Everything the engine remembers; persisted after every step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub phase: Phase,
    pub message: String,
    pub revisions: Vec<Revision>,
    /// Revisions that were stable, oldest first (for `undo`).
    pub stable_history: Vec<String>,
    pub stable: Option<String>,
    /// The revision being rolled out (canary, green, or the new side of a rolling update).
    pub canary: Option<String>,
    pub step_index: usize,
    pub step_started_at: Millis,
    /// The canary's share the current step asks for (canary strategy).
    pub canary_weight: u32,
    pub aborted: bool,
    /// Paused because a gate failed and `rollback.onFailure` is false.
    pub failed_paused: bool,
    pub promote_full: bool,
    /// A `promote` waiting to be consumed by the current step.
    pub promote_once: bool,
    /// Replicas per revision; a revision not listed should have no instance.
    pub desired: BTreeMap<String, u32>,
    /// The routing table: weight per revision, summing to 100.
    pub weights: BTreeMap<String, u32>,
    /// Revision served on the preview listener (blue-green).
    pub preview: Option<String>,
    /// Bumped whenever `weights` or `preview` change.
    pub route_version: u64,
    pub gates: BTreeMap<String, GateStatus>,
    /// Bumped whenever gate windows must start afresh (new canary, retry).
    pub analysis_epoch: u64,
    /// Every gate of `analysis.preTraffic` passed for this canary: it may get traffic.
    #[serde(default)]
    pub pre_traffic_done: bool,
    /// Blue-green: the new stable is still judged after the switch, and the previous
    /// one kept warm to switch back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_promotion: Option<PostPromotion>,
    pub smoke: SmokeState,
    pub last_progress_at: Millis,
    /// Canary availability last seen, to notice progress while instances start.
    pub last_canary_available: u32,
    /// Previous blue-green stacks kept running until this time.
    pub retain_until: BTreeMap<String, Millis>,
    /// Held by a person (`pause`) since this time: no step advances and the progress
    /// deadline does not count until `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_since: Option<Millis>,
    /// A restart was asked for at this time: the stable revision's instances started
    /// before it are replaced (with one more instance wanted meanwhile) until none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<Millis>,
    /// Instances the restart still had to replace when last seen: a change is progress,
    /// and none for `progressDeadlineSeconds` gives the restart up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_left: Option<u32>,
}

impl Status {
    pub fn revision(&self, name: &str) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.name == name)
    }
    fn revision_mut(&mut self, name: &str) -> Option<&mut Revision> {
        self.revisions.iter_mut().find(|r| r.name == name)
    }
    pub fn label(&self, name: &str) -> String {
        self.revision(name)
            .map(Revision::label)
            .unwrap_or_else(|| name.to_string())
    }
    pub fn weight(&self, name: &str) -> u32 {
        self.weights.get(name).copied().unwrap_or(0)
    }
}

/// What the platform saw of one revision's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionObs {
    /// Instances passing readiness now.
    pub ready: u32,
    /// Instances ready for at least `minReadySeconds`.
    pub available: u32,
    /// Instances started before `Status::restart_at`: a restart replaces them.
    #[serde(default)]
    pub stale: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Command {
    /// Go past the current step (a pause, an analysis, a blue-green preview).
    Promote,
    /// Skip every remaining step and analysis: straight to 100 %.
    PromoteFull,
    /// Return all traffic to stable and scale the new revision away.
    Abort,
    /// After an abort: start the steps again from the first.
    Retry,
    /// Hold the current step (traffic stays as it is) until `resume`.
    Pause,
    /// Go on from where `pause` held, with what was left of a timed pause.
    Resume,
    /// Replace the stable revision's instances, one at a time, each new one ready
    /// before an old one goes (a surge of one).
    Restart,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Promote => "promote",
            Command::PromoteFull => "promote --full",
            Command::Abort => "abort",
            Command::Retry => "retry",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Restart => "restart",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observations {
    pub revisions: BTreeMap<String, RevisionObs>,
    /// The highest routing-table version the router has confirmed.
    pub router_acked: u64,
    pub measurements: Vec<Measurement>,
    /// `(revision, passed, detail)` of a smoke run requested earlier.
    pub smoke: Option<(String, bool, String)>,
    pub commands: Vec<Command>,
}

impl Observations {
    pub fn rev(&self, name: &str) -> RevisionObs {
        self.revisions.get(name).copied().unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Take one measurement of a gate on a revision; the result comes back in
    /// `Observations::measurements`. `epoch` changes when the window must restart.
    Measure {
        gate: String,
        revision: String,
        epoch: u64,
        /// The gate's interval came: a verdict is owed. Otherwise a look between
        /// intervals at a `continuous` gate, which tells only a failure.
        due: bool,
    },
    /// Run the blue-green smoke tests against the preview revision.
    RunSmoke { revision: String },
    /// Something worth telling people and the history.
    Event(Event),
}

/// Why a new revision was stopped: what receivers tell apart (a user's abort is not a
/// rollback; a Kubernetes Warning is not raised for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    User,
    Gate,
    Smoke,
    Deadline,
}

/// What happened, typed: audit actions, Kubernetes Event reasons and notifications are
/// derived from this, never from the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "cause")]
pub enum EventKind {
    /// The rollout's very first revision, started with nothing to replace.
    FirstRevision,
    /// A new revision is being rolled out beside stable.
    NewRevision,
    Superseded,
    /// The spec went back to stable while a new revision was in flight.
    Abandoned,
    StepCompleted,
    Promoted,
    /// A user's promote past the current step.
    Promote,
    PromoteFull,
    Retry,
    SmokeStarted,
    SmokePassed,
    /// Blue-green: all traffic switches to the new stack.
    Switch,
    /// A person held the rollout at its step.
    Hold,
    /// A person let a held rollout go on.
    Resume,
    /// A person asked for the stable revision's instances to be replaced.
    Restart,
    /// Every instance a restart was to replace is replaced (or the restart gave way
    /// to a new revision).
    Restarted,
    Phase,
    Aborted(Cause),
    /// A failure with `rollback.onFailure: false`: paused for a human.
    FailedPaused(Cause),
}

impl EventKind {
    /// The event's reason in the `CamelCase` form logs and Kubernetes use.
    pub fn reason(self) -> &'static str {
        match self {
            EventKind::FirstRevision | EventKind::NewRevision => "NewRevision",
            EventKind::Superseded => "Superseded",
            EventKind::Abandoned => "Abandoned",
            EventKind::StepCompleted => "StepCompleted",
            EventKind::Promoted => "Promoted",
            EventKind::Promote => "Promote",
            EventKind::PromoteFull => "PromoteFull",
            EventKind::Retry => "Retry",
            EventKind::SmokeStarted => "SmokeStarted",
            EventKind::SmokePassed => "SmokePassed",
            EventKind::Switch => "Switch",
            EventKind::Hold => "Pause",
            EventKind::Resume => "Resume",
            EventKind::Restart => "Restart",
            EventKind::Restarted => "Restarted",
            EventKind::Phase => "Phase",
            EventKind::Aborted(_) => "Aborted",
            EventKind::FailedPaused(_) => "FailedPaused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub message: String,
}

/// The answer to one command: `Ok(what happened)` or `Err(why it does not apply)`.
pub type CommandResult = Result<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub status: Status,
    pub actions: Vec<Action>,
    pub command_results: Vec<CommandResult>,
}

/// One reconcile step. See the crate docs for the contract.
pub fn step(spec: &Rollout, prev: &Status, obs: &Observations, now: Millis) -> Output {
    strategy::step(spec, prev, obs, now)
}

//! The cycle's rules, with in-memory fakes of every trait: no process, no socket, no
//! API server.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use baton_driver::metrics::sample;
use baton_driver::{
    Command, Counters, DataPlane, Driver, Event, Kind, Notify, Port, Publish, Record, Request,
    SaveError, Smoke, StatusStore, Target, Traffic, Workloads,
};
use baton_engine::{EventKind, Millis, Phase, RevisionObs, Status};

const SPEC: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: web }
spec:
  replicas: 2
  run: { command: ["svc", "{port}"], env: { APP_VERSION: v1 } }
  traffic: { listen: "127.0.0.1:9000" }
  strategy:
    canary:
      steps:
        - setWeight: 20
        - pause: {}
        - setWeight: 60
"#;

/// The spec with a builtin gate measured every second.
fn gated() -> baton_spec::Rollout {
    let yaml = SPEC.replace(
        "        - setWeight: 60\n",
        "        - setWeight: 60\n  analysis:\n    gates:\n      - name: errors\n        metric: { builtin: error_rate }\n        successCondition: \"result < 0.01\"\n        interval: 1s\n",
    );
    baton_spec::parse(&yaml).expect("valid").remove(0)
}

fn spec(version: &str) -> baton_spec::Rollout {
    let mut s = baton_spec::parse(SPEC).expect("valid").remove(0);
    s.spec
        .run
        .env
        .insert("APP_VERSION".into(), version.to_string());
    s
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Save {
        changed: bool,
        desired: BTreeMap<String, u32>,
    },
    Apply(BTreeMap<String, u32>),
    Route(BTreeMap<String, u32>),
    Emit(String),
}

#[derive(Debug, thiserror::Error)]
#[error("fake failure")]
struct Failure;

/// A platform whose instances are ready as soon as they are desired, and whose router
/// confirms only when told to.
#[derive(Default)]
struct Fake {
    ops: Vec<Op>,
    instances: BTreeMap<String, u32>,
    /// The router confirms each table as it gets it.
    router_confirms: bool,
    confirmed: u64,
    /// Tables the router was asked to serve, not confirmed yet.
    asked: u64,
    stored: Option<Record>,
    audit: Vec<Event>,
    conflict_next_save: bool,
    emitted: Vec<Event>,
    commands: Option<Arc<HeldCommands>>,
}

/// Command gates that run until released, counting how many were started.
struct HeldCommands {
    started: std::sync::atomic::AtomicUsize,
    release: Arc<tokio::sync::Semaphore>,
}

impl Default for HeldCommands {
    fn default() -> HeldCommands {
        HeldCommands {
            started: Default::default(),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

type Answer = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<baton_analysis::Sample, baton_analysis::ProviderError>,
            > + Send,
    >,
>;

impl baton_driver::CommandRunner for HeldCommands {
    fn run(&self, _: baton_spec::Gate, _: baton_analysis::Vars) -> Answer {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let release = self.release.clone();
        Box::pin(async move {
            if let Ok(p) = release.acquire().await {
                p.forget();
            }
            Ok(baton_analysis::Sample::Value(0.0))
        })
    }
}

impl Port for Fake {
    type Error = Failure;
}

impl Workloads for Fake {
    async fn observe(
        &mut self,
        _: &Target<'_>,
        _: &Status,
        _: Millis,
    ) -> Result<BTreeMap<String, RevisionObs>, Failure> {
        Ok(self
            .instances
            .iter()
            .map(|(r, n)| {
                (
                    r.clone(),
                    RevisionObs {
                        ready: *n,
                        available: *n,
                        stale: 0,
                    },
                )
            })
            .collect())
    }
    async fn apply(&mut self, _: &Target<'_>, s: &Status) -> Result<(), Failure> {
        self.ops.push(Op::Apply(s.desired.clone()));
        self.instances = s.desired.clone();
        Ok(())
    }
}

impl Traffic for Fake {
    fn confirmed(&mut self, _: &Target<'_>) -> u64 {
        self.confirmed
    }
    async fn route(&mut self, _: &Target<'_>, s: &Status) -> Result<bool, Failure> {
        self.ops.push(Op::Route(s.weights.clone()));
        self.asked = s.route_version;
        if self.router_confirms {
            self.confirmed = s.route_version;
        }
        Ok(self.router_confirms)
    }
}

impl StatusStore for Fake {
    async fn save(
        &mut self,
        _: &Target<'_>,
        r: &Record,
        changed: bool,
        audit: &[Event],
    ) -> Result<(), SaveError<Failure>> {
        if std::mem::take(&mut self.conflict_next_save) {
            return Err(SaveError::Conflict);
        }
        self.ops.push(Op::Save {
            changed,
            desired: r.status.desired.clone(),
        });
        self.stored = Some(r.clone());
        self.audit.extend(audit.iter().cloned());
        Ok(())
    }
}

impl Smoke for Fake {
    async fn start(&mut self, _: &Target<'_>, _: &str) -> Result<(), Failure> {
        Ok(())
    }
    async fn take(
        &mut self,
        _: &Target<'_>,
        _: &Status,
    ) -> Result<Option<(String, bool, String)>, Failure> {
        Ok(None)
    }
}

impl DataPlane for Fake {
    async fn counters(&mut self, _: &Target<'_>, _: &[&str]) -> Counters {
        Counters::Unsupported("no data plane here".into())
    }
    fn address(&self, _: &Target<'_>, _: &str) -> Option<SocketAddr> {
        None
    }
    fn commands(&self, _: &Target<'_>) -> Option<Arc<dyn baton_driver::CommandRunner>> {
        self.commands
            .clone()
            .map(|c| c as Arc<dyn baton_driver::CommandRunner>)
    }
}

impl Publish for Fake {
    async fn emit(&mut self, _: &Target<'_>, e: &Event) {
        self.ops.push(Op::Emit(e.id.clone()));
        self.emitted.push(e.clone());
    }
}

#[derive(Default)]
struct Webhooks(Mutex<Vec<Event>>);

impl Notify for Webhooks {
    fn notify(&self, _: &Target<'_>, e: &Event) {
        self.0.lock().unwrap().push(e.clone());
    }
}

struct Run {
    driver: Driver,
    hooks: Arc<Webhooks>,
    fake: Fake,
    spec: baton_spec::Rollout,
    record: Record,
    now: Millis,
}

impl Run {
    fn new() -> Run {
        let hooks = Arc::new(Webhooks::default());
        Run {
            driver: Driver::new(Some(hooks.clone())),
            hooks,
            fake: Fake {
                router_confirms: true,
                ..Fake::default()
            },
            spec: spec("v1"),
            record: Record::default(),
            now: 1_000_000,
        }
    }

    async fn cycle(&mut self, requests: Vec<Request>) -> Vec<Result<String, String>> {
        self.now += 1000;
        let digest = String::new();
        let t = Target {
            key: "web",
            name: "web",
            spec: &self.spec,
            digest: &digest,
        };
        let out = self
            .driver
            .cycle(&mut self.fake, &t, &self.record, requests, self.now)
            .await
            .expect("cycle");
        self.record = out.record;
        out.answers.into_iter().map(|(_, a)| a).collect()
    }

    /// One cycle whose first write meets someone else's.
    async fn conflicting_cycle(
        &mut self,
    ) -> Result<baton_driver::Outcome, baton_driver::CycleError<Failure>> {
        self.fake.conflict_next_save = true;
        let digest = String::new();
        let t = Target {
            key: "web",
            name: "web",
            spec: &self.spec,
            digest: &digest,
        };
        self.driver
            .cycle(
                &mut self.fake,
                &t,
                &self.record,
                Vec::new(),
                self.now + 1000,
            )
            .await
    }

    async fn cycles(&mut self, n: usize) {
        for _ in 0..n {
            self.cycle(Vec::new()).await;
        }
    }

    /// A new revision of the rollout's spec as it is (gates and all): only
    /// `APP_VERSION` changes.
    fn set_version(&mut self, version: &str) {
        self.spec
            .spec
            .run
            .env
            .insert("APP_VERSION".into(), version.to_string());
    }

    fn weight(&self, version: &str) -> u32 {
        let s = &self.record.status;
        s.revisions
            .iter()
            .find(|r| r.run.app_version() == Some(version))
            .map_or(0, |r| s.weight(&r.name))
    }
}

fn ask(command: Command) -> Vec<Request> {
    vec![Request {
        command,
        actor: "os:alice".into(),
    }]
}

#[tokio::test]
async fn the_status_is_persisted_before_anything_is_acted_on() {
    let mut run = Run::new();
    run.cycles(3).await;
    assert_eq!(run.record.status.phase, Phase::Healthy);
    // Every apply and route carries a desired state that a save wrote before it.
    let mut saved: Option<BTreeMap<String, u32>> = None;
    for op in &run.fake.ops {
        match op {
            Op::Save { desired, .. } => saved = Some(desired.clone()),
            Op::Apply(d) => assert_eq!(Some(d), saved.as_ref(), "acted before persisting: {op:?}"),
            _ => {}
        }
    }
    assert!(
        run.fake
            .ops
            .iter()
            .any(|o| matches!(o, Op::Apply(d) if !d.is_empty()))
    );
}

#[tokio::test]
async fn nothing_is_scaled_down_before_the_router_confirms() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    run.cycles(3).await;
    assert_eq!(run.weight("v2"), 20);
    // From here the router takes tables but confirms none.
    run.fake.router_confirms = false;
    run.cycle(ask(Command::PromoteFull)).await;
    run.cycles(10).await;
    assert_eq!(run.record.status.phase, Phase::Progressing);
    let v1 = run.record.status.stable.clone().unwrap();
    for op in &run.fake.ops {
        if let Op::Apply(d) = op {
            assert_eq!(
                d.get(&v1),
                Some(&2),
                "stable scaled down unconfirmed: {d:?}"
            );
        }
    }
    assert!(run.fake.asked > run.fake.confirmed, "the router was asked");
    // Once it confirms, the new revision is promoted and only then stable goes.
    run.fake.router_confirms = true;
    run.cycles(6).await;
    assert_eq!(run.weight("v2"), 100);
    assert_eq!(run.record.status.phase, Phase::Healthy);
    let last = run.fake.ops.iter().rev().find_map(|o| match o {
        Op::Apply(d) => Some(d.clone()),
        _ => None,
    });
    assert_eq!(
        last.unwrap().get(&v1),
        None,
        "old stable scaled away at the end"
    );
}

#[tokio::test]
async fn every_event_is_audited_once_and_emitted_and_notified_with_its_id() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    run.cycles(3).await;
    let answers = run.cycle(ask(Command::Abort)).await;
    assert!(answers[0].is_ok(), "{answers:?}");
    run.cycles(3).await;

    let ids: Vec<&str> = run.fake.audit.iter().map(|e| e.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "audited twice: {ids:?}");
    let emitted: HashSet<&str> = run.fake.emitted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(unique, emitted, "every audited event is emitted");
    // Typed, not text: the user's abort is an abort, by the user, told to webhooks.
    let abort = run
        .fake
        .audit
        .iter()
        .find(|e| e.kind == Kind::Engine(EventKind::Aborted(baton_engine::Cause::User)))
        .expect("abort event");
    assert_eq!(abort.kind.audit_action(), "abort");
    assert!(
        run.fake
            .audit
            .iter()
            .any(|e| e.kind == Kind::Command(Command::Abort) && e.actor == "os:alice")
    );
    let hooks = run.hooks.0.lock().unwrap();
    assert!(hooks.iter().any(|e| e.id == abort.id));
    assert!(
        hooks
            .iter()
            .any(|e| e.kind == Kind::Engine(EventKind::NewRevision))
    );
    assert!(run.record.outbox.is_empty());
    assert_eq!(run.fake.stored.as_ref(), Some(&run.record));
}

#[tokio::test]
async fn events_written_but_not_told_before_a_crash_are_told_again_with_the_same_id() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    // The cycle that starts v2 persists its events; the process dies before telling
    // them: what a restart finds is the first save's record, outbox and all.
    run.fake.conflict_next_save = false;
    run.cycle(Vec::new()).await;
    let first_save = run
        .fake
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::Save { changed: true, .. }))
        .unwrap();
    assert!(first_save > 0);
    let told: Vec<Event> = run
        .fake
        .emitted
        .iter()
        .filter(|e| e.kind == Kind::Engine(EventKind::NewRevision))
        .cloned()
        .collect();
    assert_eq!(told.len(), 1);
    let mut crashed = run.record.clone();
    crashed.outbox = told.clone();
    let audited_before = run.fake.audit.len();

    // A new controller (or a new leader) starts from that record.
    let hooks = Arc::new(Webhooks::default());
    let mut again = Run::new();
    again.driver = Driver::new(Some(hooks.clone()));
    again.spec = run.spec.clone();
    again.record = crashed;
    again.fake.instances = run.fake.instances.clone();
    again.fake.confirmed = run.fake.confirmed;
    again.now = run.now;
    again.cycle(Vec::new()).await;
    let again_ids: Vec<&str> = again.fake.emitted.iter().map(|e| e.id.as_str()).collect();
    assert!(again_ids.contains(&told[0].id.as_str()), "{again_ids:?}");
    assert!(hooks.0.lock().unwrap().iter().any(|e| e.id == told[0].id));
    assert!(
        !again.fake.audit.iter().any(|e| e.id == told[0].id),
        "an event already audited is not audited again"
    );
    assert!(again.record.outbox.is_empty());
    assert!(audited_before > 0);
}

#[tokio::test]
async fn a_conflicting_write_acts_on_nothing() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    let ops_before = run.fake.ops.len();
    let r = run.conflicting_cycle().await;
    assert!(
        matches!(r, Err(baton_driver::CycleError::Conflict)),
        "{r:?}"
    );
    assert_eq!(
        run.fake.ops.len(),
        ops_before,
        "nothing applied, routed or told"
    );
}

#[tokio::test]
async fn commands_are_answered_and_undo_is_left_to_the_caller() {
    let mut run = Run::new();
    run.cycles(3).await;
    let answers = run.cycle(ask(Command::Retry)).await;
    assert_eq!(answers.len(), 1);
    assert!(
        answers[0]
            .as_ref()
            .unwrap_err()
            .contains("nothing to retry")
    );
    let answers = run.cycle(ask(Command::Undo)).await;
    assert!(answers.is_empty(), "undo is not the engine's");
    run.spec = spec("v2");
    run.cycles(3).await;
    assert_eq!(run.record.status.phase, Phase::Paused);
    let answers = run.cycle(ask(Command::Promote)).await;
    assert!(answers[0].is_ok());
    assert!(
        run.hooks
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.notify == Some(baton_spec::NotificationEvent::Paused)),
        "entering the pause is notified"
    );
}

#[tokio::test]
async fn builtin_gates_error_where_the_platform_has_no_counters() {
    let mut run = Run::new();
    run.spec = gated();
    run.cycles(3).await;
    run.set_version("v2");
    run.cycles(5).await;
    let gate = run
        .fake
        .audit
        .iter()
        .find(|e| e.kind == Kind::Gate(baton_engine::Verdict::Error))
        .expect("a gate error");
    assert!(
        gate.message.contains("no data plane here"),
        "{}",
        gate.message
    );
}

#[tokio::test]
async fn a_status_written_before_the_driver_reads_as_a_record_and_goes_on() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    run.cycles(3).await;
    assert_eq!(run.record.status.phase, Phase::Paused);
    // The release before the driver stored the engine's status alone.
    let old = serde_json::to_value(&run.record.status).unwrap();
    assert!(old.get("events").is_none() && old.get("outbox").is_none());
    let record = Record::decode("web", old).expect("reads");
    assert_eq!(record.status, run.record.status);
    assert!(record.outbox.is_empty());
    let step = record.status.step_index;
    run.record = record;
    run.cycles(2).await;
    assert_eq!(run.record.status.step_index, step, "the same step");
    assert_eq!(run.weight("v2"), 20);
    run.cycle(ask(Command::Promote)).await;
    run.cycles(6).await;
    assert!(run.record.status.step_index > step, "and on from there");
    assert_eq!(run.weight("v2"), 100);
    assert_eq!(run.record.status.phase, Phase::Healthy);
}

#[test]
fn a_status_that_cannot_be_read_is_an_error_naming_the_rollout() {
    let e = Record::decode("shop/web", serde_json::json!({"phase": 3})).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("shop/web") && text.contains("cannot be read"),
        "{text}"
    );
}

#[tokio::test]
async fn a_failed_cycle_keeps_the_measurements_it_took_for_the_next_one() {
    let mut run = Run::new();
    run.spec = gated();
    run.cycles(3).await;
    run.set_version("v2");
    // Until the canary has traffic and a measurement is waiting.
    for _ in 0..10 {
        run.cycle(Vec::new()).await;
        let waiting = run.driver.gauges.take("web");
        let any = !waiting.is_empty();
        for m in waiting {
            run.driver.gauges.push("web", m);
        }
        if any {
            break;
        }
    }
    let waiting = run.driver.gauges.take("web");
    assert!(
        !waiting.is_empty(),
        "a measurement waits for the next cycle"
    );
    for m in waiting.clone() {
        run.driver.gauges.push("web", m);
    }
    let r = run.conflicting_cycle().await;
    assert!(
        matches!(r, Err(baton_driver::CycleError::Conflict)),
        "{r:?}"
    );
    assert_eq!(
        run.driver.gauges.take("web"),
        waiting,
        "still owed to the next cycle"
    );
}

#[tokio::test]
async fn a_slow_command_gate_is_not_started_again_beside_itself() {
    let held = Arc::new(HeldCommands::default());
    let mut run = Run::new();
    run.fake.commands = Some(held.clone());
    let yaml = SPEC.replace(
        "        - setWeight: 60\n",
        "        - setWeight: 60\n  analysis:\n    gates:\n      - name: checks\n        metric: { command: { command: [check] } }\n        interval: 1s\n",
    );
    run.spec = baton_spec::parse(&yaml).expect("valid").remove(0);
    run.cycles(3).await;
    run.set_version("v2");
    // Ten intervals pass while the first measurement still runs (each cycle lets the
    // spawned measurements run too).
    for _ in 0..10 {
        run.cycles(1).await;
        tokio::task::yield_now().await;
    }
    let started = || held.started.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(started(), 1, "one measurement at a time per gate");
    // Once it answers, the next interval starts the next one.
    held.release.add_permits(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while started() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second measurement"
        );
        run.cycles(1).await;
        tokio::task::yield_now().await;
    }
    held.release.add_permits(100);
}

fn failed(gate: &str, revision: &str, at: Millis) -> baton_engine::Measurement {
    baton_engine::Measurement {
        gate: gate.into(),
        revision: revision.into(),
        verdict: baton_engine::Verdict::Fail,
        value: Some(0.5),
        requests: 100,
        at,
        detail: "result < 0.01 failed: 0.5".into(),
    }
}

#[tokio::test]
async fn rollout_metrics_follow_a_promotion() {
    let mut run = Run::new();
    run.cycles(3).await;
    run.spec = spec("v2");
    run.cycles(3).await;
    assert_eq!(run.record.status.phase, Phase::Paused);
    let m = run.driver.metrics.render();
    let canary = run.record.status.canary.clone().expect("a canary");
    let rollout = r#"namespace="",rollout="web""#;
    assert_eq!(
        sample(&m, &format!("baton_rollouts_started_total{{{rollout}}}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!("baton_rollouts_promoted_total{{{rollout}}}")),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Paused"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Healthy"}}"#)
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!("baton_rollout_step{{{rollout}}}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_weight{{{rollout},revision="{canary}",role="canary"}}"#)
        ),
        Some(20.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_served_weight{{{rollout},revision="{canary}"}}"#)
        ),
        Some(20.0),
        "{m}"
    );
    run.cycle(ask(Command::PromoteFull)).await;
    run.cycles(4).await;
    assert_eq!(run.record.status.phase, Phase::Healthy);
    let m = run.driver.metrics.render();
    assert_eq!(
        sample(&m, &format!("baton_rollouts_promoted_total{{{rollout}}}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_duration_seconds_count{{{rollout},result="promoted"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Healthy"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    // The canary is stable now: one weight series, no stale canary one.
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_weight{{{rollout},revision="{canary}",role="stable"}}"#)
        ),
        Some(100.0),
        "{m}"
    );
    assert!(!m.contains(r#"role="canary""#), "{m}");
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollouts_rolled_back_total{{{rollout},reason="gate"}}"#)
        ),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_rollback_is_timed_from_the_first_failure_to_the_routers_confirmation() {
    let mut run = Run::new();
    run.spec = gated();
    run.cycles(3).await;
    run.set_version("v2");
    run.cycles(2).await;
    let canary = run.record.status.canary.clone().expect("a canary");
    // A failure measured on stable does not start the canary's rollback clock.
    let stable = run.record.status.stable.clone().expect("stable");
    run.driver
        .gauges
        .push("web", failed("errors", &stable, run.now + 1000));
    run.cycle(Vec::new()).await;
    assert!(
        !run.record.status.aborted,
        "{:?}",
        run.record.status.message
    );
    let first_failure = run.now + 1000;
    // The router stops confirming: the rollback is decided but not yet served.
    run.fake.router_confirms = false;
    run.driver
        .gauges
        .push("web", failed("errors", &canary, first_failure));
    run.cycle(Vec::new()).await;
    assert!(run.record.status.aborted, "{:?}", run.record.status.message);
    let rollout = r#"namespace="",rollout="web""#;
    let m = run.driver.metrics.render();
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_gate_verdicts_total{{{rollout},gate="errors",result="fail"}}"#)
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollouts_rolled_back_total{{{rollout},reason="gate"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_duration_seconds_count{{{rollout},result="rolled_back"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        !m.contains("baton_rollout_time_to_rollback_seconds_count{"),
        "no rollback time before the router serves it: {m}"
    );
    // The router still serves the canary's 20 %: that is what is reported served.
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_served_weight{{{rollout},revision="{canary}"}}"#)
        ),
        Some(20.0),
        "{m}"
    );
    run.cycles(2).await;
    run.fake.confirmed = run.fake.asked;
    run.cycle(Vec::new()).await;
    let m = run.driver.metrics.render();
    assert_eq!(
        sample(
            &m,
            &format!("baton_rollout_time_to_rollback_seconds_count{{{rollout}}}")
        ),
        Some(1.0),
        "{m}"
    );
    let took = sample(
        &m,
        &format!("baton_rollout_time_to_rollback_seconds_sum{{{rollout}}}"),
    );
    assert_eq!(took, Some((run.now - first_failure) as f64 / 1000.0), "{m}");
    assert!(!m.contains(&format!(r#"revision="{canary}""#)), "{m}");
    assert_eq!(
        sample(
            &m,
            &format!(r#"baton_rollout_phase{{{rollout},phase="Degraded"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
}

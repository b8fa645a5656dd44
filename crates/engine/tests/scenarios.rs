//! Whole rollouts through the engine in a simulated world.

mod common;

use baton_engine::{Action, Command, EventKind, Phase, RevisionObs, Verdict, undo_target};
use common::*;

fn started(yaml: &str) -> World {
    let mut w = World::new(spec(yaml));
    w.tick();
    w.tick();
    assert_eq!(w.status.phase, Phase::Healthy, "{}", w.status.message);
    assert_eq!(w.weight("v1"), 100);
    w
}

#[test]
fn first_revision_becomes_healthy_once_available() {
    let mut w = World::new(spec(CANARY));
    w.perfect = false;
    w.tick();
    assert_eq!(w.status.phase, Phase::Progressing);
    let v1 = w.name_of("v1");
    assert_eq!(w.status.desired.get(&v1), Some(&2));
    w.obs.revisions.insert(
        v1.clone(),
        RevisionObs {
            ready: 2,
            available: 2,
            stale: 0,
        },
    );
    w.tick();
    assert_eq!(
        w.status.phase,
        Phase::Progressing,
        "not healthy before the router acked"
    );
    w.obs.router_acked = w.status.route_version;
    w.tick();
    assert_eq!(w.status.phase, Phase::Healthy);
}

#[test]
fn canary_walks_its_steps_and_waits_for_promote() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    assert_eq!(w.status.phase, Phase::Progressing);
    w.tick();
    assert_eq!(w.weight("v2"), 10);
    assert_eq!(w.weight("v1"), 90);
    // The 10 s pause, then the analysis step needs two passes.
    assert!(w.run_until(Verdict::Pass, |w| w.weight("v2") == 50));
    assert!(w.run_until(Verdict::Pass, |w| w.status.phase == Phase::Paused));
    assert_eq!(w.weight("v2"), 50);
    w.advance(600_000);
    assert_eq!(
        w.status.phase,
        Phase::Paused,
        "an indefinite pause is not a stalled rollout"
    );
    w.command(Command::Promote).expect("promote");
    assert!(w.run_until(Verdict::Pass, |w| w.status.phase == Phase::Healthy));
    let v2 = w.name_of("v2");
    assert_eq!(w.status.stable.as_deref(), Some(v2.as_str()));
    assert_eq!(w.weight("v2"), 100);
    w.tick();
    assert!(
        !w.status.desired.contains_key(&w.name_of("v1")),
        "old stable scaled away"
    );
}

#[test]
fn a_weight_step_waits_for_the_router() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.perfect = false;
    let v2 = w.status.revisions.len();
    w.tick();
    let name = w.name_of("v2");
    w.obs.revisions.insert(
        name.clone(),
        RevisionObs {
            ready: 2,
            available: 2,
            stale: 0,
        },
    );
    for _ in 0..20 {
        w.advance(1000);
    }
    assert_eq!(v2 + 1, w.status.revisions.len());
    assert_eq!(w.status.weight(&name), 10, "the table asks for 10 %");
    assert_eq!(
        w.status.step_index, 0,
        "but the step is not done before the ack"
    );
    w.obs.router_acked = w.status.route_version;
    w.tick();
    assert_eq!(w.status.step_index, 1);
}

#[test]
fn failed_gate_rolls_back_to_stable() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    assert_eq!(w.weight("v2"), 10);
    w.tick();
    w.answer_measurements(Verdict::Fail);
    let out = w.advance(1000);
    assert_eq!(w.status.phase, Phase::Degraded);
    assert!(
        w.status.message.contains("gate errors failed"),
        "{}",
        w.status.message
    );
    assert_eq!(w.weight("v2"), 0);
    assert_eq!(w.weight("v1"), 100);
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::Event(e) if e.kind.reason() == "Aborted"))
    );
    let v2 = w.name_of("v2");
    assert!(
        w.status.desired.contains_key(&v2),
        "canary kept until the router acked 0 %"
    );
    w.tick();
    assert!(!w.status.desired.contains_key(&v2), "then scaled away");
    assert_eq!(
        w.status
            .revision(&v2)
            .and_then(|r| r.abort_reason.clone())
            .map(|r| r.contains("errors")),
        Some(true)
    );
    // Retry starts over.
    w.command(Command::Retry).expect("retry");
    assert!(w.run_until(Verdict::Pass, |w| w.weight("v2") == 10));
}

#[test]
fn inconclusive_measurements_neither_pass_nor_fail() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.advance(11_000);
    for _ in 0..30 {
        w.answer_measurements(Verdict::Inconclusive);
        w.advance(1000);
    }
    assert_eq!(w.status.step_index, 2, "analysis step still waiting");
    assert_eq!(w.status.phase, Phase::Progressing);
}

#[test]
fn abort_and_promote_full_commands() {
    let mut w = started(CANARY);
    assert!(w.command(Command::Abort).is_err(), "nothing to abort");
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    assert!(
        w.command(Command::Promote).is_err(),
        "a setWeight step is not promoted by hand"
    );
    w.command(Command::Abort).expect("abort");
    assert_eq!(w.status.phase, Phase::Degraded);
    assert_eq!(w.weight("v1"), 100);
    assert!(w.command(Command::Abort).is_err());
    assert!(
        w.command(Command::PromoteFull).is_err(),
        "aborted: retry first"
    );
    w.command(Command::Retry).expect("retry");
    w.tick();
    w.command(Command::PromoteFull).expect("full");
    w.tick();
    w.tick();
    assert_eq!(w.status.phase, Phase::Healthy);
    assert_eq!(w.weight("v2"), 100);
}

#[test]
fn spec_back_to_stable_abandons_canary_and_undo_finds_previous() {
    let mut w = started(CANARY);
    let v1 = w.spec.clone();
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.spec = v1;
    w.tick();
    w.tick();
    assert_eq!(w.status.canary, None);
    assert_eq!(w.status.phase, Phase::Healthy);
    assert_eq!(w.weight("v1"), 100);
    assert_eq!(undo_target(&w.status), None, "v1 was the only stable");
    w.spec = with_version(&w.spec, "v3");
    w.tick();
    w.command(Command::PromoteFull).expect("full");
    w.tick();
    w.tick();
    assert_eq!(
        undo_target(&w.status).and_then(|r| r.run.app_version()),
        Some("v1")
    );
}

#[test]
fn progress_deadline_aborts_a_canary_that_never_starts() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.perfect = false;
    w.tick();
    w.advance(59_000);
    assert_eq!(w.status.phase, Phase::Progressing);
    w.advance(2_000);
    assert_eq!(w.status.phase, Phase::Degraded);
    assert!(
        w.status.message.contains("progress deadline"),
        "{}",
        w.status.message
    );
}

#[test]
fn failure_without_rollback_pauses() {
    let mut s = spec(CANARY);
    s.spec.rollback.on_failure = false;
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    w.answer_measurements(Verdict::Fail);
    w.advance(1000);
    assert_eq!(w.status.phase, Phase::Paused);
    assert_eq!(w.weight("v2"), 10, "traffic stays where it was");
    w.command(Command::Promote)
        .expect("promote past the failure");
    assert_eq!(w.status.phase, Phase::Progressing);
}

#[test]
fn blue_green_previews_smokes_switches_and_retains() {
    let mut w = started(BLUE_GREEN);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    let v2 = w.name_of("v2");
    assert_eq!(w.status.preview.as_deref(), Some(v2.as_str()));
    assert_eq!(w.weight("v2"), 0);
    let out = w.tick();
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::RunSmoke { revision } if *revision == v2))
    );
    w.obs.smoke = Some((v2.clone(), true, "ok".into()));
    w.tick();
    w.tick();
    assert_eq!(w.status.phase, Phase::Healthy);
    assert_eq!(w.weight("v2"), 100);
    let v1 = w.name_of("v1");
    assert_eq!(
        w.status.desired.get(&v1),
        Some(&2),
        "previous stack retained"
    );
    w.advance(61_000);
    assert!(
        !w.status.desired.contains_key(&v1),
        "and released after retainPrevious"
    );
}

/// Blue-green to `version`, through preview and smoke, until it serves everything.
fn switch_to(w: &mut World, version: &str) {
    w.spec = with_version(&w.spec, version);
    w.tick();
    w.tick();
    let rev = w.name_of(version);
    assert_eq!(w.status.preview.as_deref(), Some(rev.as_str()));
    w.tick();
    w.obs.smoke = Some((rev, true, "ok".into()));
    w.tick();
    w.tick();
    assert_eq!(w.status.phase, Phase::Healthy, "{}", w.status.message);
    assert_eq!(w.weight(version), 100);
}

/// The soak shipped a blue-green rollout every 30 s: each promotion kept its previous
/// stack for `retainPrevious` on top of those already kept, five stacks at once.
#[test]
fn a_promotion_keeps_only_the_stack_it_replaced_warm() {
    let mut w = started(BLUE_GREEN);
    switch_to(&mut w, "v2");
    switch_to(&mut w, "v3");
    // Once the router confirms v3's table, v1 serves nothing.
    w.tick();
    w.tick();
    let (v1, v2) = (w.name_of("v1"), w.name_of("v2"));
    assert_eq!(
        w.status.desired.get(&v2),
        Some(&2),
        "the replaced stack is warm"
    );
    assert!(
        !w.status.desired.contains_key(&v1),
        "the one before it goes: {:?}",
        w.status.desired
    );
    assert_eq!(
        w.status.retain_until.len(),
        1,
        "{:?}",
        w.status.retain_until
    );
    assert_eq!(undo_target(&w.status).map(|r| r.name.clone()), Some(v2));
}

#[test]
fn blue_green_failed_smoke_aborts() {
    let mut w = started(BLUE_GREEN);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    let v2 = w.name_of("v2");
    w.obs.smoke = Some((v2.clone(), false, "GET /readyz: 503".into()));
    w.tick();
    assert_eq!(w.status.phase, Phase::Degraded);
    assert!(w.status.message.contains("503"));
    assert_eq!(w.weight("v1"), 100);
    assert_eq!(w.status.preview, None);
}

#[test]
fn rolling_keeps_capacity_and_finishes() {
    let mut w = started(ROLLING);
    w.spec = with_version(&w.spec, "v2");
    let mut steps = 0;
    while w.status.phase != Phase::Healthy
        || w.status.revisions.len() < 2
        || w.status.stable.as_deref() != Some(w.name_of("v2").as_str())
    {
        w.tick();
        let total: u32 = w.status.desired.values().sum();
        assert!(
            total <= 4,
            "never above replicas + maxSurge: {:?}",
            w.status.desired
        );
        let avail: u32 = w.obs.revisions.values().map(|r| r.available).sum();
        assert!(
            avail >= 2,
            "never below replicas - maxUnavailable available"
        );
        steps += 1;
        assert!(steps < 50, "rolling did not finish: {:?}", w.status);
    }
    w.tick();
    assert_eq!(w.status.desired.len(), 1);
    assert_eq!(w.weight("v2"), 100);
}

fn canary_with(edit: impl Fn(&mut baton_spec::Gate)) -> World {
    let mut s = spec(CANARY);
    edit(&mut s.spec.analysis.gates[0]);
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    w
}

#[test]
fn a_dry_run_gate_records_but_never_acts() {
    let mut w = canary_with(|g| g.dry_run = true);
    for _ in 0..5 {
        w.answer_measurements(Verdict::Fail);
        w.advance(1000);
    }
    assert_eq!(w.status.phase, Phase::Progressing, "{}", w.status.message);
    assert!(
        w.status.gates["errors"].failures >= 3,
        "failures are recorded"
    );
    // Nor does it hold the analysis step that names it.
    assert!(w.run_until(Verdict::Fail, |w| w.status.phase == Phase::Paused));
    assert_eq!(w.weight("v2"), 50);
}

#[test]
fn provider_errors_fail_the_gate_only_past_the_limit() {
    let mut w = canary_with(|g| g.consecutive_error_limit = 2);
    for _ in 0..2 {
        w.answer_measurements(Verdict::Error);
        w.advance(1000);
    }
    assert_eq!(w.status.phase, Phase::Progressing);
    w.answer_measurements(Verdict::Pass);
    w.advance(1000);
    assert_eq!(
        w.status.gates["errors"].consecutive_errors, 0,
        "a good measurement resets the count"
    );
    for _ in 0..3 {
        w.answer_measurements(Verdict::Error);
        w.advance(1000);
    }
    assert_eq!(w.status.phase, Phase::Degraded);
    assert!(
        w.status.message.contains("could not be measured 3 times"),
        "{}",
        w.status.message
    );
}

#[test]
fn too_many_inconclusive_measurements_pause_for_a_human() {
    let mut w = canary_with(|g| g.inconclusive_limit = Some(2));
    for _ in 0..3 {
        w.answer_measurements(Verdict::Inconclusive);
        w.advance(1000);
    }
    assert_eq!(
        w.status.phase,
        Phase::Paused,
        "not rolled back: not knowing is not failing"
    );
    assert!(
        w.status.message.contains("inconclusive 3 times"),
        "{}",
        w.status.message
    );
    assert_eq!(w.weight("v2"), 10, "traffic stays where it was");
}

#[test]
fn a_gate_can_pause_instead_of_rolling_back() {
    let mut w = canary_with(|g| g.on_failure = Some(baton_spec::OnFailure::Pause));
    w.answer_measurements(Verdict::Fail);
    w.advance(1000);
    assert_eq!(w.status.phase, Phase::Paused);
    w.command(Command::Abort).expect("a human decides");
    assert_eq!(w.status.phase, Phase::Degraded);
}

#[test]
fn initial_delay_postpones_the_first_measurement() {
    let mut w = canary_with(|g| g.initial_delay = baton_spec::Duration::from_secs(5));
    let measured = |w: &World| {
        w.last.as_ref().is_some_and(|o| {
            o.actions
                .iter()
                .any(|a| matches!(a, Action::Measure { due: true, .. }))
        })
    };
    let mut first = None;
    for i in 0..10 {
        w.advance(1000);
        if measured(&w) {
            first = Some(i + 1);
            break;
        }
    }
    assert!(
        first.is_some_and(|s| s >= 5),
        "first measurement after {first:?} s"
    );
}

#[test]
fn pause_holds_the_step_and_the_deadline_and_resume_goes_on_with_what_was_left() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    assert_eq!(w.weight("v2"), 10);
    assert_eq!(w.status.step_index, 1, "in the 10 s pause");
    w.advance(4_000);
    w.command(Command::Pause).expect("pause");
    assert!(w.command(Command::Pause).is_err(), "already paused");
    assert_eq!(w.status.phase, Phase::Paused);
    // Far past the pause's 10 s and the 60 s progress deadline: held, not failed.
    w.advance(120_000);
    w.advance(1_000);
    assert_eq!(w.status.phase, Phase::Paused, "{}", w.status.message);
    assert_eq!(w.status.step_index, 1);
    assert_eq!(w.weight("v2"), 10, "traffic stays as it is");
    w.command(Command::Resume).expect("resume");
    assert!(w.command(Command::Resume).is_err(), "nothing to resume");
    // About 6 s of the pause were left.
    w.advance(4_000);
    assert_eq!(w.status.step_index, 1, "the pause is not over yet");
    w.advance(3_000);
    assert_eq!(w.status.step_index, 2, "then the analysis step");
    assert_eq!(w.status.phase, Phase::Progressing);
}

#[test]
fn a_held_canary_is_still_judged_and_a_failure_still_rolls_it_back() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.command(Command::Pause).expect("pause");
    assert!(w.run_until(Verdict::Fail, |w| w.status.aborted));
    assert_eq!(w.status.phase, Phase::Degraded);
    assert_eq!(w.weight("v2"), 0);
    assert!(
        w.command(Command::Resume).is_err(),
        "the abort ended the hold"
    );
}

#[test]
fn a_rolling_update_cannot_be_held_half_way() {
    let mut w = started(ROLLING);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    let e = w.command(Command::Pause).expect_err("refused");
    assert!(e.contains("rolling"), "{e}");
}

/// A spec that slipped past validation with durations too long to add to a time:
/// nothing wraps round to "now" (without saturation a debug build panics, a release
/// build ends the pause at once and promotes).
#[test]
fn durations_too_long_to_add_to_a_time_never_wrap() {
    let forever = baton_spec::Duration::from_secs(u64::MAX);
    let mut s = spec(CANARY);
    s.spec.progress_deadline_seconds = u64::MAX;
    s.spec.analysis.gates[0].interval = forever;
    if let Some(c) = s.spec.strategy.canary.as_mut() {
        c.steps[1] = baton_spec::Step::Pause(baton_spec::Pause {
            duration: Some(forever),
        });
    }
    let mut w = World::new(s.clone());
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    let mut measured = 0;
    for _ in 0..48 {
        w.answer_measurements(Verdict::Pass);
        w.advance(3_600_000);
        measured += w.last.as_ref().map_or(0, |o| {
            o.actions
                .iter()
                .filter(|a| matches!(a, Action::Measure { due: true, .. }))
                .count()
        });
    }
    assert_eq!(w.status.phase, Phase::Progressing, "{}", w.status.message);
    assert_eq!(w.status.step_index, 1, "still in the pause after two days");
    assert_eq!(w.weight("v2"), 10);
    assert_eq!(measured, 1, "measured once, the next is an interval away");

    // A canary that never becomes available is not failed by a deadline that wrapped.
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w.perfect = false;
    for _ in 0..48 {
        w.advance(3_600_000);
    }
    assert_eq!(w.status.phase, Phase::Progressing, "{}", w.status.message);

    // Blue-green keeps the previous stack for the retention, however long.
    let mut s = spec(BLUE_GREEN);
    if let Some(bg) = s.spec.strategy.blue_green.as_mut() {
        bg.retain_previous = forever;
    }
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    let v2 = w.name_of("v2");
    w.obs.smoke = Some((v2, true, "ok".into()));
    w.tick();
    w.tick();
    assert_eq!(w.weight("v2"), 100);
    w.advance(86_400_000);
    assert_eq!(
        w.status.desired.get(&w.name_of("v1")),
        Some(&2),
        "previous stack still retained a day later"
    );

    // A rolling update with a surge too large to add to replicas still finishes.
    let mut s = spec(ROLLING);
    if let Some(r) = s.spec.strategy.rolling.as_mut() {
        r.max_surge = u32::MAX;
    }
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    assert!(
        w.run_until(Verdict::Pass, |w| w.status.phase == Phase::Healthy
            && w.status.stable.as_deref() == Some(w.name_of("v2").as_str()))
    );
    assert!(w.status.desired.values().sum::<u32>() <= 3 + 3);
}

/// The stable revision's instances the platform still runs from before a restart.
fn stale(w: &mut World, n: u32) {
    let stable = w.status.stable.clone().expect("stable");
    if let Some(o) = w.obs.revisions.get_mut(&stable) {
        o.stale = n;
    }
}

#[test]
fn a_restart_surges_by_one_until_no_instance_predates_it() {
    let mut w = started(CANARY);
    let stable = w.status.stable.clone().expect("stable");
    let replicas = w.status.desired[&stable];
    w.perfect = false;
    // The platform still runs every instance it had.
    stale(&mut w, replicas);
    w.command(Command::Restart).expect("restart");
    assert!(w.command(Command::Restart).is_err(), "already restarting");
    assert_eq!(
        w.status.desired[&stable],
        replicas + 1,
        "one more while replacing"
    );
    assert_eq!(w.weight("v1"), 100, "traffic does not move");
    assert_eq!(w.status.phase, Phase::Progressing, "a restart is under way");
    // Replaced one by one: still restarting while any old instance is left.
    for left in (1..replicas).rev() {
        stale(&mut w, left);
        w.advance(1_000);
        assert!(w.status.restart_at.is_some(), "{left} left");
        assert_eq!(w.status.desired[&stable], replicas + 1);
    }
    stale(&mut w, 0);
    let out = w.advance(1_000);
    assert_eq!(w.status.restart_at, None, "done");
    assert_eq!(w.status.phase, Phase::Healthy);
    assert_eq!(w.status.desired[&stable], replicas, "the surge goes");
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::Event(e) if e.kind == EventKind::Restarted)),
        "{:?}",
        out.actions
    );
}

#[test]
fn a_restart_waits_for_a_rollout_and_gives_way_to_a_new_one() {
    let mut w = started(CANARY);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    let e = w.command(Command::Restart).expect_err("refused");
    assert!(e.contains("rolling out"), "{e}");

    let mut w = started(CANARY);
    w.perfect = false;
    stale(&mut w, 2);
    w.command(Command::Restart).expect("restart");
    w.spec = with_version(&w.spec, "v2");
    let out = w.advance(1_000);
    assert_eq!(
        w.status.restart_at, None,
        "a new revision replaces every instance"
    );
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::Event(e) if e.kind == EventKind::Restarted)),
        "{:?}",
        out.actions
    );
}

#[test]
fn a_restart_that_makes_no_progress_is_given_up_at_the_deadline() {
    let mut w = started(CANARY);
    let stable = w.status.stable.clone().expect("stable");
    let replicas = w.status.desired[&stable];
    w.perfect = false;
    stale(&mut w, replicas);
    w.command(Command::Restart).expect("restart");
    // One replaced, then the replacement never gets ready: nothing moves any more.
    stale(&mut w, replicas - 1);
    w.advance(1_000);
    let deadline = w.spec.spec.progress_deadline_seconds * 1000;
    w.advance(deadline - 1_000);
    assert!(
        w.status.restart_at.is_some(),
        "not yet: {}",
        w.status.message
    );
    let out = w.advance(2_000);
    assert_eq!(w.status.restart_at, None, "given up");
    assert_eq!(w.status.desired[&stable], replicas, "the surge goes");
    assert!(
        out.actions.iter().any(|a| matches!(a, Action::Event(e)
            if e.kind == EventKind::Restarted && e.message.contains("given up"))),
        "{:?}",
        out.actions
    );
}

#[test]
fn nothing_to_restart_without_instances() {
    let mut w = started(CANARY);
    w.spec.spec.replicas = 0;
    w.tick();
    let e = w.command(Command::Restart).expect_err("refused");
    assert!(e.contains("replicas: 0"), "{e}");
}

#[test]
fn a_gate_with_for_acts_only_on_a_failure_that_persisted() {
    // Measured every second; failures must last 3 s.
    let mut w = canary_with(|g| g.for_duration = Some(baton_spec::Duration::from_secs(3)));
    // Failing for 2 s, then a pass: the run of failures starts again.
    for _ in 0..3 {
        w.answer_measurements(Verdict::Fail);
        w.advance(1000);
    }
    assert_eq!(w.status.phase, Phase::Progressing, "{}", w.status.message);
    let last = w.status.gates["errors"].last.clone().expect("recorded");
    assert_eq!(last.verdict, Verdict::Inconclusive);
    assert!(
        last.detail.contains("failing for 2.0s of the 3s"),
        "{}",
        last.detail
    );
    w.answer_measurements(Verdict::Pass);
    w.advance(1000);
    assert_eq!(w.status.gates["errors"].failing_since, None);
    // Four failing seconds in a row: the fourth has lasted 3 s and counts.
    for _ in 0..3 {
        w.answer_measurements(Verdict::Fail);
        w.advance(1000);
        assert_ne!(w.status.phase, Phase::Degraded, "{}", w.status.message);
    }
    w.answer_measurements(Verdict::Fail);
    w.advance(1000);
    assert_eq!(w.status.phase, Phase::Degraded, "{}", w.status.message);
    assert!(
        w.status.message.contains("gate errors failed 1 time(s)"),
        "{}",
        w.status.message
    );
}

fn with_pre_traffic(yaml: &str) -> World {
    let yaml = if yaml.contains("  analysis:\n    gates:\n") {
        yaml.to_string()
    } else {
        format!("{yaml}  analysis:\n    gates:\n")
    };
    let s = spec(&yaml.replace(
        "  analysis:\n    gates:\n",
        "  analysis:\n    preTraffic: [verify]\n    gates:\n      - name: verify\n        metric: { command: { command: [\"cosign\", \"verify\"] } }\n        interval: 1s\n",
    ));
    let mut w = World::new(s);
    w.tick();
    w.tick();
    w.spec = with_version(&w.spec, "v2");
    w
}

/// Ticks until the pre-traffic check is asked for, with no traffic to v2 meanwhile.
fn until_checked(w: &mut World) {
    for _ in 0..20 {
        w.advance(100);
        assert_eq!(w.weight("v2"), 0, "no traffic before the check");
        assert_eq!(w.status.preview, None, "no preview before the check");
        assert!(!measured(w, "errors"), "no traffic gates before traffic");
        if measured(w, "verify") {
            return;
        }
    }
    panic!("the check never ran: {}", w.status.message);
}

fn measured(w: &World, gate: &str) -> bool {
    w.last.as_ref().is_some_and(|o| {
        o.actions
            .iter()
            .any(|a| matches!(a, Action::Measure { gate: g, .. } if g == gate))
    })
}

#[test]
fn pre_traffic_gates_run_before_any_traffic_and_a_failure_never_serves() {
    // Passing: v2 gets no traffic until its check passed, then goes through its steps.
    let mut w = with_pre_traffic(CANARY);
    until_checked(&mut w);
    w.answer_measurements(Verdict::Pass);
    w.advance(100);
    w.advance(100);
    assert_eq!(w.weight("v2"), 10, "{}", w.status.message);
    assert!(w.status.pre_traffic_done);
    // Not measured again while v2 has traffic.
    for _ in 0..5 {
        w.advance(1000);
        assert!(!measured(&w, "verify"));
    }

    // Failing: aborted with v2 never given a request.
    let mut w = with_pre_traffic(CANARY);
    until_checked(&mut w);
    w.answer_measurements(Verdict::Fail);
    for _ in 0..5 {
        w.advance(100);
        assert_eq!(w.weight("v2"), 0);
    }
    assert_eq!(w.status.phase, Phase::Degraded, "{}", w.status.message);
    assert!(
        w.status
            .message
            .contains("before traffic: gate verify failed"),
        "{}",
        w.status.message
    );

    // Blue-green: not even the preview before the check.
    let mut w = with_pre_traffic(BLUE_GREEN);
    until_checked(&mut w);
    assert_eq!(w.status.preview, None, "no preview before the check");
    w.answer_measurements(Verdict::Pass);
    w.advance(100);
    w.advance(100);
    assert!(
        w.status.preview.is_some() || w.weight("v2") == 100,
        "{}",
        w.status.message
    );
}

fn post_promotion_switched(verdict_after: Option<Verdict>) -> World {
    let yaml = format!(
        "{}  analysis:\n    gates:\n      - name: errors\n        metric: {{ builtin: error_rate }}\n        successCondition: \"result < 0.01\"\n        interval: 1s\n",
        BLUE_GREEN.replace(
            "      retainPrevious: 1m\n",
            "      retainPrevious: 1m\n      postPromotionAnalysis: 30s\n"
        )
    );
    let mut w = started(&yaml);
    w.spec = with_version(&w.spec, "v2");
    w.tick();
    w.tick();
    w.tick();
    let v2 = w.name_of("v2");
    w.obs.smoke = Some((v2.clone(), true, "ok".into()));
    w.tick();
    w.tick();
    assert_eq!(w.weight("v2"), 100, "{}", w.status.message);
    assert_eq!(w.status.stable.as_deref(), Some(v2.as_str()));
    assert_eq!(
        w.status.phase,
        Phase::Progressing,
        "judged after the switch"
    );
    if let Some(v) = verdict_after {
        let mut answered = false;
        for _ in 0..20 {
            w.advance(500);
            let due = w.last.as_ref().is_some_and(|o| {
                o.actions.iter().any(
                    |a| matches!(a, Action::Measure { gate, due: true, .. } if gate == "errors"),
                )
            });
            if due {
                w.answer_measurements(v);
                answered = true;
                break;
            }
        }
        assert!(answered, "the new stable is measured after the switch");
        w.tick();
        w.tick();
    }
    w
}

#[test]
fn a_blue_green_failing_after_the_switch_switches_back_to_the_warm_stack() {
    let w = post_promotion_switched(Some(Verdict::Fail));
    let v1 = w.name_of("v1");
    assert_eq!(
        w.status.stable.as_deref(),
        Some(v1.as_str()),
        "{}",
        w.status.message
    );
    assert_eq!(w.weight("v1"), 100);
    assert_eq!(w.weight("v2"), 0);
    assert_eq!(w.status.phase, Phase::Degraded);
    assert!(
        w.status
            .message
            .contains("after the switch: gate errors failed")
            && w.status.message.contains("switched back to"),
        "{}",
        w.status.message
    );
    assert_eq!(w.status.post_promotion, None);
}

#[test]
fn a_blue_green_passing_its_post_promotion_analysis_stays_and_settles() {
    let mut w = post_promotion_switched(Some(Verdict::Pass));
    let v2 = w.name_of("v2");
    assert!(w.status.post_promotion.is_some());
    w.advance(31_000);
    w.tick();
    assert_eq!(w.status.post_promotion, None);
    assert_eq!(w.status.stable.as_deref(), Some(v2.as_str()));
    assert_eq!(w.status.phase, Phase::Healthy, "{}", w.status.message);
    assert!(!measured(&w, "errors"), "no more measurements");
}

#[test]
fn a_canary_undone_while_the_previous_revision_is_warm_switches_without_steps() {
    let retained = CANARY.replace("      steps:\n", "      retainPrevious: 1h\n      steps:\n");
    for (yaml, warm) in [(retained.as_str(), true), (CANARY, false)] {
        let mut w = World::new(spec(yaml));
        w.tick();
        w.tick();
        w.spec = with_version(&w.spec, "v2");
        w.tick();
        w.tick();
        w.command(Command::PromoteFull).expect("promote");
        for _ in 0..5 {
            w.advance(100);
        }
        assert_eq!(w.weight("v2"), 100, "{}", w.status.message);
        let v1 = w.name_of("v1");
        assert_eq!(
            w.status.desired.contains_key(&v1),
            warm,
            "v1 kept warm only with retainPrevious"
        );
        // Back to v1 (what `baton undo` applies).
        w.spec = with_version(&w.spec, "v1");
        w.tick();
        w.tick();
        if warm {
            assert_eq!(w.weight("v1"), 100, "{}", w.status.message);
            w.tick();
            assert_eq!(w.status.stable.as_deref(), Some(v1.as_str()));
            assert_eq!(w.status.phase, Phase::Healthy, "{}", w.status.message);
        } else {
            assert_eq!(
                w.weight("v1"),
                10,
                "through the steps: {}",
                w.status.message
            );
        }
    }
}

/// Every deploy added a revision to the status, for ever: the status (persisted every
/// cycle, and on a cluster an object with a size limit) grew with each one. Old ones
/// past `revisionHistoryLimit` are forgotten; those in use and `undo`'s are kept.
#[test]
fn old_revisions_past_the_history_limit_are_forgotten() {
    let mut w = started(CANARY);
    w.spec.spec.revision_history_limit = 2;
    for v in 2..=12 {
        w.spec = with_version(&w.spec, &format!("v{v}"));
        w.tick();
        w.command(Command::PromoteFull).expect("full");
        w.tick();
        w.tick();
        assert_eq!(w.status.phase, Phase::Healthy, "v{v}: {}", w.status.message);
    }
    let versions: Vec<_> = w
        .status
        .revisions
        .iter()
        .filter_map(|r| r.run.app_version().map(str::to_string))
        .collect();
    // v12 serves; v11 is undo's; v9 and v10 are the two newest others.
    assert_eq!(versions, ["v9", "v10", "v11", "v12"]);
    assert!(
        w.status
            .stable_history
            .iter()
            .all(|r| w.status.revision(r).is_some()),
        "the history names only revisions still known"
    );
    assert_eq!(
        undo_target(&w.status).and_then(|r| r.run.app_version()),
        Some("v11")
    );
    // Numbers go on from the highest ever given, not from what is left.
    assert_eq!(
        w.status.revision(&w.name_of("v12")).map(|r| r.number),
        Some(12)
    );
    // A broken version stays known while the spec asks for it, after its rollback.
    w.spec = with_version(&w.spec, "v13");
    w.tick();
    w.command(Command::Abort).expect("abort");
    for _ in 0..3 {
        w.tick();
    }
    assert!(
        w.status
            .revision(&w.name_of("v13"))
            .is_some_and(|r| r.aborted_at.is_some())
    );
    assert_eq!(w.weight("v12"), 100);
}

//! The step function and the three strategies.

use std::collections::BTreeMap;

use baton_spec::validate::MAX_HISTORY;
use baton_spec::{BlueGreen, Rolling, Rollout, Step, StrategyRef};

use crate::{
    Action, Cause, Command, CommandResult, Event, EventKind, GateStatus, Millis, Observations,
    Output, Phase, Revision, SmokeState, Status, Verdict,
};

/// A smoke run with no answer after this long is asked for again (the controller may
/// have restarted while it ran).
const SMOKE_RETRY_MS: Millis = 60_000;

struct Ctx<'a> {
    spec: &'a Rollout,
    obs: &'a Observations,
    now: Millis,
    s: Status,
    actions: Vec<Action>,
}

impl Ctx<'_> {
    fn event(&mut self, kind: EventKind, message: String) {
        self.actions.push(Action::Event(Event { kind, message }));
    }

    fn acked(&self) -> bool {
        self.obs.router_acked >= self.s.route_version
    }

    fn replicas(&self) -> u32 {
        self.spec.spec.replicas
    }

    /// Starts (or restarts) the rollout of the canary from its first step.
    fn restart_steps(&mut self) {
        self.s.step_index = 0;
        self.s.step_started_at = self.now;
        self.s.canary_weight = 0;
        self.s.aborted = false;
        self.s.failed_paused = false;
        self.s.promote_full = false;
        self.s.promote_once = false;
        self.s.held_since = None;
        self.s.smoke = SmokeState::NotRun;
        self.s.gates.clear();
        self.s.analysis_epoch += 1;
        self.s.pre_traffic_done = false;
        self.s.post_promotion = None;
        self.s.last_progress_at = self.now;
        self.s.last_canary_available = 0;
    }

    fn abort(&mut self, cause: Cause, reason: String) {
        let Some(c) = self.s.canary.clone() else {
            return;
        };
        if self.s.aborted {
            return;
        }
        self.s.aborted = true;
        self.s.failed_paused = false;
        self.s.held_since = None;
        self.s.canary_weight = 0;
        self.s.promote_full = false;
        self.s.message = reason.clone();
        let now = self.now;
        if let Some(r) = self.s.revision_mut(&c) {
            r.aborted_at = Some(now);
            r.abort_reason = Some(reason.clone());
        }
        let label = self.s.label(&c);
        self.event(
            EventKind::Aborted(cause),
            format!("{label} aborted: {reason}; all traffic back to stable"),
        );
    }

    /// A failure that the spec says rolls back, or pauses for a human.
    fn fail(&mut self, cause: Cause, reason: String) {
        if self.spec.spec.rollback.on_failure {
            self.abort(cause, reason);
        } else {
            self.pause_on_failure(cause, reason);
        }
    }

    fn pause_on_failure(&mut self, cause: Cause, reason: String) {
        if !self.s.failed_paused {
            self.s.failed_paused = true;
            self.s.message = format!("{reason} (paused; promote to go on, abort to roll back)");
            self.event(EventKind::FailedPaused(cause), self.s.message.clone());
        }
    }

    fn advance_step(&mut self, steps: &[Step]) {
        let done = steps
            .get(self.s.step_index)
            .map(describe)
            .unwrap_or_default();
        self.s.step_index += 1;
        self.s.step_started_at = self.now;
        self.s.last_progress_at = self.now;
        for g in self.s.gates.values_mut() {
            g.passes = 0;
        }
        let msg = match steps.get(self.s.step_index) {
            Some(next) => format!(
                "step {}/{} ({done}) done; next: {}",
                self.s.step_index,
                steps.len(),
                describe(next)
            ),
            None => format!(
                "step {}/{} ({done}) done; promoting to 100 %",
                self.s.step_index,
                steps.len()
            ),
        };
        self.event(EventKind::StepCompleted, msg);
    }

    /// A blue-green switch judged bad after the fact: the previous stack, still warm,
    /// becomes stable again and the new one is the aborted canary it was.
    fn switch_back(&mut self, reason: String) {
        let Some(pp) = self.s.post_promotion.take() else {
            return;
        };
        if self.s.stable.as_ref() != Some(&pp.revision) || self.s.canary.is_some() {
            return;
        }
        self.s.stable = Some(pp.previous.clone());
        if self.s.stable_history.last() == Some(&pp.revision) {
            self.s.stable_history.pop();
        }
        if let Some(r) = self.s.revision_mut(&pp.revision) {
            r.promoted_at = None;
        }
        self.s.retain_until.remove(&pp.previous);
        self.s.canary = Some(pp.revision.clone());
        self.s.canary_weight = 0;
        let label = self.s.label(&pp.previous);
        self.abort(
            Cause::Gate,
            format!("after the switch: {reason}; switched back to {label}"),
        );
    }

    /// The canary reached 100 % and the router confirmed it: it becomes stable.
    fn promote_canary(&mut self) {
        let Some(c) = self.s.canary.take() else {
            return;
        };
        let old = self.s.stable.replace(c.clone());
        self.s.stable_history.push(c.clone());
        let now = self.now;
        if let Some(r) = self.s.revision_mut(&c) {
            r.promoted_at = Some(now);
        }
        // Only the stack just replaced is kept warm: an undo goes back to it, never
        // further. Kept longer, every promotion within `retainPrevious` (an hour by
        // default for blue-green) added a full stack: the soak found 15 instances of a
        // 3-replica rollout.
        self.s.retain_until.clear();
        if let (Some(old), StrategyRef::Canary(cs)) = (&old, self.spec.spec.strategy.kind())
            && let Some(d) = cs.retain_previous
        {
            self.s
                .retain_until
                .insert(old.clone(), now.saturating_add(d.as_millis()));
        }
        if let (Some(old), StrategyRef::BlueGreen(bg)) = (&old, self.spec.spec.strategy.kind()) {
            self.s.retain_until.insert(
                old.clone(),
                now.saturating_add(bg.retain_previous.as_millis()),
            );
            if let Some(d) = bg.post_promotion_analysis {
                // Judged afresh after the switch: new windows, no failures carried over.
                self.s.gates.clear();
                self.s.analysis_epoch += 1;
                self.s.post_promotion = Some(crate::PostPromotion {
                    revision: c.clone(),
                    previous: old.clone(),
                    until: now.saturating_add(d.as_millis()),
                });
            }
        }
        self.s.promote_full = false;
        self.s.promote_once = false;
        self.s.preview = None;
        let label = self.s.label(&c);
        self.event(
            EventKind::Promoted,
            format!("{label} is now stable with 100 % of traffic"),
        );
    }
}

pub fn step(spec: &Rollout, prev: &Status, obs: &Observations, now: Millis) -> Output {
    let mut cx = Ctx {
        spec,
        obs,
        now,
        s: prev.clone(),
        actions: Vec::new(),
    };
    select_target(&mut cx);
    let command_results = obs.commands.iter().map(|c| command(&mut cx, *c)).collect();
    record_measurements(&mut cx);
    record_smoke(&mut cx);
    progress_deadline(&mut cx);

    let strategy = spec.spec.strategy.kind();
    // Held by a person: gates are still measured (and may still abort), no step moves.
    if cx.s.canary.is_some() && cx.s.held_since.is_none() {
        match strategy {
            StrategyRef::Canary(c) => canary(&mut cx, &c.steps),
            StrategyRef::BlueGreen(bg) => blue_green(&mut cx, bg),
            StrategyRef::Rolling(_) => {}
        }
    }
    let rolling = match strategy {
        StrategyRef::Rolling(r) => Some(r),
        _ => None,
    };
    restart_progress(&mut cx);
    compute_desired(&mut cx, rolling);
    compute_routes(&mut cx, rolling);
    if rolling.is_some() {
        rolling_finish(&mut cx);
    }
    finish_promotion(&mut cx);
    forget_old_revisions(&mut cx);
    schedule_measurements(&mut cx);
    compute_phase(&mut cx);
    Output {
        status: cx.s,
        actions: cx.actions,
        command_results,
    }
}

/// Works out which revision the spec asks for and whether it is new.
fn select_target(cx: &mut Ctx) {
    let run = &cx.spec.spec.run;
    let hash = run.revision_hash();
    if cx.s.revision(&hash).is_none() {
        let number = cx.s.revisions.iter().map(|r| r.number).max().unwrap_or(0) + 1;
        cx.s.revisions.push(Revision {
            name: hash.clone(),
            number,
            run: run.clone(),
            created_at: cx.now,
            promoted_at: None,
            aborted_at: None,
            abort_reason: None,
        });
    }
    let label = cx.s.label(&hash);
    match (&cx.s.stable, &cx.s.canary) {
        (None, _) => {
            cx.s.stable = Some(hash.clone());
            cx.s.stable_history.push(hash.clone());
            cx.s.last_progress_at = cx.now;
            cx.s.message = format!("starting {label}");
            cx.event(
                EventKind::FirstRevision,
                format!("first revision {label}: starting it"),
            );
        }
        (Some(stable), canary) if *stable == hash => {
            if let Some(c) = canary.clone() {
                let cl = cx.s.label(&c);
                cx.s.canary = None;
                cx.s.aborted = false;
                cx.s.failed_paused = false;
                cx.s.message = format!("spec is back on stable {label}; {cl} abandoned");
                cx.event(EventKind::Abandoned, cx.s.message.clone());
            }
        }
        (Some(_), canary) if canary.as_deref() != Some(hash.as_str()) => {
            if let Some(c) = canary.clone() {
                let cl = cx.s.label(&c);
                cx.event(EventKind::Superseded, format!("{cl} superseded by {label}"));
            }
            cx.s.canary = Some(hash.clone());
            cx.restart_steps();
            cx.s.message = format!("rolling out {label}");
            // Back to a canary's previous stable while it is kept warm: it served
            // everyone minutes ago, so no steps — a switch to its running instances.
            let warm = matches!(cx.spec.spec.strategy.kind(), StrategyRef::Canary(_))
                && cx.s.retain_until.get(&hash).is_some_and(|t| cx.now < *t);
            if warm {
                cx.s.promote_full = true;
                cx.event(
                    EventKind::NewRevision,
                    format!(
                        "back to {label}, kept warm since its replacement: switching without steps"
                    ),
                );
            } else {
                cx.event(EventKind::NewRevision, format!("rolling out {label}"));
            }
        }
        _ => {}
    }
}

fn command(cx: &mut Ctx, c: Command) -> CommandResult {
    if c == Command::Restart {
        return restart(cx);
    }
    let Some(canary) = cx.s.canary.clone() else {
        return Err(format!(
            "nothing to {}: no rollout in progress (stable is {})",
            c.as_str(),
            cx.s.stable
                .as_deref()
                .map(|s| cx.s.label(s))
                .unwrap_or_default()
        ));
    };
    let label = cx.s.label(&canary);
    match c {
        Command::Abort if cx.s.aborted => Err(format!("{label} is already aborted")),
        Command::Abort => {
            cx.abort(Cause::User, "aborted by user".into());
            Ok(format!(
                "{label} aborted; traffic is to return to stable (status shows what the router serves)"
            ))
        }
        Command::Retry if !cx.s.aborted => Err(format!("{label} is not aborted; nothing to retry")),
        Command::Retry => {
            cx.restart_steps();
            cx.s.message = format!("retrying {label}");
            cx.event(
                EventKind::Retry,
                format!("retrying {label} from the first step"),
            );
            Ok(format!("retrying {label} from the first step"))
        }
        Command::Promote | Command::PromoteFull if cx.s.aborted => Err(format!(
            "{label} was aborted; use retry to roll it out again"
        )),
        Command::Promote => {
            if let StrategyRef::Canary(cs) = cx.spec.spec.strategy.kind()
                && let Some(Step::SetWeight(w)) = cs.steps.get(cx.s.step_index)
                && !cx.s.failed_paused
            {
                return Err(format!(
                    "{label} is at step {} (setWeight {w}), which completes by itself once the router confirms the weight; promote --full skips every step",
                    cx.s.step_index + 1
                ));
            }
            if cx.s.failed_paused {
                cx.s.failed_paused = false;
                for g in cx.s.gates.values_mut() {
                    g.failures = 0;
                }
            }
            cx.s.promote_once = true;
            cx.event(
                EventKind::Promote,
                format!("{label}: promoted past the current step by user"),
            );
            Ok(format!("{label}: going past the current step"))
        }
        Command::Pause if cx.s.aborted => Err(format!("{label} is aborted: nothing to hold")),
        Command::Pause if cx.s.held_since.is_some() => Err(format!("{label} is already paused")),
        Command::Pause if matches!(cx.spec.spec.strategy.kind(), StrategyRef::Rolling(_)) => {
            Err(format!(
                "{label} is a rolling update, which cannot be held half-way; abort returns it to stable"
            ))
        }
        Command::Pause => {
            cx.s.held_since = Some(cx.now);
            let at = cx.s.step_index + 1;
            cx.event(
                EventKind::Hold,
                format!("{label}: paused at step {at} by user"),
            );
            Ok(format!(
                "{label}: paused at step {at}; traffic stays as it is until resume"
            ))
        }
        // Handled before a canary is required (above).
        Command::Restart => restart(cx),
        Command::Resume => {
            let Some(since) = cx.s.held_since.take() else {
                return Err(format!("{label} is not paused; nothing to resume"));
            };
            // What was left of a timed pause is still left; the deadline starts afresh.
            cx.s.step_started_at =
                cx.s.step_started_at
                    .saturating_add(cx.now.saturating_sub(since));
            cx.s.last_progress_at = cx.now;
            cx.event(EventKind::Resume, format!("{label}: resumed by user"));
            Ok(format!(
                "{label}: going on from step {}",
                cx.s.step_index + 1
            ))
        }
        Command::PromoteFull => {
            cx.s.failed_paused = false;
            cx.s.promote_full = true;
            cx.event(
                EventKind::PromoteFull,
                format!("{label}: full promotion requested by user"),
            );
            Ok(format!(
                "{label}: promoting fully, skipping remaining steps"
            ))
        }
    }
}

/// The revision gates judge: the canary, or after a blue-green switch the new stable
/// while its post-promotion analysis runs.
fn judged(cx: &Ctx) -> Option<String> {
    if let Some(c) = &cx.s.canary {
        return Some(c.clone());
    }
    cx.s.post_promotion
        .as_ref()
        .filter(|pp| cx.now < pp.until && cx.s.stable.as_ref() == Some(&pp.revision))
        .map(|pp| pp.revision.clone())
}

fn record_measurements(cx: &mut Ctx) {
    let Some(canary) = judged(cx) else {
        return;
    };
    if cx.s.aborted && cx.s.canary.is_some() {
        return;
    }
    let after_switch = cx.s.canary.is_none();
    // (reason, pause instead of roll back)
    let mut failed: Option<(String, bool)> = None;
    let global_pause = !cx.spec.spec.rollback.on_failure;
    for m in &cx.obs.measurements {
        if m.revision != canary {
            continue;
        }
        let Some(gate) = cx
            .spec
            .spec
            .analysis
            .gates
            .iter()
            .find(|g| g.name == m.gate)
        else {
            continue;
        };
        let g = cx.s.gates.entry(m.gate.clone()).or_default();
        // `for`: a failure counts once the gate has failed that long without a pass.
        let mut m = m.clone();
        if let Some(hold) = gate.for_duration {
            match m.verdict {
                Verdict::Fail => {
                    let since = *g.failing_since.get_or_insert(m.at);
                    let held = m.at.saturating_sub(since);
                    if held < hold.as_millis() {
                        m.verdict = Verdict::Inconclusive;
                        m.detail = format!(
                            "{}; failing for {:.1}s of the {} `for` asks",
                            m.detail,
                            held as f64 / 1000.0,
                            hold
                        );
                    }
                }
                Verdict::Pass => g.failing_since = None,
                Verdict::Inconclusive | Verdict::Error => {}
            }
        }
        let m = &m;
        match m.verdict {
            Verdict::Pass => {
                g.passes += 1;
                g.consecutive_errors = 0;
                if !gate.dry_run {
                    cx.s.last_progress_at = cx.now;
                }
            }
            Verdict::Fail => {
                g.failures += 1;
                g.consecutive_errors = 0;
            }
            Verdict::Inconclusive => {
                g.inconclusive += 1;
                g.consecutive_errors = 0;
            }
            Verdict::Error => g.consecutive_errors += 1,
        }
        g.last = Some(m.clone());
        if gate.dry_run || failed.is_some() {
            continue;
        }
        let pause = gate
            .on_failure
            .map_or(global_pause, |o| o == baton_spec::OnFailure::Pause);
        let before_traffic = if cx.spec.spec.analysis.pre_traffic.contains(&m.gate) {
            "before traffic: "
        } else {
            ""
        };
        if m.verdict == Verdict::Fail && g.failures > gate.failure_limit {
            failed = Some((
                format!(
                    "{before_traffic}gate {} failed {} time(s) (limit {}): {}",
                    m.gate, g.failures, gate.failure_limit, m.detail
                ),
                pause,
            ));
        } else if m.verdict == Verdict::Error && g.consecutive_errors > gate.consecutive_error_limit
        {
            failed = Some((
                format!(
                    "gate {} could not be measured {} times in a row (limit {}): {}",
                    m.gate, g.consecutive_errors, gate.consecutive_error_limit, m.detail
                ),
                pause,
            ));
        } else if m.verdict == Verdict::Inconclusive
            && gate.inconclusive_limit.is_some_and(|l| g.inconclusive > l)
        {
            // Not knowing is not failing: a human decides.
            failed = Some((
                format!(
                    "gate {} was inconclusive {} times (limit {}): {}",
                    m.gate,
                    g.inconclusive,
                    gate.inconclusive_limit.unwrap_or(0),
                    m.detail
                ),
                true,
            ));
        }
    }
    match failed {
        // After the switch the previous stack is still warm: back to it, whatever
        // onFailure says (a pause would leave users on the failing stack).
        Some((reason, _)) if after_switch => cx.switch_back(reason),
        Some((reason, true)) => cx.pause_on_failure(Cause::Gate, reason),
        Some((reason, false)) => cx.abort(Cause::Gate, reason),
        None => {}
    }
}

fn record_smoke(cx: &mut Ctx) {
    let Some((rev, passed, detail)) = &cx.obs.smoke else {
        return;
    };
    if cx.s.canary.as_ref() != Some(rev) || cx.s.aborted {
        return;
    }
    if *passed {
        cx.s.smoke = SmokeState::Passed;
        cx.s.last_progress_at = cx.now;
        cx.event(
            EventKind::SmokePassed,
            format!("smoke tests passed on {}", cx.s.label(rev)),
        );
    } else {
        cx.s.smoke = SmokeState::Failed;
        cx.fail(Cause::Smoke, format!("smoke tests failed: {detail}"));
    }
}

/// Whether the canary may get traffic: every gate of `analysis.preTraffic` passed once
/// (recorded, since an analysis step's passes are counted afresh at each step).
fn pre_traffic_ready(cx: &mut Ctx) -> bool {
    let names = &cx.spec.spec.analysis.pre_traffic;
    if names.is_empty() || cx.s.pre_traffic_done {
        return true;
    }
    let passed = names
        .iter()
        .all(|n| cx.s.gates.get(n).is_some_and(|g| g.passes >= 1));
    if passed {
        cx.s.pre_traffic_done = true;
        let label =
            cx.s.canary
                .as_ref()
                .map(|c| cx.s.label(c))
                .unwrap_or_default();
        cx.event(
            EventKind::StepCompleted,
            format!(
                "pre-traffic gates passed ({}): {label} may get traffic",
                names.join(", ")
            ),
        );
    }
    passed
}

fn canary(cx: &mut Ctx, steps: &[Step]) {
    if cx.s.aborted {
        cx.s.canary_weight = 0;
        return;
    }
    let Some(c) = cx.s.canary.clone() else {
        return;
    };
    if !pre_traffic_ready(cx) {
        cx.s.canary_weight = 0;
        return;
    }
    let avail = cx.obs.rev(&c).available;
    let fully_available = avail >= cx.replicas();
    // Several steps may complete in one call (a pause that already elapsed, a weight
    // the router already confirmed); the bound keeps a bad spec from looping.
    for _ in 0..=steps.len() {
        if cx.s.failed_paused {
            return;
        }
        if cx.s.promote_full || cx.s.step_index >= steps.len() {
            cx.s.canary_weight = 100;
            return;
        }
        let done = match &steps[cx.s.step_index] {
            Step::SetWeight(w) => {
                cx.s.canary_weight = *w;
                // Done only when the router runs the table with exactly this weight.
                (*w == 0 || fully_available) && cx.acked() && cx.s.weight(&c) == *w
            }
            Step::Pause(p) => {
                if cx.s.promote_once {
                    cx.s.promote_once = false;
                    true
                } else {
                    p.duration.is_some_and(|d| {
                        cx.now >= cx.s.step_started_at.saturating_add(d.as_millis())
                    })
                }
            }
            Step::Analysis(a) => {
                if cx.s.promote_once {
                    cx.s.promote_once = false;
                    true
                } else {
                    a.gates.iter().all(|name| {
                        let gate = cx.spec.spec.analysis.gates.iter().find(|g| &g.name == name);
                        // A dry-run gate is measured and recorded but never holds a step.
                        gate.is_some_and(|g| g.dry_run)
                            || cx
                                .s
                                .gates
                                .get(name)
                                .is_some_and(|g| g.passes >= gate.map_or(1, |g| g.count))
                    })
                }
            }
        };
        if !done {
            return;
        }
        cx.advance_step(steps);
    }
}

fn blue_green(cx: &mut Ctx, bg: &BlueGreen) {
    if cx.s.aborted {
        return;
    }
    let Some(c) = cx.s.canary.clone() else {
        return;
    };
    if cx.s.promote_full {
        return;
    }
    if cx.obs.rev(&c).available < cx.replicas() || !pre_traffic_ready(cx) {
        return;
    }
    let smoke_ok = match cx.s.smoke {
        _ if bg.smoke.is_empty() => true,
        SmokeState::Passed => true,
        SmokeState::Failed => false,
        SmokeState::Running { since } => {
            if cx.now >= since.saturating_add(SMOKE_RETRY_MS) {
                cx.s.smoke = SmokeState::Running { since: cx.now };
                cx.actions.push(Action::RunSmoke {
                    revision: c.clone(),
                });
            }
            false
        }
        SmokeState::NotRun => {
            // Smoke tests go through the preview listener when there is one, so wait
            // for the router to serve the preview first.
            if cx.s.preview.as_ref() == Some(&c) && cx.acked() || bg.preview_listen.is_none() {
                cx.s.smoke = SmokeState::Running { since: cx.now };
                cx.actions.push(Action::RunSmoke {
                    revision: c.clone(),
                });
                cx.event(
                    EventKind::SmokeStarted,
                    format!("running smoke tests on {}", cx.s.label(&c)),
                );
            }
            false
        }
    };
    if !smoke_ok || cx.s.failed_paused {
        return;
    }
    if bg.auto_promote || cx.s.promote_once {
        cx.s.promote_once = false;
        cx.s.promote_full = true;
        cx.event(
            EventKind::Switch,
            format!("switching all traffic to {}", cx.s.label(&c)),
        );
    }
}

/// `restart`: the stable revision's instances are replaced while nothing else rolls out.
fn restart(cx: &mut Ctx) -> CommandResult {
    let Some(stable) = cx.s.stable.clone() else {
        return Err("nothing to restart: no revision is stable yet".into());
    };
    let label = cx.s.label(&stable);
    if let Some(c) = cx.s.canary.clone().filter(|_| !cx.s.aborted) {
        return Err(format!(
            "{} is rolling out: restart once it is done, or abort it first",
            cx.s.label(&c)
        ));
    }
    if cx.s.restart_at.is_some() {
        return Err(format!("{label} is already restarting"));
    }
    if cx.replicas() == 0 {
        return Err(format!(
            "{label} runs no instance (replicas: 0): nothing to restart"
        ));
    }
    cx.s.restart_at = Some(cx.now);
    cx.s.restart_left = None;
    cx.s.last_progress_at = cx.now;
    cx.event(
        EventKind::Restart,
        format!(
            "{label}: restart requested by user: its instances are replaced one at a time, each new one ready before an old one stops"
        ),
    );
    Ok(format!(
        "restarting {label}: one instance at a time, each new one ready before an old one stops"
    ))
}

/// A restart ends once no instance of stable predates it and enough are available;
/// a new revision rolling out replaces every instance anyway, so it ends one too.
fn restart_progress(cx: &mut Ctx) {
    let Some(at) = cx.s.restart_at else {
        return;
    };
    // Asked for in this very step: what was observed predates it.
    if at == cx.now {
        return;
    }
    let Some(stable) = cx.s.stable.clone() else {
        cx.s.restart_at = None;
        cx.s.restart_left = None;
        return;
    };
    let label = cx.s.label(&stable);
    if cx.s.canary.is_some() && !cx.s.aborted {
        cx.s.restart_at = None;
        cx.s.restart_left = None;
        cx.event(
            EventKind::Restarted,
            format!(
                "restart of {label} given up: a new revision rolls out and replaces its instances"
            ),
        );
        return;
    }
    let o = cx.obs.rev(&stable);
    if cx.s.restart_left != Some(o.stale) {
        cx.s.restart_left = Some(o.stale);
        cx.s.last_progress_at = cx.now;
    }
    // A replacement that never gets ready (an image that no longer starts) would hold
    // the surge forever: without progress for the deadline, the restart is given up.
    let deadline = cx.spec.spec.progress_deadline_seconds.saturating_mul(1000);
    if cx.now >= cx.s.last_progress_at.saturating_add(deadline) {
        cx.s.restart_at = None;
        cx.s.restart_left = None;
        cx.event(
            EventKind::Restarted,
            format!(
                "restart of {label} given up: no instance replaced for {} s (progressDeadlineSeconds); {} still predate it",
                deadline / 1000,
                o.stale
            ),
        );
        return;
    }
    if o.stale == 0 && o.available >= cx.replicas() {
        cx.s.restart_at = None;
        cx.s.restart_left = None;
        cx.event(
            EventKind::Restarted,
            format!(
                "{label} restarted: every instance replaced in {:.1} s",
                cx.now.saturating_sub(at) as f64 / 1000.0
            ),
        );
    }
}

/// Replicas wanted per revision. The stable revision of a canary or blue-green rollout
/// always keeps `replicas`; nothing is scaled to zero while the router may still send
/// it traffic.
fn compute_desired(cx: &mut Ctx, rolling: Option<&Rolling>) {
    let replicas = cx.replicas();
    let acked = cx.acked();
    let mut desired = BTreeMap::new();
    if let Some(st) = &cx.s.stable {
        // A restart surges by one: the replacement is ready before an old one goes.
        let surge = u32::from(cx.s.restart_at.is_some());
        desired.insert(st.clone(), replicas.saturating_add(surge));
    }
    if let Some(c) = &cx.s.canary {
        let keep = !cx.s.aborted || cx.s.weight(c) > 0 || !acked;
        if keep {
            desired.insert(c.clone(), replicas);
        }
    }
    if let (Some(r), Some(st), Some(c)) = (rolling, cx.s.stable.clone(), cx.s.canary.clone())
        && !cx.s.aborted
    {
        // Kubernetes' Deployment arithmetic: never above replicas + maxSurge instances,
        // never fewer than replicas - maxUnavailable available.
        let prev_new = cx.s.desired.get(&c).copied().unwrap_or(0);
        let prev_old = cx.s.desired.get(&st).copied().unwrap_or(replicas);
        let new_avail = cx.obs.rev(&c).available.min(prev_new);
        let new_desired = prev_new
            .max(
                replicas
                    .saturating_add(r.max_surge)
                    .saturating_sub(prev_old),
            )
            .min(replicas);
        let floor = replicas.saturating_sub(r.max_unavailable);
        let mut old_desired = prev_old.min(floor.saturating_sub(new_avail));
        if old_desired == 0 && (cx.s.weight(&st) > 0 || !acked) {
            // Keep one until the router has stopped sending it traffic.
            old_desired = 1;
        }
        desired.insert(c, new_desired);
        desired.insert(st, old_desired);
    }
    // Other revisions (a previous stable, a superseded canary) go once traffic has left
    // them, unless a blue-green retention keeps them warm.
    for (rev, n) in &cx.s.desired {
        if desired.contains_key(rev) {
            continue;
        }
        let retained = cx.s.retain_until.get(rev).is_some_and(|t| cx.now < *t);
        if retained || cx.s.weight(rev) > 0 || cx.s.preview.as_ref() == Some(rev) || !acked {
            desired.insert(rev.clone(), *n);
        }
    }
    cx.s.retain_until.retain(|_, t| cx.now < *t);
    cx.s.desired = desired;
}

/// The routing table, from the split the strategy asks for, restricted to revisions
/// that have ready instances.
fn compute_routes(cx: &mut Ctx, rolling: Option<&Rolling>) {
    let stable = match &cx.s.stable {
        Some(s) => s.clone(),
        None => return,
    };
    let mut split: BTreeMap<String, u64> = BTreeMap::new();
    let canary = cx.s.canary.clone().filter(|_| !cx.s.aborted);
    match (&canary, rolling) {
        (None, _) => {
            split.insert(stable.clone(), 100);
        }
        (Some(c), Some(_)) => {
            // Rolling: traffic follows available instances.
            let new = u64::from(
                cx.obs
                    .rev(c)
                    .available
                    .min(cx.s.desired.get(c).copied().unwrap_or(0)),
            );
            let old = u64::from(
                cx.obs
                    .rev(&stable)
                    .available
                    .min(cx.s.desired.get(&stable).copied().unwrap_or(0)),
            );
            let old = if cx.s.desired.get(&stable).copied().unwrap_or(0) <= 1
                && cx.s.desired.get(c).copied().unwrap_or(0) >= cx.replicas()
                && new >= u64::from(cx.replicas())
            {
                0
            } else {
                old
            };
            split.insert(stable.clone(), old);
            split.insert(c.clone(), new);
        }
        (Some(c), None) => {
            // The canary (or green) gets weight only once it is available, not merely
            // ready: a fresh instance must prove it stays up for minReadySeconds.
            let w = if cx.s.promote_full {
                100
            } else {
                cx.s.canary_weight.min(100)
            };
            let w = if cx.obs.rev(c).available > 0 { w } else { 0 };
            split.insert(stable.clone(), u64::from(100 - w));
            split.insert(c.clone(), u64::from(w));
        }
    }
    let weights = normalise(&split, &stable, |r| cx.obs.rev(r).ready > 0);
    // The preview is traffic too: not before the pre-traffic gates passed.
    let pre_ok = cx.spec.spec.analysis.pre_traffic.is_empty() || cx.s.pre_traffic_done;
    let preview = match &canary {
        Some(c) if matches!(cx.spec.spec.strategy.kind(), StrategyRef::BlueGreen(_)) => {
            Some(c.clone()).filter(|c| cx.obs.rev(c).ready > 0 && pre_ok)
        }
        _ => None,
    };
    if weights != cx.s.weights || preview != cx.s.preview {
        cx.s.weights = weights;
        cx.s.preview = preview;
        cx.s.route_version += 1;
    }
}

/// Drops revisions with no ready instance, rescales the rest to sum to exactly 100
/// (largest remainder), and falls back to 100 % on stable when nothing is routable:
/// the table always sums to 100, and the proxy answers 503 if stable has no ready
/// instance either.
fn normalise(
    split: &BTreeMap<String, u64>,
    stable: &str,
    ready: impl Fn(&str) -> bool,
) -> BTreeMap<String, u32> {
    let live: Vec<(&String, u64)> = split
        .iter()
        .filter(|(r, w)| **w > 0 && ready(r))
        .map(|(r, w)| (r, *w))
        .collect();
    let total: u64 = live.iter().map(|(_, w)| w).sum();
    let mut out = BTreeMap::new();
    if total == 0 {
        // Nothing the split wants is routable: stable if it is ready, else any ready
        // revision, else stable.
        let pick = if ready(stable) {
            Some(stable.to_string())
        } else {
            split.keys().find(|r| ready(r)).cloned()
        };
        out.insert(pick.unwrap_or_else(|| stable.to_string()), 100);
        return out;
    }
    let mut given = 0u32;
    let mut rems: Vec<(u64, &String)> = Vec::new();
    for (r, w) in &live {
        let exact = w * 100;
        let floor = u32::try_from(exact / total).unwrap_or(100);
        given += floor;
        out.insert((*r).clone(), floor);
        rems.push((exact % total, r));
    }
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    for (_, r) in rems.iter().take((100 - given) as usize) {
        *out.entry((*r).clone()).or_default() += 1;
    }
    out.retain(|_, w| *w > 0);
    out
}

/// Rolling: the new revision becomes stable once it is fully available, takes all
/// traffic, and the router confirmed the old revision has none.
fn rolling_finish(cx: &mut Ctx) {
    let (Some(c), Some(st)) = (cx.s.canary.clone(), cx.s.stable.clone()) else {
        return;
    };
    if cx.s.aborted {
        return;
    }
    if cx.s.weight(&c) == 100
        && cx.acked()
        && cx.obs.rev(&c).available >= cx.replicas()
        && cx.s.weight(&st) == 0
    {
        cx.promote_canary();
        cx.s.desired.remove(&st);
    }
}

/// Canary and blue-green: the new revision becomes stable once the router confirmed it
/// takes all traffic.
fn finish_promotion(cx: &mut Ctx) {
    let Some(c) = cx.s.canary.clone() else {
        return;
    };
    if cx.s.aborted || matches!(cx.spec.spec.strategy.kind(), StrategyRef::Rolling(_)) {
        return;
    }
    let wants_all = cx.s.promote_full
        || match cx.spec.spec.strategy.kind() {
            StrategyRef::Canary(cs) => cx.s.step_index >= cs.steps.len(),
            _ => false,
        };
    if wants_all && cx.s.weight(&c) == 100 && cx.acked() {
        cx.promote_canary();
    }
}

fn schedule_measurements(cx: &mut Ctx) {
    if cx.s.canary.is_none() {
        // A post-promotion analysis ends with its window.
        if cx
            .s
            .post_promotion
            .as_ref()
            .is_some_and(|pp| cx.now >= pp.until)
        {
            let label =
                cx.s.stable
                    .as_ref()
                    .map(|s| cx.s.label(s))
                    .unwrap_or_default();
            cx.s.post_promotion = None;
            cx.event(
                EventKind::StepCompleted,
                format!("post-promotion analysis passed: {label} stays"),
            );
        }
    }
    let Some(c) = judged(cx) else {
        return;
    };
    if cx.s.canary.is_some() && (cx.s.aborted || cx.s.failed_paused) {
        return;
    }
    let pre_traffic = &cx.spec.spec.analysis.pre_traffic;
    let pre_pending = !pre_traffic.is_empty() && !cx.s.pre_traffic_done;
    // Before traffic: the pre-traffic gates, once every instance is ready (and the
    // router confirmed it routes nothing to them yet).
    if pre_pending {
        if cx.obs.rev(&c).available < cx.replicas() || cx.s.weight(&c) > 0 || !cx.acked() {
            return;
        }
        for gate in cx
            .spec
            .spec
            .analysis
            .gates
            .iter()
            .filter(|g| pre_traffic.contains(&g.name))
        {
            let g = cx.s.gates.entry(gate.name.clone()).or_default();
            if g.passes == 0 && cx.now >= g.next_due {
                g.next_due = cx.now.saturating_add(gate.interval.as_millis());
                cx.actions.push(Action::Measure {
                    gate: gate.name.clone(),
                    revision: c.clone(),
                    epoch: cx.s.analysis_epoch,
                    due: true,
                });
            }
        }
        return;
    }
    // Measure only while the judged revision takes traffic the router confirmed.
    let has_traffic = (cx.s.weight(&c) > 0 || cx.s.preview.as_ref() == Some(&c)) && cx.acked();
    if !has_traffic {
        return;
    }
    for gate in cx
        .spec
        .spec
        .analysis
        .gates
        .iter()
        .filter(|g| !pre_traffic.contains(&g.name))
    {
        let g =
            cx.s.gates
                .entry(gate.name.clone())
                .or_insert_with(|| GateStatus {
                    next_due: cx.now.saturating_add(gate.initial_delay.as_millis()),
                    ..GateStatus::default()
                });
        let due = cx.now >= g.next_due;
        if due {
            g.next_due = cx.now.saturating_add(gate.interval.as_millis());
        }
        if due || watched(gate) {
            cx.actions.push(Action::Measure {
                gate: gate.name.clone(),
                revision: c.clone(),
                epoch: cx.s.analysis_epoch,
                due,
            });
        }
    }
}

/// Gates judged as evidence arrives, on every cycle: a builtin metric under
/// `judging: continuous` (the analysis crate's sequential tests).
fn watched(gate: &baton_spec::Gate) -> bool {
    gate.judging == baton_spec::Judging::Continuous
        && gate.burn_rate.is_none()
        && matches!(gate.metric, baton_spec::MetricSource::Builtin(_))
}

fn progress_deadline(cx: &mut Ctx) {
    let Some(c) = cx.s.canary.clone() else {
        return;
    };
    let pausing = match cx.spec.spec.strategy.kind() {
        StrategyRef::Canary(cs) => matches!(cs.steps.get(cx.s.step_index), Some(Step::Pause(_))),
        _ => false,
    };
    if cx.s.aborted
        || cx.s.failed_paused
        || cx.s.held_since.is_some()
        || pausing
        || waiting_for_human(cx)
    {
        cx.s.last_progress_at = cx.now;
        return;
    }
    let avail = cx.obs.rev(&c).available;
    if avail != cx.s.last_canary_available {
        cx.s.last_canary_available = avail;
        cx.s.last_progress_at = cx.now;
    }
    // Saturating: a spec that slipped past validation must not wrap into "now".
    let deadline = cx.spec.spec.progress_deadline_seconds.saturating_mul(1000);
    if cx.now >= cx.s.last_progress_at.saturating_add(deadline) {
        cx.fail(
            Cause::Deadline,
            format!(
            "progress deadline exceeded: no progress for {}s (available instances of {}: {avail}/{})",
            cx.spec.spec.progress_deadline_seconds,
            cx.s.label(&c),
            cx.replicas()
        ),
        );
    }
}

fn waiting_for_human(cx: &Ctx) -> bool {
    match cx.spec.spec.strategy.kind() {
        StrategyRef::Canary(c) => {
            matches!(
                c.steps.get(cx.s.step_index),
                Some(Step::Pause(p)) if p.duration.is_none()
            ) && !cx.s.promote_full
        }
        StrategyRef::BlueGreen(bg) => {
            !bg.auto_promote
                && !cx.s.promote_full
                && (bg.smoke.is_empty() || cx.s.smoke == SmokeState::Passed)
                && cx
                    .s
                    .canary
                    .as_ref()
                    .is_some_and(|c| cx.obs.rev(c).available >= cx.replicas())
        }
        StrategyRef::Rolling(_) => false,
    }
}

fn compute_phase(cx: &mut Ctx) {
    let (phase, message) = match &cx.s.canary {
        Some(_) if cx.s.aborted => (Phase::Degraded, cx.s.message.clone()),
        Some(_) if cx.s.failed_paused => (Phase::Paused, cx.s.message.clone()),
        Some(c) if cx.s.held_since.is_some() => (
            Phase::Paused,
            format!(
                "{} paused by user at step {}; resume to go on",
                cx.s.label(c),
                cx.s.step_index + 1
            ),
        ),
        Some(c) if waiting_for_human(cx) => (
            Phase::Paused,
            format!(
                "{} waits for promote at step {}",
                cx.s.label(c),
                cx.s.step_index + 1
            ),
        ),
        Some(c) => (
            Phase::Progressing,
            format!(
                "rolling out {} ({} % of traffic)",
                cx.s.label(c),
                cx.s.weight(c)
            ),
        ),
        None if cx.s.restart_at.is_some() => {
            // Serving all along, but not settled: a restart is under way.
            let st = cx.s.stable.clone().unwrap_or_default();
            (
                Phase::Progressing,
                format!(
                    "restarting {}: {} instance(s) left to replace",
                    cx.s.label(&st),
                    cx.obs.rev(&st).stale
                ),
            )
        }
        None if cx.s.post_promotion.is_some() => {
            let st = cx.s.stable.clone().unwrap_or_default();
            let secs =
                cx.s.post_promotion
                    .as_ref()
                    .map_or(0, |pp| pp.until.saturating_sub(cx.now).div_ceil(1000));
            (
                Phase::Progressing,
                format!(
                    "{} serves all traffic; judged after the switch for {secs}s more (the previous stack is kept warm to switch back to)",
                    cx.s.label(&st)
                ),
            )
        }
        None => {
            let st = cx.s.stable.clone().unwrap_or_default();
            let ready = cx.obs.rev(&st).available >= cx.replicas() && cx.acked();
            if ready {
                let keep = matches!(cx.s.phase, Phase::Healthy) && !cx.s.message.is_empty();
                let msg = if keep {
                    cx.s.message.clone()
                } else {
                    format!("{} serves all traffic", cx.s.label(&st))
                };
                (Phase::Healthy, msg)
            } else {
                (
                    Phase::Progressing,
                    format!(
                        "waiting for {}: {}/{} available",
                        cx.s.label(&st),
                        cx.obs.rev(&st).available,
                        cx.replicas()
                    ),
                )
            }
        }
    };
    if phase != cx.s.phase {
        cx.event(
            EventKind::Phase,
            format!("{} → {}: {message}", cx.s.phase.as_str(), phase.as_str()),
        );
    }
    cx.s.phase = phase;
    cx.s.message = message;
}

/// A step as people read it: `setWeight 10`, `pause 30s`, `analysis errors, p99`.
pub fn describe(step: &Step) -> String {
    match step {
        Step::SetWeight(w) => format!("setWeight {w}"),
        Step::Pause(p) => match p.duration {
            Some(d) => format!("pause {d}"),
            None => "pause until promoted".into(),
        },
        Step::Analysis(a) => format!("analysis {}", a.gates.join(", ")),
    }
}

/// Keeps the revisions in use (stable, canary, preview, the spec's, any with replicas
/// or weight, retained or under post-promotion judgment), the one `undo` goes back to,
/// and the `revisionHistoryLimit` newest others; forgets the rest. Without this the
/// status grew by a revision with every deploy, and everything that reads it with it.
fn forget_old_revisions(cx: &mut Ctx) {
    let limit = cx.spec.spec.revision_history_limit as usize;
    // The common case, every cycle: nothing to forget, and no hash of the spec to take.
    if cx.s.revisions.len() <= limit {
        return;
    }
    let target = cx.spec.spec.run.revision_hash();
    let s = &cx.s;
    let undo = undo_target(s).map(|r| r.name.clone());
    let in_use = |name: &str| {
        Some(name) == s.stable.as_deref()
            || Some(name) == s.canary.as_deref()
            || Some(name) == s.preview.as_deref()
            || Some(name) == undo.as_deref()
            || name == target
            || s.desired.get(name).is_some_and(|n| *n > 0)
            || s.weights.get(name).is_some_and(|w| *w > 0)
            || s.retain_until.contains_key(name)
            || s.post_promotion
                .as_ref()
                .is_some_and(|p| p.revision == name || p.previous == name)
    };
    let mut old: Vec<(u64, String)> = s
        .revisions
        .iter()
        .filter(|r| !in_use(&r.name))
        .map(|r| (r.number, r.name.clone()))
        .collect();
    if old.len() <= limit {
        return;
    }
    old.sort_unstable();
    let forget: Vec<String> = old[..old.len() - limit]
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    cx.s.revisions.retain(|r| !forget.contains(&r.name));
    cx.s.stable_history.retain(|r| !forget.contains(r));
    // An undo back and forth repeats names: the history is only read from its end.
    let cap = 2 * MAX_HISTORY as usize;
    if cx.s.stable_history.len() > cap {
        let extra = cx.s.stable_history.len() - cap;
        cx.s.stable_history.drain(..extra);
    }
}

/// The revision `undo` goes back to: the last stable before the current one.
pub fn undo_target(s: &Status) -> Option<&Revision> {
    let current = s.stable.as_deref()?;
    s.stable_history
        .iter()
        .rev()
        .find(|r| r.as_str() != current)
        .and_then(|r| s.revision(r))
}

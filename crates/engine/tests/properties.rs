//! Invariants of the engine over random sequences of observations and commands.

mod common;

use std::collections::BTreeMap;

use baton_engine::{Command, Measurement, Observations, RevisionObs, Status, Verdict, step};
use baton_spec::{Rollout, StrategyRef};
use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Time passes.
    Wait(u64),
    /// The platform reports `ready`/`available` instances for the n-th known revision.
    Instances {
        rev: usize,
        ready: u32,
        available: u32,
    },
    /// The router confirms the latest table.
    Ack,
    /// A measurement comes back for the n-th revision.
    Measure {
        rev: usize,
        verdict: Verdict,
    },
    Smoke {
        rev: usize,
        passed: bool,
    },
    Cmd(Command),
    /// A user applies a spec with this APP_VERSION.
    Apply(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..20_000).prop_map(Op::Wait),
        4 => (0usize..4, 0u32..4, 0u32..4).prop_map(|(rev, ready, a)| Op::Instances { rev, ready, available: a.min(ready) }),
        4 => Just(Op::Ack),
        2 => (0usize..4, prop_oneof![Just(Verdict::Pass), Just(Verdict::Fail), Just(Verdict::Inconclusive), Just(Verdict::Error)])
            .prop_map(|(rev, verdict)| Op::Measure { rev, verdict }),
        1 => (0usize..4, any::<bool>()).prop_map(|(rev, passed)| Op::Smoke { rev, passed }),
        1 => prop_oneof![Just(Command::Promote), Just(Command::PromoteFull), Just(Command::Abort), Just(Command::Retry), Just(Command::Pause), Just(Command::Resume)].prop_map(Op::Cmd),
        1 => (1u8..4).prop_map(Op::Apply),
    ]
}

fn base() -> impl Strategy<Value = Rollout> {
    prop_oneof![
        Just(spec(CANARY)),
        Just(spec(BLUE_GREEN)),
        Just(spec(ROLLING))
    ]
}

fn check(
    spec: &Rollout,
    prev: &Status,
    obs: &Observations,
    out: &Status,
) -> Result<(), TestCaseError> {
    let sum: u32 = out.weights.values().sum();
    prop_assert_eq!(sum, 100, "weights must sum to 100: {:?}", out.weights);
    let ready = |r: &str| obs.revisions.get(r).is_some_and(|o| o.ready > 0);
    let stable = out
        .stable
        .clone()
        .expect("stable exists after the first step");
    let live_canary = out.canary.clone().filter(|_| !out.aborted);
    let anything_ready = ready(&stable) || live_canary.as_deref().is_some_and(ready);
    for (rev, w) in &out.weights {
        if *w > 0 && !ready(rev) {
            prop_assert!(
                !anything_ready && out.weights.get(&stable) == Some(&100),
                "{rev} has {w} % but no ready instance: {:?} with {:?}",
                out.weights,
                obs.revisions
            );
        }
    }
    if out.aborted {
        let c = out.canary.clone().expect("aborted implies a canary");
        prop_assert_eq!(out.weights.get(&c), None, "aborted canary keeps traffic");
        prop_assert_eq!(out.weights.get(&stable), Some(&100));
    }
    let rolling = matches!(spec.spec.strategy.kind(), StrategyRef::Rolling(_));
    if prev.stable.is_some() && prev.stable != out.stable {
        // Promotion: only with all traffic on the new revision, confirmed by the router.
        prop_assert_eq!(out.weights.get(&stable), Some(&100));
        prop_assert!(obs.router_acked >= out.route_version);
    }
    if !rolling && prev.stable == out.stable {
        prop_assert_eq!(
            out.desired.get(&stable).copied(),
            Some(spec.spec.replicas),
            "stable scaled below replicas before promotion"
        );
    }
    for (rev, n) in &prev.desired {
        let now = out.desired.get(rev).copied().unwrap_or(0);
        if *n > 0 && now == 0 {
            prop_assert!(
                !prev.weights.contains_key(rev) && obs.router_acked >= prev.route_version,
                "{rev} scaled to zero while the router may still send it traffic"
            );
            prop_assert!(!out.weights.contains_key(rev));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold(base in base(), ops in proptest::collection::vec(op(), 1..120)) {
        let mut spec = base;
        let mut status = Status::default();
        let mut obs = Observations::default();
        let mut now = 1_000_000u64;
        let out = step(&spec, &status, &obs, now);
        check(&spec, &status, &obs, &out.status)?;
        status = out.status;
        for op in ops {
            let names: Vec<String> = status.revisions.iter().map(|r| r.name.clone()).collect();
            let pick = |i: usize| names[i % names.len()].clone();
            match op {
                Op::Wait(ms) => now += ms,
                Op::Instances { rev, ready, available } => {
                    obs.revisions.insert(pick(rev), RevisionObs { ready, available, stale: 0 });
                }
                Op::Ack => obs.router_acked = status.route_version,
                Op::Measure { rev, verdict } => {
                    let gate = "errors".to_string();
                    obs.measurements.push(Measurement { gate, revision: pick(rev), verdict, value: Some(0.5), requests: 50, at: now, detail: String::new() });
                }
                Op::Smoke { rev, passed } => obs.smoke = Some((pick(rev), passed, "random".into())),
                Op::Cmd(c) => obs.commands.push(c),
                Op::Apply(v) => spec = with_version(&spec, &format!("v{v}")),
            }
            let out = step(&spec, &status, &obs, now);
            check(&spec, &status, &obs, &out.status)?;
            prop_assert_eq!(out.command_results.len(), obs.commands.len());
            // Stepping again with nothing new must not undo a decision.
            let again = step(&spec, &out.status, &Observations { commands: vec![], measurements: vec![], smoke: None, ..obs.clone() }, now);
            check(&spec, &out.status, &obs, &again.status)?;
            status = out.status;
            obs.commands.clear();
            obs.measurements.clear();
            obs.smoke = None;
        }
    }

    /// (Rolling is left out: in this perfect world it finishes before the abort lands.)
    /// Once a canary is aborted (by a human or a failed gate) and the world settles, all
    /// traffic is on stable and the canary has no instance.
    #[test]
    fn abort_ends_on_stable(base in prop_oneof![Just(spec(CANARY)), Just(spec(BLUE_GREEN))], ops in proptest::collection::vec(op(), 0..60), by_gate in any::<bool>()) {
        let mut w = World::new(base);
        w.tick();
        w.tick();
        for op in ops {
            match op {
                Op::Wait(ms) => { w.advance(ms); }
                Op::Cmd(c) if c != Command::Abort => { w.obs.commands.push(c); w.tick(); }
                Op::Apply(v) => { w.spec = with_version(&w.spec, &format!("v{v}")); w.tick(); }
                _ => { w.tick(); }
            }
        }
        w.spec = with_version(&w.spec, "v9");
        w.tick();
        w.tick();
        if by_gate {
            for _ in 0..3 {
                w.tick();
                w.answer_measurements(Verdict::Fail);
            }
            w.obs.commands.push(Command::Abort);
        } else {
            w.obs.commands.push(Command::Abort);
        }
        w.tick();
        w.tick();
        w.tick();
        let stable = w.status.stable.clone().expect("stable");
        prop_assert!(w.status.aborted || w.status.canary.is_none());
        prop_assert_eq!(&w.status.weights, &BTreeMap::from([(stable.clone(), 100)]));
        prop_assert_eq!(w.status.desired.get(&w.name_of("v9")), None);
        prop_assert_ne!(Some(stable), Some(w.name_of("v9")));
    }
}

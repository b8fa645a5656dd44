//! Measuring gates: the one place that knows a builtin gate reads the data plane's
//! counters (judged here, at once) while every other provider does I/O that may take
//! seconds (run on a task of its own, its result handed to the next cycle).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_analysis::{Measurer, Vars};
use baton_engine::{Measurement, Millis, Verdict};
use baton_spec::{Gate, MetricSource};

use crate::{Counters, DataPlane, Target};

/// Builtin windows and finished external measurements, kept across cycles.
#[derive(Default, Clone)]
pub struct Gauges {
    measurer: Arc<Mutex<Measurer>>,
    inbox: Arc<Mutex<HashMap<String, Vec<Measurement>>>>,
    /// `(rollout, gate)` of external measurements still running: one at a time per
    /// gate, so a provider slower than its interval (a command gate's Job waiting for a
    /// node) is not started again and again beside itself.
    running: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
}

/// Reads of the data plane's counters within one cycle: one read serves every gate.
#[derive(Default)]
pub(crate) struct CounterCache(Option<Counters>);

impl Gauges {
    /// Forgets the analysis state of the rollout's revisions that are gone.
    pub fn retain(&self, key: &str, live: &dyn Fn(&str) -> bool) {
        self.measurer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(key, live);
    }

    /// Measurements finished since the rollout's last cycle.
    pub fn take(&self, key: &str) -> Vec<Measurement> {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .unwrap_or_default()
    }

    /// Hands a finished measurement to the rollout's next cycle.
    pub fn push(&self, key: &str, m: Measurement) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .push(m);
    }

    /// One measurement of `gate` on `revision`: builtin gates now, the others on a task.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn measure<P: DataPlane>(
        &self,
        p: &mut P,
        cache: &mut CounterCache,
        t: &Target<'_>,
        gate: &Gate,
        revision: &str,
        epoch: u64,
        due: bool,
        stable: Option<&str>,
        now: Millis,
    ) {
        if !matches!(
            gate.metric,
            MetricSource::Builtin(_) | MetricSource::Scorecard(_)
        ) {
            let vars = Vars {
                service: t.name.to_string(),
                revision: revision.to_string(),
                stable: stable.map(str::to_string),
                address: p.address(t, revision),
            };
            let runner = match gate.metric {
                MetricSource::Command(_) => p.commands(t),
                _ => None,
            };
            let (g, key, me) = (gate.clone(), t.key.to_string(), self.clone());
            let slot = (key.clone(), g.name.clone());
            if !self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(slot.clone())
            {
                return;
            }
            tokio::spawn(async move {
                let m = match runner {
                    Some(r) => {
                        let result = r.run(g.clone(), vars.clone()).await;
                        baton_analysis::judge_sample(&g, &vars.revision, now_ms(), result)
                    }
                    None => baton_analysis::measure(&g, &vars, now_ms()).await,
                };
                me.push(&key, m);
                me.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&slot);
            });
            return;
        }
        if cache.0.is_none() {
            let revisions: Vec<&str> = std::iter::once(revision).chain(stable).collect();
            cache.0 = Some(p.counters(t, &revisions).await);
        }
        let m = match &cache.0 {
            Some(Counters::Read(revs)) => {
                let current = revs.get(revision).cloned().unwrap_or_default();
                let stable_now = stable.map(|s| revs.get(s).cloned().unwrap_or_default());
                self.measurer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .measure(
                        t.key,
                        gate,
                        revision,
                        epoch,
                        due,
                        &current,
                        stable_now.as_ref(),
                        now,
                    )
            }
            // A look between intervals tells only a failure of the canary: an error
            // reading the counters waits for the interval, as it would have.
            Some(Counters::Unsupported(_) | Counters::Failed(_)) if !due => return,
            Some(Counters::Unsupported(why) | Counters::Failed(why)) => Some(Measurement {
                gate: gate.name.clone(),
                revision: revision.to_string(),
                verdict: Verdict::Error,
                value: None,
                requests: 0,
                at: now,
                detail: why.clone(),
            }),
            Some(Counters::Unreadable) | None => return,
        };
        if let Some(m) = m {
            self.push(t.key, m);
        }
    }
}

/// External providers judge at the time their answer came (the driver reads no clock
/// of its own anywhere else).
fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

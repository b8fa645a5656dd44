//! One cycle of one rollout: observe → step → persist → act.

use std::sync::Arc;

use baton_engine::{
    Action, CommandResult, EventKind, Measurement, Millis, Observations, Phase, Verdict,
};
use baton_spec::NotificationEvent;

use crate::event::{Event, Kind};
use crate::gauges::CounterCache;
use crate::metrics::RolloutMetrics;
use crate::{Command, Gauges, Notify, Platform, Record, SaveError, Target};

/// A person's command, with who gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub actor: String,
}

/// What became of one request: `Ok(what happened)` or `Err(why it does not apply)`.
pub type Answer = CommandResult;

/// The result of one cycle.
#[derive(Debug)]
pub struct Outcome {
    /// The record as persisted (with its outbox delivered).
    pub record: Record,
    /// One answer per request, in order.
    pub answers: Vec<(Request, Answer)>,
    /// The router serves the status' table (nothing waits on it).
    pub served: bool,
}

/// The cycle, with what it keeps between cycles (measurement windows and results).
#[derive(Clone)]
pub struct Driver {
    pub gauges: Gauges,
    /// What every rollout is doing and did, for `/metrics` on both platforms.
    pub metrics: RolloutMetrics,
    notifier: Option<Arc<dyn Notify>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CycleError<E: std::error::Error + 'static> {
    #[error("the status changed since it was read; starting again from the stored one")]
    Conflict,
    #[error(transparent)]
    Platform(E),
}

impl<E: std::error::Error + 'static> From<SaveError<E>> for CycleError<E> {
    fn from(e: SaveError<E>) -> Self {
        match e {
            SaveError::Conflict => CycleError::Conflict,
            SaveError::Other(e) => CycleError::Platform(e),
        }
    }
}

impl Driver {
    pub fn new(notifier: Option<Arc<dyn Notify>>) -> Driver {
        Driver {
            gauges: Gauges::default(),
            metrics: RolloutMetrics::new(),
            notifier,
        }
    }

    /// Drops everything kept for a deleted rollout: its series and its analysis state.
    pub fn forget(&self, key: &str) {
        self.metrics.forget(key);
        self.gauges.retain(key, &|_| false);
    }

    /// One cycle. `requests` that are not engine commands (`undo`) are the caller's.
    pub async fn cycle<P: Platform>(
        &self,
        p: &mut P,
        t: &Target<'_>,
        prev: &Record,
        requests: Vec<Request>,
        now: Millis,
    ) -> Result<Outcome, CycleError<P::Error>> {
        // Observe.
        let requests: Vec<Request> = requests
            .into_iter()
            .filter(|r| r.command.engine().is_some())
            .collect();
        let measurements = self.gauges.take(t.key);
        // Until a step that used them is persisted, finished measurements stay owed to
        // the next cycle: a failed cycle must not lose a verdict.
        let keep = |ms: Vec<Measurement>| ms.into_iter().for_each(|m| self.gauges.push(t.key, m));
        let seen = async {
            let revisions = p.observe(t, &prev.status, now).await?;
            let smoke = p.take(t, &prev.status).await?;
            Ok((revisions, smoke))
        };
        let (revisions, smoke) = match seen.await {
            Ok(v) => v,
            Err(e) => {
                keep(measurements);
                return Err(CycleError::Platform(e));
            }
        };
        let obs = Observations {
            revisions,
            router_acked: p.confirmed(t),
            smoke,
            commands: requests.iter().filter_map(|r| r.command.engine()).collect(),
            measurements,
        };

        // Step.
        let out = baton_engine::step(t.spec, &prev.status, &obs, now);
        let mut record = Record {
            status: out.status,
            outbox: prev.outbox.clone(),
            events: prev.events,
        };
        let mut fresh = Vec::new();
        let mut add = |record: &mut Record, kind: Kind, actor: &str, message: String| {
            let e = new_event(record, t, kind, actor, message, now);
            fresh.push(e.clone());
            record.outbox.push(e);
        };
        for m in &obs.measurements {
            if m.verdict != Verdict::Inconclusive {
                let msg = format!("gate {}: {}", m.gate, m.detail);
                add(&mut record, Kind::Gate(m.verdict), "baton", msg);
            }
        }
        let answers: Vec<(Request, Answer)> =
            requests.into_iter().zip(out.command_results).collect();
        for (req, answer) in &answers {
            if let Ok(msg) = answer {
                let msg = format!("{}: {msg}", legacy_name(req.command));
                add(&mut record, Kind::Command(req.command), &req.actor, msg);
            }
        }
        let mut measures = Vec::new();
        let mut smokes = Vec::new();
        for action in out.actions {
            match action {
                Action::Event(e) => add(&mut record, Kind::Engine(e.kind), "baton", e.message),
                Action::Measure {
                    gate,
                    revision,
                    epoch,
                    due,
                } => measures.push((gate, revision, epoch, due)),
                Action::RunSmoke { revision } => smokes.push(revision),
            }
        }
        if prev.status.phase != Phase::Paused && record.status.phase == Phase::Paused {
            // A pause is told with the status' own words, on the phase change entering it.
            if let Some(e) = record
                .outbox
                .iter_mut()
                .rev()
                .find(|e| e.kind == Kind::Engine(EventKind::Phase))
            {
                e.notify = Some(NotificationEvent::Paused);
            }
            if let Some(e) = fresh
                .iter_mut()
                .rev()
                .find(|e| e.kind == Kind::Engine(EventKind::Phase))
            {
                e.notify = Some(NotificationEvent::Paused);
            }
        }

        // Persist, with the events this step produced, before acting on any of it.
        let changed = record != *prev;
        if let Err(e) = p.save(t, &record, changed, &fresh).await {
            keep(obs.measurements);
            return Err(e.into());
        }
        let verdicts: Vec<_> = obs
            .measurements
            .iter()
            .map(|m| (m.gate.clone(), m.revision.clone(), m.verdict))
            .collect();
        self.metrics
            .stepped(t, &record.status, &fresh, &verdicts, now);

        // Tell: everything in the outbox, then forget it (once that is written too).
        if !record.outbox.is_empty() {
            for e in &record.outbox {
                p.emit(t, e).await;
                if let (Some(n), Some(_)) = (&self.notifier, e.notify) {
                    n.notify(t, e);
                }
            }
            record.outbox.clear();
            p.save(t, &record, true, &[]).await?;
        }

        // Act.
        p.apply(t, &record.status)
            .await
            .map_err(CycleError::Platform)?;
        let served = p
            .route(t, &record.status)
            .await
            .map_err(CycleError::Platform)?;
        let confirmed = if served {
            record.status.route_version
        } else {
            p.confirmed(t)
        };
        self.metrics.routed(t, &record.status, confirmed, now);
        let mut cache = CounterCache::default();
        for (gate, revision, epoch, due) in measures {
            let Some(g) = t.spec.spec.analysis.gates.iter().find(|g| g.name == gate) else {
                continue;
            };
            let stable = record.status.stable.clone();
            self.gauges
                .measure(
                    p,
                    &mut cache,
                    t,
                    g,
                    &revision,
                    epoch,
                    due,
                    stable.as_deref(),
                    now,
                )
                .await;
        }
        let revisions = &record.status.revisions;
        self.gauges
            .retain(t.key, &|rev| revisions.iter().any(|r| r.name == rev));
        for revision in smokes {
            p.start(t, &revision).await.map_err(CycleError::Platform)?;
        }
        Ok(Outcome {
            record,
            answers,
            served,
        })
    }
}

/// How the audit trail has always named a command in its text.
fn legacy_name(c: Command) -> &'static str {
    match c {
        Command::PromoteFull => "promote --full",
        other => other.as_str(),
    }
}

fn new_event(
    record: &mut Record,
    t: &Target<'_>,
    kind: Kind,
    actor: &str,
    message: String,
    now: Millis,
) -> Event {
    record.events += 1;
    let revision = record.current_revision();
    let app_version = revision
        .as_deref()
        .and_then(|r| record.status.revision(r))
        .and_then(|r| r.run.app_version().map(str::to_string));
    // The first revision's creation time tells apart a rollout deleted and made again.
    let epoch = record
        .status
        .revisions
        .first()
        .map_or(now, |r| r.created_at);
    Event {
        id: format!("{}.{epoch}.{}", t.key, record.events),
        kind,
        actor: actor.to_string(),
        message,
        revision,
        app_version,
        phase: record.status.phase.as_str().to_string(),
        at: now,
        notify: kind.notification(),
    }
}

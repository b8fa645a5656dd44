//! This machine as the driver sees it: instances are processes (`platform.rs`), the
//! status lives in SQLite with the audit trail beside it, builtin gates read the
//! proxy's counters, smoke tests run from here, events are printed to the terminal.
//! Instances and the routing table are acted on for every rollout at once after each
//! tick's cycles (the controller does it, from the persisted statuses).
#![warn(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_analysis::run_smoke;
use baton_audit::{AuditLog, NewEntry};
use baton_driver::{
    Counters, DataPlane, Event, Port, Publish, Record, SaveError, Smoke, StatusStore, Target,
    Traffic, Workloads,
};
use baton_engine::{Millis, RevisionObs, Status};
use baton_proxy_api::{ProxyClient, StatsSnapshot};
use baton_spec::StrategyRef;
use tokio::sync::mpsc;

use crate::{Platform, Store, StoreError};

/// A finished smoke run: `(rollout, revision, passed, detail)`.
pub type SmokeDone = (String, String, bool, String);

pub struct Machine {
    pub store: Store,
    pub platform: Platform,
    /// The proxy's control socket, for its counters.
    pub proxy: ProxyClient,
    pub audit: AuditLog,
    /// Told the rollout of every audit entry written (the dashboard refreshes).
    pub on_audit: Arc<dyn Fn(&str) + Send + Sync>,
    /// Print events to the terminal as they happen.
    pub echo: bool,
    /// The route version the proxy confirmed, per rollout.
    pub acked: BTreeMap<String, u64>,
    /// The proxy's counters, read at most once a tick (`None` at a tick's start).
    pub stats: Option<StatsSnapshot>,
    pub smoke_tx: mpsc::UnboundedSender<SmokeDone>,
    /// Finished smoke runs, per rollout.
    pub smoke_done: BTreeMap<String, (String, bool, String)>,
}

/// The `tracing` target of a rollout's events: `baton up`'s text log prints them as
/// lines of their own.
pub const EVENT_TARGET: &str = "baton::event";

/// Logs one of a rollout's events as it happens (an audit entry, an engine event).
pub fn log_event(rollout: &str, revision: Option<&str>, reason: &str, actor: &str, message: &str) {
    tracing::info!(
        target: EVENT_TARGET,
        rollout,
        revision = revision.unwrap_or(""),
        reason,
        actor,
        "{message}"
    );
}

/// `HH:MM:SS.mmm` (UTC) of a millisecond timestamp.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Machine {
    /// Appends to the audit trail; Baton's own failure to write it is reported, never
    /// blamed on the rollout.
    pub fn append(&self, entry: NewEntry) {
        (self.on_audit)(&entry.rollout);
        if let Err(e) = self.audit.append(entry, now_ms()) {
            tracing::warn!("cannot append to the audit trail: {e}");
        }
    }
}

impl Port for Machine {
    type Error = StoreError;
}

impl Workloads for Machine {
    async fn observe(
        &mut self,
        t: &Target<'_>,
        prev: &Status,
        now: Millis,
    ) -> Result<BTreeMap<String, RevisionObs>, StoreError> {
        let min_ready = t.spec.spec.min_ready_seconds.saturating_mul(1000);
        let mut obs = self.platform.observe(t.key, min_ready, now);
        if let (Some(at), Some(stable)) = (prev.restart_at, &prev.stable) {
            obs.entry(stable.clone()).or_default().stale =
                self.platform.started_before(t.key, stable, at);
        }
        Ok(obs)
    }

    /// Instances are reconciled for every rollout at once, after every cycle of the
    /// tick, from the persisted statuses (see `Controller::tick`).
    async fn apply(&mut self, _: &Target<'_>, _: &Status) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Traffic for Machine {
    fn confirmed(&mut self, t: &Target<'_>) -> u64 {
        self.acked.get(t.key).copied().unwrap_or(0)
    }

    /// One table for every service is pushed after the tick's cycles; the proxy's
    /// acknowledgement comes back through `confirmed`.
    async fn route(&mut self, _: &Target<'_>, _: &Status) -> Result<bool, StoreError> {
        Ok(false)
    }
}

impl StatusStore for Machine {
    async fn save(
        &mut self,
        t: &Target<'_>,
        record: &Record,
        changed: bool,
        audit: &[Event],
    ) -> Result<(), SaveError<StoreError>> {
        if changed {
            self.store
                .save_rollout(t.key, t.spec, record, now_ms())
                .map_err(SaveError::Other)?;
        }
        for e in audit {
            self.append(NewEntry {
                actor: e.actor.clone(),
                action: e.kind.audit_action().to_string(),
                rollout: t.key.to_string(),
                revision: e.revision.clone(),
                spec_digest: Some(t.digest.to_string()),
                reason: e.message.clone(),
            });
        }
        Ok(())
    }
}

impl Smoke for Machine {
    async fn start(&mut self, t: &Target<'_>, revision: &str) -> Result<(), StoreError> {
        let StrategyRef::BlueGreen(bg) = t.spec.spec.strategy.kind() else {
            return Ok(());
        };
        let target = bg
            .preview_listen
            .as_ref()
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .or_else(|| self.platform.backends(t.key, revision).first().copied());
        let tests = bg.smoke.clone();
        let tx = self.smoke_tx.clone();
        let (name, revision) = (t.key.to_string(), revision.to_string());
        tokio::spawn(async move {
            let result = match target {
                Some(addr) => run_smoke(addr, &tests, Duration::from_secs(5)).await,
                None => Err("no ready instance to test".into()),
            };
            let (passed, detail) = match result {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            let _ = tx.send((name, revision, passed, detail));
        });
        Ok(())
    }

    async fn take(
        &mut self,
        t: &Target<'_>,
        _: &Status,
    ) -> Result<Option<(String, bool, String)>, StoreError> {
        Ok(self.smoke_done.remove(t.key))
    }
}

impl DataPlane for Machine {
    async fn counters(&mut self, t: &Target<'_>, _: &[&str]) -> Counters {
        if self.stats.is_none() {
            self.stats = self.proxy.stats().await.ok();
        }
        match &self.stats {
            Some(s) => Counters::Read(s.get(t.key).cloned().unwrap_or_default()),
            None => Counters::Unreadable,
        }
    }

    fn address(&self, t: &Target<'_>, revision: &str) -> Option<SocketAddr> {
        self.platform.backends(t.key, revision).first().copied()
    }
}

impl Publish for Machine {
    async fn emit(&mut self, t: &Target<'_>, e: &Event) {
        if self.echo && !e.kind.is_routine() {
            log_event(
                t.key,
                e.revision.as_deref(),
                e.kind.reason(),
                &e.actor,
                &e.message,
            );
        }
    }
}

//! Supervision of every instance of every rollout on this machine.
//!
//! The life of an instance: `Starting` (process up, not yet ready) → `Running` (ready
//! or not, per its probes) → `Terminating` (out of the desired count: removed from
//! routing, waiting for the router to confirm) → `Stopping` (preStop wait, SIGTERM,
//! drain timeout, SIGKILL) → gone. An instance that exits or fails liveness while it
//! should run is replaced, with exponential backoff per revision.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use baton_engine::RevisionObs;
use baton_spec::{Probe, Probes, RunSpec, Shutdown};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::probe;
use crate::process;
use crate::store::{InstanceRecord, Store, StoreError};

pub type Millis = u64;

/// What one revision of one rollout should have.
#[derive(Debug, Clone)]
pub struct RevisionWant {
    pub replicas: u32,
    pub run: RunSpec,
    pub probes: Probes,
    pub shutdown: Shutdown,
    pub min_ready_ms: u64,
    /// A restart: instances started before this time are replaced, one at a time and
    /// only while every other instance is ready (the engine wants one more meanwhile).
    pub replace_before: Option<Millis>,
}

/// rollout → revision → want. A revision not listed should have no instance.
pub type Desired = BTreeMap<String, BTreeMap<String, RevisionWant>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InstancePhase {
    Starting,
    Running,
    Terminating,
    Stopping,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: u64,
    pub revision: String,
    pub address: SocketAddr,
    pub pid: u32,
    pub state: String,
    pub ready: bool,
    pub restarts: u32,
}

/// Something that happened to an instance, for the log and the history.
#[derive(Debug, Clone)]
pub struct PlatformEvent {
    pub rollout: String,
    pub reason: &'static str,
    pub message: String,
}

struct Instance {
    rec: InstanceRecord,
    child: Option<Child>,
    phase: InstancePhase,
    ready: bool,
    ready_since: Option<Millis>,
    successes: u32,
    failures: u32,
    live_failures: u32,
    probes: Vec<JoinHandle<()>>,
    derouted: bool,
    stopper: Option<JoinHandle<()>>,
    want: Option<RevisionWant>,
    /// When it started (Unix ms): a restart replaces the older ones.
    started_at: Millis,
}

impl Instance {
    /// A running instance this controller did not start; one the proxy routes to is
    /// serving, and counts as available at once.
    fn adopted(rec: InstanceRecord, ready: bool) -> Instance {
        let started_at = process::started_at_ms(rec.start_time).unwrap_or(0);
        Instance {
            started_at,
            rec,
            child: None,
            phase: InstancePhase::Running,
            ready,
            ready_since: ready.then_some(0),
            successes: 0,
            failures: 0,
            live_failures: 0,
            probes: Vec::new(),
            derouted: false,
            stopper: None,
            want: None,
        }
    }
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.rec.port))
    }
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !process::alive(self.rec.pid, self.rec.start_time),
        }
    }
    fn stop_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop_probes();
    }
}

#[derive(Debug)]
enum ProbeKind {
    Readiness,
    Liveness,
}

#[derive(Debug)]
struct ProbeReport {
    id: u64,
    kind: ProbeKind,
    result: Result<(), String>,
}

#[derive(Default)]
struct Backoff {
    crashes: u32,
    not_before: Millis,
}

pub struct Platform {
    log_dir: PathBuf,
    /// Free bytes on the disk of `log_dir` (a field so that tests can fill it).
    free_space: fn(&Path) -> Option<u64>,
    instances: BTreeMap<u64, Instance>,
    /// Ports an instance must not be given: the rollouts' and the controller's own
    /// listeners.
    reserved: BTreeSet<u16>,
    next_id: u64,
    backoff: HashMap<(String, String), Backoff>,
    restarts: HashMap<(String, String), u32>,
    tx: mpsc::UnboundedSender<ProbeReport>,
    rx: mpsc::UnboundedReceiver<ProbeReport>,
}

const MAX_BACKOFF_MS: u64 = 30_000;
/// Under this much free space the disk of the instances' logs counts as full.
const FULL_DISK_BYTES: u64 = 1 << 20;
const FULL_DISK_RETRY_MS: u64 = 1_000;

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` is written by statvfs before it is read.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let (avail, size): (u64, u64) = (st.f_bavail, st.f_frsize);
    Some(avail.saturating_mul(size))
}
/// An instance that stays ready this long proves its revision healthy again: the crash
/// backoff starts over. Resetting on mere readiness would let an instance that turns
/// ready and then fails liveness restart in a tight loop.
const BACKOFF_RESET_MS: u64 = 10_000;

impl Platform {
    /// A platform that re-adopts the instances recorded in `store` that still run.
    /// Those found in `routed` (the proxy's current table) start out ready, so that a
    /// restarted controller does not pull traffic from instances that were serving.
    pub fn adopt(
        log_dir: PathBuf,
        store: &Store,
        routed: &HashSet<SocketAddr>,
    ) -> Result<(Platform, Vec<PlatformEvent>), StoreError> {
        Self::load(log_dir, store, routed, true)
    }

    /// The recorded instances that still run, for a read-only look (`status` while no
    /// controller runs): nothing is written to the store.
    pub fn inspect(store: &Store, routed: &HashSet<SocketAddr>) -> Result<Platform, StoreError> {
        Ok(Self::load(PathBuf::new(), store, routed, false)?.0)
    }

    fn load(
        log_dir: PathBuf,
        store: &Store,
        routed: &HashSet<SocketAddr>,
        prune: bool,
    ) -> Result<(Platform, Vec<PlatformEvent>), StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut p = Platform {
            log_dir,
            free_space,
            reserved: BTreeSet::new(),
            instances: BTreeMap::new(),
            next_id: 1,
            backoff: HashMap::new(),
            restarts: HashMap::new(),
            tx,
            rx,
        };
        let mut events = Vec::new();
        let mut recorded = HashSet::new();
        for rec in store.instances()? {
            recorded.insert(rec.pid);
            p.next_id = p.next_id.max(rec.id + 1);
            if !process::alive(rec.pid, rec.start_time) {
                if prune {
                    store.remove_instance(rec.id)?;
                }
                continue;
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], rec.port));
            let ready = routed.contains(&addr);
            events.push(PlatformEvent {
                rollout: rec.rollout.clone(),
                reason: "Adopted",
                message: format!(
                    "adopted instance {} (pid {}, {addr}, revision {}){}",
                    rec.id,
                    rec.pid,
                    rec.revision,
                    if ready { ", serving" } else { "" }
                ),
            });
            p.instances.insert(rec.id, Instance::adopted(rec, ready));
        }
        if prune {
            p.adopt_unrecorded(store, routed, &recorded, &mut events)?;
        }
        Ok((p, events))
    }

    /// The directory an instance's mark names: this state directory's, absolute.
    fn mark_root(&self) -> PathBuf {
        std::fs::canonicalize(&self.log_dir).unwrap_or_else(|_| self.log_dir.clone())
    }

    /// Instances of this state directory that run without a record (the database was
    /// lost, or the controller died between spawning and recording): found by their
    /// mark, recorded and adopted, so they keep serving and `down` stops them.
    fn adopt_unrecorded(
        &mut self,
        store: &Store,
        routed: &HashSet<SocketAddr>,
        recorded: &HashSet<u32>,
        events: &mut Vec<PlatformEvent>,
    ) -> Result<(), StoreError> {
        for (pid, start_time, m) in process::find_marked(&self.mark_root()) {
            if recorded.contains(&pid) {
                continue;
            }
            let id = if self.instances.contains_key(&m.id) {
                self.next_id
            } else {
                m.id
            };
            self.next_id = self.next_id.max(id + 1);
            let rec = InstanceRecord {
                id,
                rollout: m.rollout,
                revision: m.revision,
                pid,
                port: m.port,
                start_time,
            };
            store.add_instance(&rec)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], rec.port));
            let ready = routed.contains(&addr);
            events.push(PlatformEvent {
                rollout: rec.rollout.clone(),
                reason: "Adopted",
                message: format!(
                    "adopted instance {id} (pid {pid}, {addr}, revision {}) found running without a record{}",
                    rec.revision,
                    if ready { ", serving" } else { "" }
                ),
            });
            self.instances.insert(id, Instance::adopted(rec, ready));
        }
        Ok(())
    }

    /// Why rollouts may be held back by Baton itself: its state directory's disk is
    /// full, where instances write their output (they exit when they cannot) and the
    /// state is kept.
    pub fn state_disk_full(&self) -> Option<String> {
        let free = (self.free_space)(&self.log_dir).filter(|f| *f < FULL_DISK_BYTES)?;
        Some(format!(
            "the disk of Baton's state directory is full ({free} bytes free under {}): instances that cannot write their output there exit, and are started again once there is room",
            self.log_dir.display()
        ))
    }

    /// Ports no instance started from now on is given (replacing the last set).
    pub fn reserve_ports(&mut self, ports: BTreeSet<u16>) {
        self.reserved = ports;
    }

    /// One supervision pass: take in probe results, notice exits, start and stop
    /// instances to match `desired`.
    pub fn reconcile(
        &mut self,
        desired: &Desired,
        store: &Store,
        now: Millis,
    ) -> Result<Vec<PlatformEvent>, StoreError> {
        let mut events = Vec::new();
        self.take_probe_reports(now, &mut events);
        self.reap(store, now, &mut events)?;

        for inst in self.instances.values() {
            if inst.ready
                && inst
                    .ready_since
                    .is_some_and(|t| now.saturating_sub(t) >= BACKOFF_RESET_MS)
            {
                self.backoff
                    .remove(&(inst.rec.rollout.clone(), inst.rec.revision.clone()));
            }
        }
        // A revision no longer wanted takes its crash record with it: a long-lived
        // controller would otherwise keep one for every revision that ever crashed.
        let wanted = |(rollout, rev): &(String, String)| {
            desired
                .get(rollout)
                .is_some_and(|revs| revs.contains_key(rev))
        };
        self.backoff.retain(|k, _| wanted(k));
        self.restarts.retain(|k, _| wanted(k));
        // Attach wants (for adopted instances) and start probes where missing.
        for inst in self.instances.values_mut() {
            let want = desired
                .get(&inst.rec.rollout)
                .and_then(|m| m.get(&inst.rec.revision));
            if let Some(w) = want
                && inst.want.is_none()
            {
                inst.want = Some(w.clone());
            }
            if inst.probes.is_empty()
                && matches!(inst.phase, InstancePhase::Starting | InstancePhase::Running)
                && let Some(w) = &inst.want
            {
                inst.probes = start_probes(inst.rec.id, inst.addr(), &w.probes, self.tx.clone());
            }
        }

        // Scale each wanted revision.
        for (rollout, revs) in desired {
            for (rev, want) in revs {
                let live: Vec<u64> = self
                    .instances
                    .values()
                    .filter(|i| &i.rec.rollout == rollout && &i.rec.revision == rev)
                    .filter(|i| matches!(i.phase, InstancePhase::Starting | InstancePhase::Running))
                    .map(|i| i.rec.id)
                    .collect();
                let have = live.len() as u32;
                if let Some(before) = want.replace_before
                    && let Some(id) = self.next_to_replace(&live, want.replicas, before)
                {
                    events.push(PlatformEvent {
                        rollout: rollout.clone(),
                        reason: "Restarting",
                        message: format!("replacing instance {id} of revision {rev} (restart)"),
                    });
                    self.terminate(id, &mut events);
                    continue;
                }
                if have < want.replicas {
                    let key = (rollout.clone(), rev.clone());
                    let wait = self.backoff.get(&key).map_or(0, |b| b.not_before);
                    if now < wait {
                        continue;
                    }
                    for _ in have..want.replicas {
                        match self.start(rollout, rev, want, store, now) {
                            Ok(id) => events.push(PlatformEvent {
                                rollout: rollout.clone(),
                                reason: "Started",
                                message: format!("started instance {id} of revision {rev}"),
                            }),
                            Err(e) => {
                                let b = self.backoff.entry(key.clone()).or_default();
                                b.crashes += 1;
                                b.not_before = now + backoff_ms(b.crashes);
                                events.push(PlatformEvent {
                                    rollout: rollout.clone(),
                                    reason: "StartFailed",
                                    message: format!(
                                        "revision {rev}: {e}; retrying in {} ms",
                                        backoff_ms(b.crashes)
                                    ),
                                });
                                break;
                            }
                        }
                    }
                } else if have > want.replicas {
                    // Unready and youngest first.
                    let mut pick: Vec<&Instance> = live
                        .iter()
                        .filter_map(|id| self.instances.get(id))
                        .collect();
                    pick.sort_by_key(|i| (i.ready, std::cmp::Reverse(i.rec.id)));
                    let ids: Vec<u64> = pick
                        .iter()
                        .take((have - want.replicas) as usize)
                        .map(|i| i.rec.id)
                        .collect();
                    for id in ids {
                        self.terminate(id, &mut events);
                    }
                }
            }
        }
        // Instances of revisions nobody wants any more.
        let unwanted: Vec<u64> = self
            .instances
            .values()
            .filter(|i| matches!(i.phase, InstancePhase::Starting | InstancePhase::Running))
            .filter(|i| {
                desired
                    .get(&i.rec.rollout)
                    .and_then(|m| m.get(&i.rec.revision))
                    .is_none()
            })
            .map(|i| i.rec.id)
            .collect();
        for id in unwanted {
            self.terminate(id, &mut events);
        }
        // Out of routing and confirmed: begin the graceful stop.
        for inst in self.instances.values_mut() {
            if inst.phase == InstancePhase::Terminating && inst.derouted {
                inst.phase = InstancePhase::Stopping;
                let shutdown = inst
                    .want
                    .as_ref()
                    .map(|w| w.shutdown.clone())
                    .unwrap_or_default();
                inst.stopper = Some(tokio::spawn(graceful_stop(
                    inst.rec.pid,
                    inst.rec.start_time,
                    shutdown,
                )));
            }
        }
        Ok(events)
    }

    fn start(
        &mut self,
        rollout: &str,
        rev: &str,
        want: &RevisionWant,
        store: &Store,
        now: Millis,
    ) -> Result<u64, String> {
        let id = self.next_id;
        let port = process::free_port_avoiding(&self.reserved).map_err(|e| e.to_string())?;
        let log = self.log_dir.join(format!("{rollout}-{rev}-{id}.log"));
        let mark = process::Mark {
            id,
            port,
            rollout: rollout.to_string(),
            revision: rev.to_string(),
        }
        .encode(&self.mark_root());
        let mut child = process::spawn(&want.run, port, &log, &mark).map_err(|e| e.to_string())?;
        let pid = child.id();
        let start_time = process::start_time(pid).unwrap_or(0);
        let rec = InstanceRecord {
            id,
            rollout: rollout.to_string(),
            revision: rev.to_string(),
            pid,
            port,
            start_time,
        };
        if let Err(e) = store.add_instance(&rec) {
            // Unrecorded, it would be nobody's: stop it now (its mark would let the
            // next start find it, but nothing should run that Baton cannot name).
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.to_string());
        }
        self.next_id += 1;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let probes = start_probes(id, addr, &want.probes, self.tx.clone());
        self.instances.insert(
            id,
            Instance {
                rec,
                child: Some(child),
                phase: InstancePhase::Starting,
                ready: false,
                ready_since: None,
                successes: 0,
                failures: 0,
                live_failures: 0,
                probes,
                derouted: false,
                stopper: None,
                want: Some(want.clone()),
                started_at: now,
            },
        );
        Ok(id)
    }

    /// During a restart, the oldest instance started before `before`, once all `wanted`
    /// instances run and are ready (the replacement of the last one included), so
    /// stopping it leaves the revision's capacity whole.
    fn next_to_replace(&self, live: &[u64], wanted: u32, before: Millis) -> Option<u64> {
        let live: Vec<&Instance> = live
            .iter()
            .filter_map(|id| self.instances.get(id))
            .collect();
        if (live.len() as u32) < wanted || live.iter().any(|i| !i.ready) {
            return None;
        }
        live.iter()
            .filter(|i| i.started_at < before)
            .min_by_key(|i| (i.started_at, i.rec.id))
            .map(|i| i.rec.id)
    }

    /// Instances of a rollout's revision started before `before` and not stopping.
    pub fn started_before(&self, rollout: &str, revision: &str, before: Millis) -> u32 {
        self.instances
            .values()
            .filter(|i| i.rec.rollout == rollout && i.rec.revision == revision)
            .filter(|i| matches!(i.phase, InstancePhase::Starting | InstancePhase::Running))
            .filter(|i| i.started_at < before)
            .count() as u32
    }

    fn terminate(&mut self, id: u64, events: &mut Vec<PlatformEvent>) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.phase = InstancePhase::Terminating;
            inst.ready = false;
            inst.stop_probes();
            events.push(PlatformEvent {
                rollout: inst.rec.rollout.clone(),
                reason: "Terminating",
                message: format!(
                    "instance {id} ({}) of revision {} leaves routing, then stops",
                    inst.addr(),
                    inst.rec.revision
                ),
            });
        }
    }

    fn take_probe_reports(&mut self, now: Millis, events: &mut Vec<PlatformEvent>) {
        while let Ok(r) = self.rx.try_recv() {
            let Some(inst) = self.instances.get_mut(&r.id) else {
                continue;
            };
            if !matches!(inst.phase, InstancePhase::Starting | InstancePhase::Running) {
                continue;
            }
            let default_probe = Probe {
                http_get: baton_spec::HttpGet { path: "/".into() },
                period_seconds: 1.0,
                timeout_seconds: 1.0,
                failure_threshold: 3,
                success_threshold: 1,
                initial_delay_seconds: 0.0,
            };
            let probes = inst
                .want
                .as_ref()
                .map(|w| w.probes.clone())
                .unwrap_or_default();
            match r.kind {
                ProbeKind::Readiness => {
                    let p = probes.readiness.unwrap_or(default_probe);
                    match r.result {
                        Ok(()) => {
                            inst.failures = 0;
                            inst.successes += 1;
                            if !inst.ready && inst.successes >= p.success_threshold {
                                inst.ready = true;
                                inst.ready_since = Some(now);
                                inst.phase = InstancePhase::Running;
                                events.push(PlatformEvent {
                                    rollout: inst.rec.rollout.clone(),
                                    reason: "Ready",
                                    message: format!(
                                        "instance {} ({}) of revision {} is ready",
                                        inst.rec.id,
                                        inst.addr(),
                                        inst.rec.revision
                                    ),
                                });
                            }
                        }
                        Err(e) => {
                            inst.successes = 0;
                            inst.failures += 1;
                            if inst.ready && inst.failures >= p.failure_threshold {
                                inst.ready = false;
                                inst.ready_since = None;
                                events.push(PlatformEvent {
                                    rollout: inst.rec.rollout.clone(),
                                    reason: "NotReady",
                                    message: format!(
                                        "instance {} ({}) failed readiness: {e}",
                                        inst.rec.id,
                                        inst.addr()
                                    ),
                                });
                            }
                        }
                    }
                }
                ProbeKind::Liveness => {
                    let Some(p) = probes.liveness else { continue };
                    match r.result {
                        Ok(()) => inst.live_failures = 0,
                        Err(e) => {
                            inst.live_failures += 1;
                            if inst.live_failures >= p.failure_threshold {
                                events.push(PlatformEvent {
                                    rollout: inst.rec.rollout.clone(),
                                    reason: "LivenessFailed",
                                    message: format!("instance {} ({}) failed liveness {} times ({e}): killing it", inst.rec.id, inst.addr(), inst.live_failures),
                                });
                                process::signal(inst.rec.pid, Signal::SIGKILL);
                                inst.ready = false;
                                inst.live_failures = 0;
                                // Reaped as a crash on the next pass; no probe may kill it twice.
                                inst.stop_probes();
                            }
                        }
                    }
                }
            }
        }
    }

    /// Removes instances whose process is gone; an unexpected exit is a crash.
    fn reap(
        &mut self,
        store: &Store,
        now: Millis,
        events: &mut Vec<PlatformEvent>,
    ) -> Result<(), StoreError> {
        let mut gone = Vec::new();
        for (id, inst) in self.instances.iter_mut() {
            if inst.exited() {
                gone.push(*id);
            }
        }
        for id in gone {
            let Some(inst) = self.instances.remove(&id) else {
                continue;
            };
            store.remove_instance(id)?;
            if let Some(s) = &inst.stopper {
                s.abort();
            }
            let key = (inst.rec.rollout.clone(), inst.rec.revision.clone());
            if matches!(inst.phase, InstancePhase::Starting | InstancePhase::Running)
                && let Some(free) =
                    (self.free_space)(&self.log_dir).filter(|f| *f < FULL_DISK_BYTES)
            {
                // Its output goes to a file on a full disk: a program that dies when it
                // cannot write (Rust's `println!` panics) died of Baton's state, not of
                // its revision. Not a crash: no backoff, no restart counted.
                let b = self.backoff.entry(key).or_default();
                b.not_before = now + FULL_DISK_RETRY_MS;
                events.push(PlatformEvent {
                    rollout: inst.rec.rollout.clone(),
                    reason: "StateDiskFull",
                    message: format!(
                        "instance {id} (pid {}) of revision {} exited while the disk of Baton's state directory is full ({free} bytes free under {}), where its output goes: Baton's problem, not the revision's (not counted as a crash); starting it again in {FULL_DISK_RETRY_MS} ms",
                        inst.rec.pid,
                        inst.rec.revision,
                        self.log_dir.display()
                    ),
                });
            } else if matches!(inst.phase, InstancePhase::Starting | InstancePhase::Running) {
                let b = self.backoff.entry(key.clone()).or_default();
                b.crashes += 1;
                b.not_before = now + backoff_ms(b.crashes);
                *self.restarts.entry(key).or_default() += 1;
                events.push(PlatformEvent {
                    rollout: inst.rec.rollout.clone(),
                    reason: "Crashed",
                    message: format!(
                        "instance {id} (pid {}) of revision {} exited unexpectedly; replacing it in {} ms",
                        inst.rec.pid,
                        inst.rec.revision,
                        backoff_ms(b.crashes)
                    ),
                });
            } else {
                events.push(PlatformEvent {
                    rollout: inst.rec.rollout.clone(),
                    reason: "Stopped",
                    message: format!("instance {id} of revision {} stopped", inst.rec.revision),
                });
            }
        }
        Ok(())
    }

    /// The router confirmed a table routing to exactly `routed`: terminating instances
    /// absent from it may now stop.
    pub fn routes_confirmed(&mut self, routed: &HashSet<SocketAddr>) {
        for inst in self.instances.values_mut() {
            if inst.phase == InstancePhase::Terminating && !routed.contains(&inst.addr()) {
                inst.derouted = true;
            }
        }
    }

    /// Ready, running instances of one revision: what the router may send traffic to.
    pub fn backends(&self, rollout: &str, rev: &str) -> Vec<SocketAddr> {
        self.instances
            .values()
            .filter(|i| i.rec.rollout == rollout && i.rec.revision == rev)
            .filter(|i| i.phase == InstancePhase::Running && i.ready)
            .map(Instance::addr)
            .collect()
    }

    /// Ready and available counts per revision of a rollout, for the engine.
    pub fn observe(
        &self,
        rollout: &str,
        min_ready_ms: u64,
        now: Millis,
    ) -> BTreeMap<String, RevisionObs> {
        let mut out: BTreeMap<String, RevisionObs> = BTreeMap::new();
        for i in self.instances.values().filter(|i| i.rec.rollout == rollout) {
            let o = out.entry(i.rec.revision.clone()).or_default();
            if i.phase == InstancePhase::Running && i.ready {
                o.ready += 1;
                if i.ready_since
                    .is_some_and(|t| now.saturating_sub(t) >= min_ready_ms)
                {
                    o.available += 1;
                }
            }
        }
        out
    }

    pub fn instances(&self, rollout: &str) -> Vec<InstanceView> {
        self.instances
            .values()
            .filter(|i| i.rec.rollout == rollout)
            .map(|i| InstanceView {
                id: i.rec.id,
                revision: i.rec.revision.clone(),
                address: i.addr(),
                pid: i.rec.pid,
                state: match (i.phase, i.ready) {
                    (InstancePhase::Starting, _) => "Starting",
                    (InstancePhase::Running, true) => "Ready",
                    (InstancePhase::Running, false) => "NotReady",
                    (InstancePhase::Terminating, _) => "Terminating",
                    (InstancePhase::Stopping, _) => "Stopping",
                }
                .to_string(),
                ready: i.ready && i.phase == InstancePhase::Running,
                restarts: self
                    .restarts
                    .get(&(i.rec.rollout.clone(), i.rec.revision.clone()))
                    .copied()
                    .unwrap_or(0),
            })
            .collect()
    }

    /// Instances of a revision replaced after a crash or failed liveness.
    pub fn restarts(&self, rollout: &str, rev: &str) -> u32 {
        self.restarts
            .get(&(rollout.to_string(), rev.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Stops every instance now (SIGTERM, then SIGKILL after each one's drain timeout)
    /// and waits for them to be gone. For `baton down`, after the proxy has stopped.
    pub async fn stop_all(
        &mut self,
        store: &Store,
        default_drain: Duration,
    ) -> Result<usize, StoreError> {
        let n = self.instances.len();
        let mut waits = Vec::new();
        for inst in self.instances.values_mut() {
            inst.stop_probes();
            let mut shutdown = inst
                .want
                .as_ref()
                .map(|w| w.shutdown.clone())
                .unwrap_or_default();
            if inst.want.is_none() {
                shutdown.drain_timeout_seconds = default_drain.as_secs_f64();
            }
            shutdown.pre_stop_seconds = 0.0;
            waits.push(tokio::spawn(graceful_stop(
                inst.rec.pid,
                inst.rec.start_time,
                shutdown,
            )));
        }
        for w in waits {
            let _ = w.await;
        }
        for (id, mut inst) in std::mem::take(&mut self.instances) {
            if let Some(c) = &mut inst.child {
                let _ = c.try_wait();
            }
            store.remove_instance(id)?;
        }
        Ok(n)
    }
}

/// Kubernetes' CrashLoopBackOff doubling, capped: state the platform keeps per revision
/// across ticks, which a retry crate's loop would not fit (nothing here waits in place).
fn backoff_ms(crashes: u32) -> u64 {
    (500u64 << crashes.min(10)).min(MAX_BACKOFF_MS)
}

/// preStop wait, SIGTERM, then SIGKILL if the drain timeout passes; returns once the
/// process is gone.
async fn graceful_stop(pid: u32, start: u64, s: Shutdown) {
    tokio::time::sleep(Duration::from_secs_f64(s.pre_stop_seconds)).await;
    if !process::alive(pid, start) {
        return;
    }
    process::signal(pid, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(s.drain_timeout_seconds);
    while tokio::time::Instant::now() < deadline {
        if !process::alive(pid, start) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if process::alive(pid, start) {
        process::signal(pid, Signal::SIGKILL);
    }
}

/// A probe's result as the instance's verdict; `None` when the failure was Baton's own
/// (it is reported, and the probe is simply tried again).
fn judged(id: u64, result: Result<(), probe::Failure>) -> Option<Result<(), String>> {
    match result {
        Ok(()) => Some(Ok(())),
        Err(probe::Failure::Instance(e)) => Some(Err(e)),
        Err(own @ probe::Failure::Own(_)) => {
            tracing::warn!("probe of instance {id} not judged: {own}");
            None
        }
    }
}

fn start_probes(
    id: u64,
    addr: SocketAddr,
    probes: &Probes,
    tx: mpsc::UnboundedSender<ProbeReport>,
) -> Vec<JoinHandle<()>> {
    let mut out = Vec::new();
    let readiness = probes.readiness.clone();
    let rtx = tx.clone();
    out.push(tokio::spawn(async move {
        let (period, timeout, delay) = match &readiness {
            Some(p) => (p.period_seconds, p.timeout_seconds, p.initial_delay_seconds),
            // Without a readiness probe: TCP connect, checked often.
            None => (0.25, 1.0, 0.0),
        };
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        loop {
            let timeout = Duration::from_secs_f64(timeout);
            let result = match &readiness {
                Some(p) => probe::http_get(addr, &p.http_get.path, timeout)
                    .await
                    .map(|_| ()),
                None => probe::tcp(addr, timeout).await,
            };
            let Some(result) = judged(id, result) else {
                tokio::time::sleep(Duration::from_secs_f64(period)).await;
                continue;
            };
            if rtx
                .send(ProbeReport {
                    id,
                    kind: ProbeKind::Readiness,
                    result,
                })
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(period)).await;
        }
    }));
    if let Some(p) = probes.liveness.clone() {
        out.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(
                p.initial_delay_seconds.max(p.period_seconds),
            ))
            .await;
            loop {
                let result = probe::http_get(
                    addr,
                    &p.http_get.path,
                    Duration::from_secs_f64(p.timeout_seconds),
                )
                .await
                .map(|_| ());
                let Some(result) = judged(id, result) else {
                    tokio::time::sleep(Duration::from_secs_f64(p.period_seconds)).await;
                    continue;
                };
                if tx
                    .send(ProbeReport {
                        id,
                        kind: ProbeKind::Liveness,
                        result,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs_f64(p.period_seconds)).await;
            }
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(command: &str) -> RevisionWant {
        RevisionWant {
            replicas: 1,
            run: RunSpec {
                command: vec!["sh".into(), "-c".into(), command.into()],
                env: Default::default(),
                working_dir: None,
            },
            probes: Default::default(),
            shutdown: Default::default(),
            min_ready_ms: 0,
            replace_before: None,
        }
    }

    /// Reconciles until an instance of `web/r1` has exited; that exit's event.
    async fn first_exit(p: &mut Platform, store: &Store, desired: &Desired) -> PlatformEvent {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let events = p.reconcile(desired, store, now).expect("reconcile");
            if let Some(e) = events
                .into_iter()
                .find(|e| e.reason != "Started" && e.reason != "Stopped")
            {
                return e;
            }
            assert!(std::time::Instant::now() < deadline, "no exit seen");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The soak filled the state directory's disk: the new revision's instances died
    /// writing their output, and were reported as crashing, with a backoff growing to
    /// 30 s, for Baton's own full disk.
    #[tokio::test]
    async fn an_exit_on_a_full_state_disk_is_not_the_revisions_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state.db")).expect("store");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("logs");
        let (mut p, _) = Platform::adopt(logs, &store, &HashSet::new()).expect("platform");
        let desired: Desired = [(
            "web".to_string(),
            [("r1".to_string(), want("exit 3"))].into(),
        )]
        .into();
        let key = ("web".to_string(), "r1".to_string());

        p.free_space = |_| Some(4096);
        let e = first_exit(&mut p, &store, &desired).await;
        assert_eq!(e.reason, "StateDiskFull", "{}", e.message);
        assert!(e.message.contains("4096 bytes free"), "{}", e.message);
        // And `baton status` says so, apart from the rollout's own state.
        let said = p.state_disk_full().expect("a full disk is reported");
        assert!(said.contains("4096 bytes free"), "{said}");
        assert_eq!(p.backoff.get(&key).map(|b| b.crashes), Some(0));
        assert_eq!(p.restarts.get(&key), None);

        // With room on the disk, the same exit is the revision's crash.
        p.free_space = |_| Some(1 << 30);
        assert_eq!(p.state_disk_full(), None);
        p.backoff.clear();
        let e = first_exit(&mut p, &store, &desired).await;
        assert_eq!(e.reason, "Crashed", "{}", e.message);
        assert_eq!(p.backoff.get(&key).map(|b| b.crashes), Some(1));
        assert_eq!(p.restarts.get(&key), Some(&1));

        // Once the revision is no longer wanted, its crash record goes.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        p.reconcile(&Desired::new(), &store, now)
            .expect("reconcile");
        assert!(!p.backoff.contains_key(&key));
        assert_eq!(p.restarts("web", "r1"), 0);
    }

    #[test]
    fn the_free_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_space(dir.path()).is_some());
        assert_eq!(free_space(&dir.path().join("missing")), None);
    }
}

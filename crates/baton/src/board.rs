//! What the dashboard shows and who may see it: the latest status of every rollout
//! (published by the controller loop, streamed to browsers), a short history of
//! per-revision traffic, error rate and latency for the charts, and the login
//! sessions. Shared by the controller loop and the API server; no I/O here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use baton_proxy::{RevisionStats, StatsSnapshot};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// What an identity may do: viewers read; operators and admins also act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn may_act(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }
}

/// One sample of one revision's traffic over the last second.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub at: u64,
    pub revision: String,
    pub rps: f64,
    pub error_rate: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Per rollout, about ten minutes of points for a few revisions.
const POINTS_PER_ROLLOUT: usize = 3000;
const SESSION_MS: u64 = 12 * 3600 * 1000;
const CODE_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone)]
pub struct Session {
    pub who: String,
    pub role: Role,
    /// Sent back by the page in `X-CSRF-Token` with every action.
    pub csrf: String,
    pub expires: u64,
}

#[derive(Default)]
struct Auth {
    sessions: HashMap<String, Session>,
    /// One-time login codes: code → (who, role, expires).
    codes: HashMap<String, (String, Role, u64)>,
}

pub struct Board {
    status: watch::Sender<Arc<str>>,
    points: broadcast::Sender<Arc<str>>,
    series: Mutex<BTreeMap<String, VecDeque<Point>>>,
    last_stats: Mutex<Option<(u64, StatsSnapshot)>>,
    auth: Mutex<Auth>,
    audit_seq: Mutex<BTreeMap<String, u64>>,
}

impl Default for Board {
    fn default() -> Board {
        Board {
            status: watch::channel(Arc::from("{\"rollouts\":[]}")).0,
            points: broadcast::channel(64).0,
            series: Mutex::default(),
            last_stats: Mutex::default(),
            auth: Mutex::default(),
            audit_seq: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Board {
    /// Publishes the rollouts' status (JSON text); subscribers wake only on a change.
    pub fn publish(&self, rollouts: serde_json::Value) {
        let audit = lock(&self.audit_seq).clone();
        let text = serde_json::json!({ "rollouts": rollouts, "audit": audit }).to_string();
        self.status.send_if_modified(|cur| {
            if **cur == *text {
                false
            } else {
                *cur = Arc::from(text.as_str());
                true
            }
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        self.status.subscribe()
    }

    pub fn subscribe_points(&self) -> broadcast::Receiver<Arc<str>> {
        self.points.subscribe()
    }

    /// An audit entry was written for `rollout`: pages showing its trail refetch it.
    pub fn audit_written(&self, rollout: &str) {
        *lock(&self.audit_seq)
            .entry(rollout.to_string())
            .or_default() += 1;
    }

    /// Turns two proxy snapshots a second or so apart into one point per revision.
    pub fn sample(&self, now: u64, stats: StatsSnapshot) {
        let mut last = lock(&self.last_stats);
        let Some((then, before)) = last.replace((now, stats.clone())) else {
            return;
        };
        let dt = (now.saturating_sub(then) as f64 / 1000.0).max(0.001);
        let mut fresh = Vec::new();
        for (rollout, revisions) in &stats {
            for (revision, current) in revisions {
                let earlier: RevisionStats = before
                    .get(rollout)
                    .and_then(|m| m.get(revision))
                    .cloned()
                    .unwrap_or_default();
                let d = current.since(&earlier);
                if d.requests() == 0 && earlier.requests() == 0 {
                    continue;
                }
                fresh.push((
                    rollout.clone(),
                    Point {
                        at: now,
                        revision: revision.clone(),
                        rps: d.requests() as f64 / dt,
                        error_rate: d.error_rate(),
                        p50: d.quantile(0.5),
                        p99: d.quantile(0.99),
                    },
                ));
            }
        }
        drop(last);
        if fresh.is_empty() {
            return;
        }
        let mut series = lock(&self.series);
        let mut out: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
        for (rollout, p) in &fresh {
            let q = series.entry(rollout.clone()).or_default();
            q.push_back(p.clone());
            while q.len() > POINTS_PER_ROLLOUT {
                q.pop_front();
            }
            out.entry(rollout.as_str()).or_default().push(p);
        }
        drop(series);
        let _ = self.points.send(Arc::from(
            serde_json::to_string(&out).unwrap_or_default().as_str(),
        ));
    }

    /// Every point kept, by rollout: what a page starts its charts with.
    pub fn history(&self) -> String {
        serde_json::to_string(&*lock(&self.series)).unwrap_or_else(|_| "{}".into())
    }

    pub fn new_session(&self, who: &str, role: Role, now: u64) -> Option<(String, Session)> {
        let id = crate::paths::new_token().ok()?;
        let csrf = crate::paths::new_token().ok()?;
        let s = Session {
            who: who.to_string(),
            role,
            csrf,
            expires: now + SESSION_MS,
        };
        let mut auth = lock(&self.auth);
        auth.sessions.retain(|_, s| s.expires > now);
        auth.sessions.insert(id.clone(), s.clone());
        Some((id, s))
    }

    pub fn session(&self, id: &str, now: u64) -> Option<Session> {
        lock(&self.auth)
            .sessions
            .get(id)
            .filter(|s| s.expires > now)
            .cloned()
    }

    pub fn end_session(&self, id: &str) {
        lock(&self.auth).sessions.remove(id);
    }

    /// A login code that works once, within ten minutes.
    pub fn one_time_code(&self, who: &str, role: Role, now: u64) -> Option<String> {
        let code = crate::paths::new_token().ok()?;
        let mut auth = lock(&self.auth);
        auth.codes.retain(|_, (_, _, exp)| *exp > now);
        auth.codes
            .insert(code.clone(), (who.to_string(), role, now + CODE_MS));
        Some(code)
    }

    pub fn redeem(&self, code: &str, now: u64) -> Option<(String, Role)> {
        let (who, role, exp) = lock(&self.auth).codes.remove(code)?;
        (exp > now).then_some((who, role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_work_once_and_sessions_expire() {
        let b = Board::default();
        let code = b.one_time_code("admin", Role::Admin, 1000).expect("code");
        assert_eq!(b.redeem(&code, 2000), Some(("admin".into(), Role::Admin)));
        assert_eq!(b.redeem(&code, 2000), None, "a code works once");
        let late = b.one_time_code("admin", Role::Admin, 1000).expect("code");
        assert_eq!(
            b.redeem(&late, 1000 + CODE_MS + 1),
            None,
            "an old code is refused"
        );
        let (id, s) = b.new_session("ops", Role::Viewer, 0).expect("session");
        assert_eq!(b.session(&id, 10).map(|s| s.who), Some("ops".into()));
        assert!(!s.role.may_act());
        assert!(b.session(&id, SESSION_MS + 1).is_none());
        b.end_session(&id);
        assert!(b.session(&id, 10).is_none());
    }

    #[test]
    fn samples_become_per_second_points() {
        let b = Board::default();
        let mut rx = b.subscribe_points();
        let mut stats = StatsSnapshot::new();
        let mut rev = RevisionStats {
            buckets: vec![0; baton_proxy::BUCKETS.len() + 1],
            ..Default::default()
        };
        stats
            .entry("web".into())
            .or_default()
            .insert("abc".into(), rev.clone());
        b.sample(1000, stats.clone());
        rev.classes = [0, 90, 0, 0, 10];
        stats
            .entry("web".into())
            .or_default()
            .insert("abc".into(), rev);
        b.sample(3000, stats);
        let sent: serde_json::Value =
            serde_json::from_str(&rx.try_recv().expect("points")).expect("json");
        let p = &sent["web"][0];
        assert_eq!(p["rps"], 50.0, "100 requests over 2 s");
        assert_eq!(p["errorRate"], 0.1);
        let hist: serde_json::Value = serde_json::from_str(&b.history()).expect("json");
        assert_eq!(hist["web"].as_array().map(Vec::len), Some(1));
    }
}

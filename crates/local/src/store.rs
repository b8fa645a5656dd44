//! Rollout state in SQLite under `.baton/`: specs, engine status, instances, events.
//!
//! The controller writes the engine's status after every step, before acting on it, so
//! a restart resumes exactly where it stopped. WAL mode lets the CLI read while the
//! controller writes.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database holds a record that does not decode ({what}): {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
}

/// One supervised process, as recorded so a restarted controller can adopt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: u64,
    pub rollout: String,
    pub revision: String,
    pub pid: u32,
    pub port: u16,
    /// The kernel's start time of the process, to tell it from a reused pid.
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub at: u64,
    pub rollout: String,
    pub reason: String,
    pub message: String,
}

/// The connection sits behind a mutex so the controller's async loop can hold a
/// `&Store` across awaits; calls are short and never contended in practice.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rollouts (
                 name TEXT PRIMARY KEY,
                 spec TEXT NOT NULL,
                 status TEXT NOT NULL,
                 updated_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS instances (
                 id INTEGER PRIMARY KEY,
                 rollout TEXT NOT NULL,
                 revision TEXT NOT NULL,
                 pid INTEGER NOT NULL,
                 port INTEGER NOT NULL,
                 start_time INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at INTEGER NOT NULL,
                 rollout TEXT NOT NULL,
                 reason TEXT NOT NULL,
                 message TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL);",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub fn save_rollout<S: Serialize, T: Serialize>(
        &self,
        name: &str,
        spec: &S,
        status: &T,
        now: u64,
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(|source| StoreError::Decode {
            what: format!("spec of {name}"),
            source,
        })?;
        let status = serde_json::to_string(status).map_err(|source| StoreError::Decode {
            what: format!("status of {name}"),
            source,
        })?;
        self.conn().execute(
            "INSERT INTO rollouts (name, spec, status, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, status = ?3, updated_at = ?4",
            params![name, spec, status, now as i64],
        )?;
        Ok(())
    }

    pub fn rollouts<S: DeserializeOwned, T: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, S, T)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, spec, status FROM rollouts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, spec, status) = row?;
            let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Decode {
                what: format!("spec of {name}"),
                source,
            })?;
            let status = serde_json::from_str(&status).map_err(|source| StoreError::Decode {
                what: format!("status of {name}"),
                source,
            })?;
            out.push((name, spec, status));
        }
        Ok(out)
    }

    pub fn add_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO instances (id, rollout, revision, pid, port, start_time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                rec.id as i64,
                rec.rollout,
                rec.revision,
                rec.pid,
                rec.port,
                rec.start_time as i64
            ],
        )?;
        Ok(())
    }

    pub fn remove_instance(&self, id: u64) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM instances WHERE id = ?1", params![id as i64])?;
        Ok(())
    }

    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, rollout, revision, pid, port, start_time FROM instances ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(InstanceRecord {
                id: r.get::<_, i64>(0)? as u64,
                rollout: r.get(1)?,
                revision: r.get(2)?,
                pid: r.get(3)?,
                port: r.get(4)?,
                start_time: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_event(
        &self,
        at: u64,
        rollout: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO events (at, rollout, reason, message) VALUES (?1, ?2, ?3, ?4)",
            params![at as i64, rollout, reason, message],
        )?;
        Ok(())
    }

    /// The latest `limit` events of a rollout, oldest first.
    pub fn events(&self, rollout: &str, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, rollout, reason, message FROM
               (SELECT id, at, rollout, reason, message FROM events WHERE rollout = ?1 ORDER BY id DESC LIMIT ?2)
             ORDER BY id",
        )?;
        let rows = stmt.query_map(params![rollout, limit as i64], |r| {
            Ok(EventRecord {
                at: r.get::<_, i64>(0)? as u64,
                rollout: r.get(1)?,
                reason: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).expect("open");
            s.save_rollout("web", &"spec-1", &42u32, 1).expect("save");
            s.save_rollout("web", &"spec-2", &43u32, 2).expect("update");
            s.add_instance(&InstanceRecord {
                id: 7,
                rollout: "web".into(),
                revision: "abc".into(),
                pid: 1234,
                port: 40000,
                start_time: 99,
            })
            .expect("instance");
            s.add_event(5, "web", "Promoted", "done").expect("event");
            s.set_meta("route_version", "12").expect("meta");
        }
        let s = Store::open(&path).expect("reopen");
        let r: Vec<(String, String, u32)> = s.rollouts().expect("rollouts");
        assert_eq!(r, vec![("web".to_string(), "spec-2".to_string(), 43)]);
        assert_eq!(s.instances().expect("instances")[0].port, 40000);
        s.remove_instance(7).expect("remove");
        assert!(s.instances().expect("instances").is_empty());
        assert_eq!(s.events("web", 10).expect("events")[0].reason, "Promoted");
        assert_eq!(
            s.meta("route_version").expect("meta").as_deref(),
            Some("12")
        );
    }
}

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
             CREATE TABLE IF NOT EXISTS revision_specs (
                 rollout TEXT NOT NULL,
                 revision TEXT NOT NULL,
                 spec TEXT NOT NULL,
                 PRIMARY KEY (rollout, revision));
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

    /// Records every rollout of one `apply` in one transaction: all of them change, or
    /// (a full disk, a kill midway) none does. Each is `(name, spec, status, revision)`;
    /// the revision's spec is kept for `history --diff`.
    pub fn save_applied<S: Serialize, T: Serialize>(
        &self,
        rollouts: &[(&str, &S, &T, &str)],
        now: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (name, spec, status, revision) in rollouts {
            let spec_text = serde_json::to_string(spec).map_err(|source| StoreError::Decode {
                what: format!("spec of {name}"),
                source,
            })?;
            let status_text =
                serde_json::to_string(status).map_err(|source| StoreError::Decode {
                    what: format!("status of {name}"),
                    source,
                })?;
            tx.execute(
                "INSERT INTO rollouts (name, spec, status, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET spec = ?2, status = ?3, updated_at = ?4",
                params![name, spec_text, status_text, now as i64],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO revision_specs (rollout, revision, spec)
                 VALUES (?1, ?2, ?3)",
                params![name, revision, spec_text],
            )?;
        }
        tx.commit()?;
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

    /// Keeps the spec that first introduced a revision, for `history --diff`.
    pub fn save_revision_spec<S: Serialize>(
        &self,
        rollout: &str,
        revision: &str,
        spec: &S,
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(|source| StoreError::Decode {
            what: format!("spec of {rollout} revision {revision}"),
            source,
        })?;
        self.conn().execute(
            "INSERT OR IGNORE INTO revision_specs (rollout, revision, spec) VALUES (?1, ?2, ?3)",
            params![rollout, revision, spec],
        )?;
        Ok(())
    }

    pub fn revision_spec<S: DeserializeOwned>(
        &self,
        rollout: &str,
        revision: &str,
    ) -> Result<Option<S>, StoreError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT spec FROM revision_specs WHERE rollout = ?1 AND revision = ?2",
                params![rollout, revision],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|source| StoreError::Decode {
                what: format!("spec of {rollout} revision {revision}"),
                source,
            })
        })
        .transpose()
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

    /// A write that fails midway (here a trigger standing in for a full disk) leaves
    /// every rollout of the apply as it was.
    #[test]
    fn an_apply_is_recorded_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state.db")).expect("open");
        s.save_applied(&[("a", &"a-1", &1u32, "r1"), ("b", &"b-1", &1u32, "r1")], 1)
            .expect("first apply");
        s.conn()
            .execute_batch(
                "CREATE TRIGGER full BEFORE UPDATE ON rollouts WHEN NEW.name = 'b'
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
            )
            .expect("trigger");
        let err = s
            .save_applied(&[("a", &"a-2", &2u32, "r2"), ("b", &"b-2", &2u32, "r2")], 2)
            .expect_err("the second rollout cannot be written");
        assert!(err.to_string().contains("full"), "{err}");
        let r: Vec<(String, String, u32)> = s.rollouts().expect("rollouts");
        assert_eq!(
            r,
            vec![("a".into(), "a-1".into(), 1), ("b".into(), "b-1".into(), 1)],
            "a changed although b could not"
        );
        let kept: Option<String> = s.revision_spec("a", "r2").expect("read");
        assert_eq!(kept, None);
    }

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
            s.save_revision_spec("web", "abc", &"spec-1")
                .expect("revision spec");
            s.save_revision_spec("web", "abc", &"spec-later")
                .expect("first one is kept");
            s.set_meta("route_version", "12").expect("meta");
        }
        let s = Store::open(&path).expect("reopen");
        let r: Vec<(String, String, u32)> = s.rollouts().expect("rollouts");
        assert_eq!(r, vec![("web".to_string(), "spec-2".to_string(), 43)]);
        assert_eq!(s.instances().expect("instances")[0].port, 40000);
        s.remove_instance(7).expect("remove");
        assert!(s.instances().expect("instances").is_empty());
        let kept: Option<String> = s.revision_spec("web", "abc").expect("revision spec");
        assert_eq!(kept.as_deref(), Some("spec-1"));
        assert_eq!(
            s.meta("route_version").expect("meta").as_deref(),
            Some("12")
        );
    }
}

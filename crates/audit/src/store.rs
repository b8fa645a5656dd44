//! The chain in SQLite, with its head mirrored to a file outside the database.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::chain::{Entry, GENESIS, NewEntry, Problem, verify_entries};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("audit head file {path}: {source}")]
    Head {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit head file {path} is not `SEQ HASH`: {text:?}")]
    BadHead { path: PathBuf, text: String },
}

/// The newest entry, as recorded outside the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    pub fn read(path: &Path) -> Result<Option<Head>, AuditError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(AuditError::Head {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let bad = || AuditError::BadHead {
            path: path.to_path_buf(),
            text: text.clone(),
        };
        let (seq, hash) = text.trim().split_once(' ').ok_or_else(bad)?;
        Ok(Some(Head {
            seq: seq.parse().map_err(|_| bad())?,
            hash: hash.to_string(),
        }))
    }

    /// Replaces the file in one rename, so a reader never sees half a head.
    fn write(&self, path: &Path) -> Result<(), AuditError> {
        let err = |source| AuditError::Head {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {}\n", self.seq, self.hash)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub rollout: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    pub since: Option<u64>,
    /// Only the newest `limit` entries (still listed oldest first).
    pub limit: Option<usize>,
}

pub struct AuditLog {
    conn: Mutex<Connection>,
    head_file: Option<PathBuf>,
}

impl AuditLog {
    /// Opens (creating if needed) the chain in the SQLite file `db`. With `head_file`,
    /// every append also records the new head there.
    pub fn open(db: &Path, head_file: Option<PathBuf>) -> Result<AuditLog, AuditError> {
        let conn = Connection::open(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS audit (
                 seq INTEGER PRIMARY KEY,
                 at INTEGER NOT NULL,
                 actor TEXT NOT NULL,
                 action TEXT NOT NULL,
                 rollout TEXT NOT NULL,
                 revision TEXT,
                 spec_digest TEXT,
                 reason TEXT NOT NULL,
                 prev_hash TEXT NOT NULL,
                 hash TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS audit_rollout ON audit (rollout, seq);",
        )?;
        Ok(AuditLog {
            conn: Mutex::new(conn),
            head_file,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one entry. The read of the last entry and the insert happen in one
    /// IMMEDIATE transaction: a second writer waits, so the chain never forks.
    pub fn append(&self, new: NewEntry, at: u64) -> Result<Entry, AuditError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: Option<(u64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        let (seq, prev) = match last {
            Some((s, h)) => (s + 1, h),
            None => (1, GENESIS.to_string()),
        };
        let e = Entry::seal(new, seq, at, prev);
        tx.execute(
            "INSERT INTO audit (seq, at, actor, action, rollout, revision, spec_digest, reason, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                e.seq as i64,
                e.at as i64,
                e.actor,
                e.action,
                e.rollout,
                e.revision,
                e.spec_digest,
                e.reason,
                e.prev_hash,
                e.hash
            ],
        )?;
        tx.commit()?;
        drop(conn);
        if let Some(path) = &self.head_file {
            Head {
                seq: e.seq,
                hash: e.hash.clone(),
            }
            .write(path)?;
        }
        Ok(e)
    }

    pub fn list(&self, f: &Filter) -> Result<Vec<Entry>, AuditError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at, actor, action, rollout, revision, spec_digest, reason, prev_hash, hash
             FROM audit
             WHERE (?1 IS NULL OR rollout = ?1) AND (?2 IS NULL OR at >= ?2)
             ORDER BY seq DESC LIMIT ?3",
        )?;
        let limit = f.limit.map_or(-1, |l| l as i64);
        let rows = stmt.query_map(params![f.rollout, f.since.map(|s| s as i64), limit], row)?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Checks the whole chain, and that it reaches `head` when one is given.
    pub fn verify(&self, head: Option<&Head>) -> Result<(usize, Option<Problem>), AuditError> {
        let entries = self.list(&Filter::default())?;
        if let Some(p) = verify_entries(&entries) {
            return Ok((entries.len(), Some(p)));
        }
        if let Some(h) = head {
            match entries.iter().find(|e| e.seq == h.seq) {
                Some(e) if e.hash == h.hash => {}
                Some(_) => return Ok((entries.len(), Some(Problem::HeadMismatch { seq: h.seq }))),
                None => {
                    return Ok((
                        entries.len(),
                        Some(Problem::Truncated {
                            head_seq: h.seq,
                            last_seq: entries.last().map_or(0, |e| e.seq),
                        }),
                    ));
                }
            }
        }
        Ok((entries.len(), None))
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        seq: r.get::<_, i64>(0)? as u64,
        at: r.get::<_, i64>(1)? as u64,
        actor: r.get(2)?,
        action: r.get(3)?,
        rollout: r.get(4)?,
        revision: r.get(5)?,
        spec_digest: r.get(6)?,
        reason: r.get(7)?,
        prev_hash: r.get(8)?,
        hash: r.get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> NewEntry {
        NewEntry {
            actor: "baton".into(),
            action: "step".into(),
            rollout: if i.is_multiple_of(2) { "web" } else { "api" }.into(),
            revision: Some("abc".into()),
            spec_digest: None,
            reason: format!("step {i}"),
        }
    }

    fn sql(db: &Path, q: &str) {
        Connection::open(db)
            .and_then(|c| c.execute_batch(q))
            .expect("tamper");
    }

    #[test]
    fn tampering_with_the_file_is_detected_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("state.db");
        let head_file = dir.path().join("audit.head");
        let log = AuditLog::open(&db, Some(head_file.clone())).expect("open");
        for i in 0..200 {
            log.append(entry(i), 1000 + i as u64).expect("append");
        }
        let head = Head::read(&head_file).expect("read").expect("head");
        assert_eq!(head.seq, 200);
        assert_eq!(log.verify(Some(&head)).expect("verify"), (200, None));
        assert_eq!(
            log.list(&Filter {
                rollout: Some("web".into()),
                ..Filter::default()
            })
            .expect("list")
            .len(),
            100
        );
        assert_eq!(
            log.list(&Filter {
                since: Some(1190),
                ..Filter::default()
            })
            .expect("list")
            .len(),
            10
        );
        let last3 = log
            .list(&Filter {
                limit: Some(3),
                ..Filter::default()
            })
            .expect("list");
        assert_eq!(
            last3.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![198, 199, 200]
        );
        // Closing the last connection checkpoints the WAL into the file we copy.
        drop(log);

        let cases: [(&str, &str); 4] = [
            (
                "UPDATE audit SET reason = 'nothing happened' WHERE seq = 57",
                "entry 57 was altered",
            ),
            ("DELETE FROM audit WHERE seq = 120", "entry 120 was removed"),
            (
                "UPDATE audit SET seq = -1 WHERE seq = 30; UPDATE audit SET seq = 30 WHERE seq = 31; UPDATE audit SET seq = 31 WHERE seq = -1;",
                "entry 30",
            ),
            ("DELETE FROM audit WHERE seq > 190", "truncated"),
        ];
        for (tamper, want) in cases {
            let copy = dir.path().join("copy.db");
            std::fs::copy(&db, &copy).expect("copy");
            sql(&copy, tamper);
            let (_, problem) = AuditLog::open(&copy, None)
                .expect("open")
                .verify(Some(&head))
                .expect("verify");
            let text = problem.map(|p| p.to_string()).unwrap_or_default();
            assert!(text.contains(want), "{tamper}: {text:?}");
            let _ = std::fs::remove_file(&copy);
        }
    }

    #[test]
    fn concurrent_writers_in_several_connections_never_fork_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("state.db");
        AuditLog::open(&db, None).expect("create");
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let db = db.clone();
                std::thread::spawn(move || {
                    // Each writer has its own connection, as separate processes would.
                    let log = AuditLog::open(&db, None).expect("open");
                    for i in 0..50 {
                        log.append(entry(w * 100 + i), 1).expect("append");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let (n, problem) = AuditLog::open(&db, None)
            .expect("open")
            .verify(None)
            .expect("verify");
        assert_eq!(n, 200);
        assert_eq!(problem, None);
    }
}

//! The chain in SQLite, with its head mirrored to a file outside the database.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior, params};

use crate::chain::{Entry, Key, NewEntry, Problem, Verdict, check, check_tail};
use crate::head::{Head, HeadError};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Head(#[from] HeadError),
    /// Appending would bless a truncated or rewritten trail with a new head.
    #[error(
        "nothing appended to the audit trail: {problem} (its head is recorded in {}; if the trail was reset on purpose, remove that file to start a new one)",
        head.display()
    )]
    Refused { problem: Problem, head: PathBuf },
    #[error(
        "nothing appended to the audit trail: it is signed (entry {seq} carries a MAC), and no audit key was given"
    )]
    NeedsKey { seq: u64 },
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
    key: Option<Key>,
}

/// Writes `e` alone as the head if it is still the newest entry.
fn settle_head(conn: &mut Connection, e: &Entry, path: &Path) -> Result<(), AuditError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let last: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
    if u64::try_from(last).ok() == Some(e.seq) {
        Head::of(e).write(path)?;
    }
    tx.commit()?;
    Ok(())
}

const COLUMNS: &str =
    "seq, at, actor, action, rollout, revision, spec_digest, reason, prev_hash, hash, mac";

impl AuditLog {
    /// Opens (creating if needed) the chain in the SQLite file `db`. With `head_file`,
    /// every append first checks the trail against the head recorded there, then
    /// records the new one.
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
        // Trails from before keys had no MAC column: entries there stay unsigned.
        let has_mac = |c: &Connection| -> rusqlite::Result<bool> {
            c.prepare("SELECT 1 FROM pragma_table_info('audit') WHERE name = 'mac'")?
                .exists([])
        };
        if !has_mac(&conn)?
            && let Err(e) = conn.execute_batch("ALTER TABLE audit ADD COLUMN mac TEXT")
            // Another process may have added it in between.
            && !has_mac(&conn)?
        {
            return Err(e.into());
        }
        Ok(AuditLog {
            conn: Mutex::new(conn),
            head_file,
            key: None,
        })
    }

    /// Signs every new entry with `key`, and checks MACs with it.
    pub fn with_key(mut self, key: Option<Key>) -> AuditLog {
        self.key = key;
        self
    }

    pub fn head_file(&self) -> Option<&Path> {
        self.head_file.as_deref()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one entry. The read of the trail's end and the insert happen in one
    /// IMMEDIATE transaction: a second writer waits, so the chain never forks. A
    /// trail that no longer reaches its recorded head (truncated, rewritten, or with
    /// unsigned entries after it) is refused: appending would hide that. The new head
    /// is written before the commit, as pending (see `head`), so a crash on either side
    /// of the commit leaves a head the trail matches.
    pub fn append(&self, new: NewEntry, at: u64) -> Result<Entry, AuditError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last_seq: u64 = tx
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| {
                r.get::<_, i64>(0)
            })?
            .try_into()
            .unwrap_or(0);
        let head = match &self.head_file {
            Some(p) => Head::read(p)?,
            None => None,
        };
        let from = head.as_ref().map_or(last_seq, |h| h.seq.min(last_seq));
        let tail = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS} FROM audit WHERE seq >= ?1 ORDER BY seq"
            ))?;
            let rows = stmt.query_map(params![from as i64], row)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        if let Some(problem) = check_tail(&tail, last_seq, head.as_ref(), self.key.as_ref()) {
            return Err(AuditError::Refused {
                problem,
                head: self.head_file.clone().unwrap_or_default(),
            });
        }
        let prev = tail.last();
        if let (None, Some(p)) = (&self.key, prev.filter(|p| p.mac.is_some())) {
            return Err(AuditError::NeedsKey { seq: p.seq });
        }
        let e = Entry::after(prev, new, at, self.key.as_ref());
        tx.execute(
            &format!("INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
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
                e.hash,
                e.mac
            ],
        )?;
        if let Some(path) = &self.head_file {
            Head::before_commit(prev, &e).write(path)?;
            tx.commit()?;
            // Under the write lock again, so that a writer that appended after us is
            // never overwritten with an older head. The head before the commit holds
            // either way: a failure here (a full disk) leaves it until the next append.
            let _ = settle_head(&mut conn, &e, path);
        } else {
            tx.commit()?;
        }
        Ok(e)
    }

    pub fn list(&self, f: &Filter) -> Result<Vec<Entry>, AuditError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS}
             FROM audit
             WHERE (?1 IS NULL OR rollout = ?1) AND (?2 IS NULL OR at >= ?2)
             ORDER BY seq DESC LIMIT ?3"
        ))?;
        let limit = f.limit.map_or(-1, |l| l as i64);
        let rows = stmt.query_map(params![f.rollout, f.since.map(|s| s as i64), limit], row)?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Checks the whole chain, its MACs (with the key this log was opened with), and
    /// that it reaches `head` when one is given.
    pub fn verify(&self, head: Option<&Head>) -> Result<Verdict, AuditError> {
        let entries = self.list(&Filter::default())?;
        Ok(check(&entries, head, self.key.as_ref()))
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
        mac: r.get(10)?,
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
        let v = log.verify(Some(&head)).expect("verify");
        assert_eq!((v.entries, v.problem), (200, None));
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
            let v = AuditLog::open(&copy, None)
                .expect("open")
                .verify(Some(&head))
                .expect("verify");
            let text = v.problem.map(|p| p.to_string()).unwrap_or_default();
            assert!(text.contains(want), "{tamper}: {text:?}");
            let _ = std::fs::remove_file(&copy);
        }
    }

    fn key() -> Key {
        Key::from_text("0123456789abcdef0123456789abcdef").expect("key")
    }

    /// A keyed log with `n` entries and its head file.
    fn keyed(dir: &Path, n: usize) -> (PathBuf, PathBuf, AuditLog) {
        let db = dir.join("state.db");
        let head_file = dir.join("elsewhere").join("audit.head");
        let log = AuditLog::open(&db, Some(head_file.clone()))
            .expect("open")
            .with_key(Some(key()));
        for i in 0..n {
            log.append(entry(i), 1000 + i as u64).expect("append");
        }
        (db, head_file, log)
    }

    fn verdict(log: &AuditLog, head_file: &Path) -> Option<Problem> {
        let head = Head::read(head_file).expect("read head");
        log.verify(head.as_ref()).expect("verify").problem
    }

    #[test]
    fn a_truncated_trail_stays_truncated_and_refuses_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, head_file, log) = keyed(dir.path(), 20);
        sql(&db, "DELETE FROM audit WHERE seq > 17");
        let truncated = Some(Problem::Truncated {
            head_seq: 20,
            last_seq: 17,
        });
        assert_eq!(verdict(&log, &head_file), truncated);
        // The next append neither reuses seq 18 nor moves the head back.
        let refused = log.append(entry(99), 5000);
        assert!(
            matches!(&refused, Err(AuditError::Refused { problem, .. }) if Some(problem) == truncated.as_ref()),
            "{refused:?}"
        );
        assert_eq!(verdict(&log, &head_file), truncated);
        assert_eq!(
            Head::read(&head_file).expect("read").map(|h| h.seq),
            Some(20)
        );
        // A writer of its own (another process) is refused the same way.
        let other = AuditLog::open(&db, Some(head_file.clone()))
            .expect("open")
            .with_key(Some(key()));
        assert!(matches!(
            other.append(entry(98), 5001),
            Err(AuditError::Refused { .. })
        ));
    }

    /// A controller SIGKILLed between writing the head and committing its entry (seen
    /// in the chaos soak) left a head one entry past the trail: every later append was
    /// refused as "truncated". The head written before a commit names the entry as
    /// pending, so the trail holds on either side of the commit.
    #[test]
    fn a_kill_on_either_side_of_the_commit_leaves_a_trail_that_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, head_file, log) = keyed(dir.path(), 5);
        let last = log
            .list(&Filter::default())
            .expect("list")
            .pop()
            .expect("an entry");
        // Killed before the commit: the head names entry 6, the trail never got it.
        let lost = Entry::after(Some(&last), entry(50), 6000, Some(&key()));
        Head::before_commit(Some(&last), &lost)
            .write(&head_file)
            .expect("write");
        assert_eq!(verdict(&log, &head_file), None);
        let e = log.append(entry(6), 6001).expect("append after the kill");
        assert_eq!(e.seq, 6);
        assert_eq!(verdict(&log, &head_file), None);
        // Killed after the commit, before the head moved on: the pending entry is there.
        let next = Entry::after(Some(&e), entry(7), 7000, Some(&key()));
        Head::before_commit(Some(&e), &next)
            .write(&head_file)
            .expect("write");
        assert_eq!(verdict(&log, &head_file), None);
        // A pending entry is no cover for another entry at its place.
        let other = Entry::after(Some(&last), entry(51), 6002, Some(&key()));
        Head::before_commit(Some(&last), &other)
            .write(&head_file)
            .expect("write");
        assert_eq!(
            verdict(&log, &head_file),
            Some(Problem::HeadMismatch { seq: 6 })
        );
        // Nor, with no committed entry before it, for another first entry.
        let empty = Entry::after(None, entry(52), 1, Some(&key()));
        Head::before_commit(None, &empty)
            .write(&head_file)
            .expect("write");
        assert_eq!(
            verdict(&log, &head_file),
            Some(Problem::HeadMismatch { seq: 1 })
        );
        let head = Head::before_commit(Some(&e), &next);
        assert_eq!(Head::parse(&head.text(), "test").expect("parse"), head);
        assert!(Head::parse("6 ab\npending 7 cd", "test").is_err());
        assert!(Head::parse(&format!("{}extra\n", head.text()), "test").is_err());
    }

    #[test]
    fn entries_forged_after_the_head_or_over_it_are_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, head_file, log) = keyed(dir.path(), 10);
        let all = log.list(&Filter::default()).expect("list");
        let insert = |e: &Entry| {
            sql(
                &db,
                &format!(
                    "INSERT INTO audit ({COLUMNS}) VALUES ({}, {}, '{}', '{}', '{}', NULL, NULL, '{}', '{}', '{}', {})",
                    e.seq,
                    e.at,
                    e.actor,
                    e.action,
                    e.rollout,
                    e.reason,
                    e.prev_hash,
                    e.hash,
                    e.mac
                        .as_ref()
                        .map_or("NULL".to_string(), |m| format!("'{m}'"))
                ),
            )
        };
        let forged = |key: Option<&Key>| {
            let mut n = entry(0);
            n.reason = "nothing happened".into();
            n.revision = None;
            Entry::after(all.last(), n, 2000, key)
        };
        // Unsigned, and signed with another key: each after the recorded head.
        let other = Key::from_text("another key, not the trail's one").expect("key");
        for (e, want) in [
            (forged(None), Problem::Unsigned { seq: 11 }),
            (forged(Some(&other)), Problem::Forged { seq: 11 }),
        ] {
            insert(&e);
            assert_eq!(verdict(&log, &head_file), Some(want.clone()));
            let refused = log.append(entry(1), 3000);
            assert!(
                matches!(&refused, Err(AuditError::Refused { problem, .. }) if *problem == want),
                "{refused:?}"
            );
            sql(&db, "DELETE FROM audit WHERE seq = 11");
        }
        // The whole chain rewritten from entry 4 on, without the key: caught with no
        // head at all.
        let mut prev = all[2].clone();
        for e in &all[3..] {
            let mut n = entry(e.seq as usize);
            n.revision = None;
            n.reason = format!("rewritten {}", e.seq);
            let x = Entry::after(Some(&prev), n, e.at, None);
            sql(&db, &format!("DELETE FROM audit WHERE seq = {}", e.seq));
            insert(&x);
            prev = x;
        }
        let v = log.verify(None).expect("verify");
        assert_eq!(v.problem, Some(Problem::Unsigned { seq: 4 }));
        assert!(v.macs_checked);
    }

    #[test]
    fn old_unsigned_trails_verify_and_go_on_signed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("state.db");
        // A trail as written before keys: no `mac` column.
        sql(
            &db,
            "CREATE TABLE audit (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, actor TEXT NOT NULL,
             action TEXT NOT NULL, rollout TEXT NOT NULL, revision TEXT, spec_digest TEXT,
             reason TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        );
        let mut prev: Option<Entry> = None;
        for i in 0..5 {
            let e = Entry::after(prev.as_ref(), entry(i), 100 + i as u64, None);
            sql(
                &db,
                &format!(
                    "INSERT INTO audit VALUES ({}, {}, '{}', '{}', '{}', 'abc', NULL, '{}', '{}', '{}')",
                    e.seq, e.at, e.actor, e.action, e.rollout, e.reason, e.prev_hash, e.hash
                ),
            );
            prev = Some(e);
        }
        let head_file = dir.path().join("head");
        let log = AuditLog::open(&db, Some(head_file.clone()))
            .expect("open")
            .with_key(Some(key()));
        let v = log.verify(None).expect("verify");
        assert_eq!((v.entries, v.signed, v.problem), (5, 0, None));
        let e = log.append(entry(5), 200).expect("append");
        assert!(e.mac.is_some());
        let v = log
            .verify(Head::read(&head_file).expect("head").as_ref())
            .expect("verify");
        assert_eq!((v.entries, v.signed, v.problem), (6, 1, None));
        // Once signed, always signed: an entry without a MAC after a signed one shows.
        let e = log.append(entry(6), 201).expect("append");
        sql(&db, "UPDATE audit SET mac = NULL WHERE seq = 7");
        assert_eq!(
            log.verify(None).expect("verify").problem,
            Some(Problem::Unsigned { seq: 7 })
        );
        // And a writer without the key may not go on with a signed trail.
        sql(
            &db,
            &format!(
                "UPDATE audit SET mac = '{}' WHERE seq = 7",
                e.mac.unwrap_or_default()
            ),
        );
        let keyless = AuditLog::open(&db, Some(head_file)).expect("open");
        assert!(matches!(
            keyless.append(entry(7), 300),
            Err(AuditError::NeedsKey { seq: 7 })
        ));
    }

    #[test]
    fn concurrent_writers_in_several_connections_never_fork_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("state.db");
        let head_file = dir.path().join("audit.head");
        AuditLog::open(&db, None).expect("create");
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (db, head_file) = (db.clone(), head_file.clone());
                std::thread::spawn(move || {
                    // Each writer has its own connection, as separate processes would.
                    let log = AuditLog::open(&db, Some(head_file))
                        .expect("open")
                        .with_key(Some(key()));
                    for i in 0..50 {
                        log.append(entry(w * 100 + i), 1).expect("append");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let log = AuditLog::open(&db, None)
            .expect("open")
            .with_key(Some(key()));
        // Heads are written in the writers' order: the last one is the newest entry.
        let head = Head::read(&head_file).expect("read").expect("head");
        assert_eq!(head.seq, 200);
        let v = log.verify(Some(&head)).expect("verify");
        assert_eq!((v.entries, v.signed, v.problem), (200, 200, None));
    }
}

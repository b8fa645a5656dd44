//! Entries and the chain rule, independent of where entries are stored.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a caller records; the log adds sequence number, time and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewEntry {
    /// Who: the API identity (`admin`, `admin/alice` when the client names its user),
    /// `baton` for the controller's own decisions, `os:USER` for local commands.
    pub actor: String,
    /// What: `apply`, `step`, `traffic`, `gate`, `promote`, `abort`, `retry`, `undo`,
    /// `rollback`, `config`, ...
    pub action: String,
    pub rollout: String,
    pub revision: Option<String>,
    /// SHA-256 of the rollout's spec (JSON) in force when the entry was made.
    pub spec_digest: Option<String>,
    /// Why, in words.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    pub actor: String,
    pub action: String,
    pub rollout: String,
    pub revision: Option<String>,
    pub spec_digest: Option<String>,
    pub reason: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of the first entry's predecessor.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 of bytes.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fields that are hashed, in a fixed order (serde keeps struct field order).
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    at: u64,
    actor: &'a str,
    action: &'a str,
    rollout: &'a str,
    revision: &'a Option<String>,
    spec_digest: &'a Option<String>,
    reason: &'a str,
    prev_hash: &'a str,
}

impl Entry {
    pub fn compute_hash(&self) -> String {
        let h = Hashed {
            seq: self.seq,
            at: self.at,
            actor: &self.actor,
            action: &self.action,
            rollout: &self.rollout,
            revision: &self.revision,
            spec_digest: &self.spec_digest,
            reason: &self.reason,
            prev_hash: &self.prev_hash,
        };
        digest(&serde_json::to_vec(&h).unwrap_or_default())
    }

    /// The entry that follows `prev` (the first one when there is none).
    pub fn after(prev: Option<&Entry>, n: NewEntry, at: u64) -> Entry {
        let (seq, prev_hash) =
            prev.map_or((1, GENESIS.to_string()), |p| (p.seq + 1, p.hash.clone()));
        Entry::seal(n, seq, at, prev_hash)
    }

    pub(crate) fn seal(n: NewEntry, seq: u64, at: u64, prev_hash: String) -> Entry {
        let mut e = Entry {
            seq,
            at,
            actor: n.actor,
            action: n.action,
            rollout: n.rollout,
            revision: n.revision,
            spec_digest: n.spec_digest,
            reason: n.reason,
            prev_hash,
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        e
    }
}

/// The first place the chain is broken, named by entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Problem {
    /// The entry's content no longer matches its hash.
    Altered { seq: u64 },
    /// Entries are missing before this one (a gap in the sequence).
    Removed { expected: u64, found: u64 },
    /// The entry is stored where another belongs.
    Reordered { seq: u64, after: u64 },
    /// The entry's link to its predecessor is broken: the predecessor was rewritten
    /// (hash recomputed) or replaced.
    LinkBroken { seq: u64 },
    /// The chain ends before the head recorded outside it.
    Truncated { head_seq: u64, last_seq: u64 },
    /// The entry at the external head's position is not the one recorded.
    HeadMismatch { seq: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Altered { seq } => write!(
                f,
                "entry {seq} was altered: its content does not match its hash"
            ),
            Problem::Removed { expected, found } => write!(
                f,
                "entry {expected} was removed: the entry after {} is {found}",
                expected.saturating_sub(1)
            ),
            Problem::Reordered { seq, after } => write!(
                f,
                "entry {seq} is out of place: it is stored right after entry {after} (reordered)"
            ),
            Problem::LinkBroken { seq } => write!(
                f,
                "entry {} was rewritten or replaced: entry {seq} no longer links to it",
                seq.saturating_sub(1)
            ),
            Problem::Truncated { head_seq, last_seq } => write!(
                f,
                "the chain was truncated: the recorded head is entry {head_seq} but the last entry is {last_seq}"
            ),
            Problem::HeadMismatch { seq } => write!(
                f,
                "entry {seq} differs from the head recorded outside the database"
            ),
        }
    }
}

/// Checks entries in stored order; `None` when the chain is intact.
pub fn verify_entries(entries: &[Entry]) -> Option<Problem> {
    let mut prev: Option<&Entry> = None;
    for (i, e) in entries.iter().enumerate() {
        let expected = prev.map_or(1, |p| p.seq + 1);
        if e.compute_hash() != e.hash {
            return Some(Problem::Altered { seq: e.seq });
        }
        if e.seq != expected {
            let later = entries[i + 1..].iter().any(|x| x.seq == expected);
            return Some(if later {
                Problem::Reordered {
                    seq: e.seq,
                    after: expected - 1,
                }
            } else {
                Problem::Removed {
                    expected,
                    found: e.seq,
                }
            });
        }
        if e.prev_hash != prev.map_or(GENESIS, |p| p.hash.as_str()) {
            return Some(Problem::LinkBroken { seq: e.seq });
        }
        prev = Some(e);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for i in 1..=n {
            let prev = out.last().map_or(GENESIS.to_string(), |e| e.hash.clone());
            out.push(Entry::seal(
                NewEntry {
                    actor: "baton".into(),
                    action: "step".into(),
                    rollout: "web".into(),
                    revision: Some("abc".into()),
                    spec_digest: None,
                    reason: format!("step {i}"),
                },
                i,
                1000 + i,
                prev,
            ));
        }
        out
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify_entries(&chain(50)), None);
        assert_eq!(verify_entries(&chain(0)), None);
    }

    #[test]
    fn every_kind_of_tampering_names_the_entry() {
        let mut c = chain(10);
        c[4].reason = "nothing to see".into();
        assert_eq!(verify_entries(&c), Some(Problem::Altered { seq: 5 }));

        let mut c = chain(10);
        c.remove(6);
        assert_eq!(
            verify_entries(&c),
            Some(Problem::Removed {
                expected: 7,
                found: 8
            })
        );

        let mut c = chain(10);
        c.swap(2, 3);
        assert_eq!(
            verify_entries(&c),
            Some(Problem::Reordered { seq: 4, after: 2 })
        );

        // Rewriting an entry *and* its hash still breaks the link to the next one.
        let mut c = chain(10);
        c[2].reason = "forged".into();
        c[2].hash = c[2].compute_hash();
        let p = verify_entries(&c);
        assert_eq!(p, Some(Problem::LinkBroken { seq: 4 }));
        assert!(
            p.map(|p| p.to_string())
                .unwrap_or_default()
                .starts_with("entry 3 was rewritten")
        );
    }
}

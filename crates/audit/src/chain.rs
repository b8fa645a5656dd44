//! Entries and the chain rule, independent of where entries are stored.

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::head::Head;

type HmacSha256 = hmac::Hmac<Sha256>;

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
    /// HMAC-SHA256 of `hash` under the audit key: without the key no entry can be
    /// forged, nor the chain rewritten from any entry on. Absent on entries written
    /// before the trail had a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The hash of the first entry's predecessor.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 of bytes.
pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret that signs entries. Kept out of the trail's reach (another file, the
/// environment): whoever can write the trail but not read the key can neither forge
/// an entry nor rewrite the chain.
#[derive(Clone)]
pub struct Key(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the audit key is {len} bytes long: it needs at least {min}")]
    TooShort { len: usize, min: usize },
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// Shorter keys are refused: a guessable key protects nothing.
    pub const MIN_LEN: usize = 16;

    /// The key as written in a file or an environment variable: its bytes, without
    /// surrounding whitespace (a trailing newline is not part of the key).
    pub fn from_text(text: &str) -> Result<Key, KeyError> {
        let k = text.trim().as_bytes();
        if k.len() < Key::MIN_LEN {
            return Err(KeyError::TooShort {
                len: k.len(),
                min: Key::MIN_LEN,
            });
        }
        Ok(Key(k.to_vec()))
    }

    /// A new key as text (64 hex digits from the kernel's generator).
    pub fn generate() -> std::io::Result<String> {
        use std::io::Read;
        let mut buf = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
        Ok(hex(&buf))
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(b"baton-audit-entry-v1\n");
        m
    }

    /// The MAC of an entry's hash (which covers its content and its link).
    pub fn sign(&self, hash: &str) -> String {
        let mut m = self.hmac();
        m.update(hash.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// Whether `mac` is this key's MAC of `hash` (compared in constant time).
    pub fn signed(&self, hash: &str, mac: &str) -> bool {
        let Some(bytes) = unhex(mac) else {
            return false;
        };
        let mut m = self.hmac();
        m.update(hash.as_bytes());
        m.verify_slice(&bytes).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
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

    /// The entry that follows `prev` (the first one when there is none), signed with
    /// `key` when there is one.
    pub fn after(prev: Option<&Entry>, n: NewEntry, at: u64, key: Option<&Key>) -> Entry {
        let (seq, prev_hash) =
            prev.map_or((1, GENESIS.to_string()), |p| (p.seq + 1, p.hash.clone()));
        Entry::seal(n, seq, at, prev_hash, key)
    }

    pub(crate) fn seal(
        n: NewEntry,
        seq: u64,
        at: u64,
        prev_hash: String,
        key: Option<&Key>,
    ) -> Entry {
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
            mac: None,
        };
        e.hash = e.compute_hash();
        e.mac = key.map(|k| k.sign(&e.hash));
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
    /// The entry's MAC does not match the key: forged (or signed with another key).
    Forged { seq: u64 },
    /// The entry has no MAC where one is required: after a signed entry, or after
    /// the recorded head of a signed trail.
    Unsigned { seq: u64 },
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
                "entry {seq} differs from the head recorded outside the trail (the chain was rewritten from there on)"
            ),
            Problem::Forged { seq } => write!(
                f,
                "entry {seq} was forged or altered: its MAC does not match the audit key (or it was signed with another key)"
            ),
            Problem::Unsigned { seq } => write!(
                f,
                "entry {seq} carries no MAC: it was written without the audit key (forged), or its MAC was removed"
            ),
        }
    }
}

/// Checks entries in stored order; `None` when the chain is intact. The hash chain
/// alone: `check` adds the MACs and the head.
pub fn verify_entries(entries: &[Entry]) -> Option<Problem> {
    verify_links(entries, None)
}

/// The chain rule over `entries`, the first of which follows `prev` (or is the first
/// entry of all).
fn verify_links<'a>(entries: &'a [Entry], mut prev: Option<&'a Entry>) -> Option<Problem> {
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

/// What checking a whole trail found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub entries: usize,
    /// Entries that carry a MAC.
    pub signed: usize,
    /// Whether the MACs were checked (a key was given).
    pub macs_checked: bool,
    pub problem: Option<Problem>,
}

/// Checks a whole trail: the hash chain; the MACs (against `key` when given: each
/// MAC valid, and no unsigned entry after a signed one, nor after the head); and
/// that it still reaches `head`, the newest entry as recorded outside it, which
/// also marks the highest sequence number ever written (so truncation shows).
pub fn check(entries: &[Entry], head: Option<&Head>, key: Option<&Key>) -> Verdict {
    let signed = entries.iter().filter(|e| e.mac.is_some()).count();
    let problem = verify_entries(entries)
        .or_else(|| check_macs(entries, head, key))
        .or_else(|| head.and_then(|h| h.problem(entries.last(), |seq| find(entries, seq))));
    Verdict {
        entries: entries.len(),
        signed,
        macs_checked: key.is_some(),
        problem,
    }
}

fn find(entries: &[Entry], seq: u64) -> Option<&Entry> {
    // Sequence numbers are dense from 1 once the chain verified; search otherwise.
    match entries.get((seq as usize).wrapping_sub(1)) {
        Some(e) if e.seq == seq => Some(e),
        _ => entries.iter().find(|e| e.seq == seq),
    }
}

/// Each MAC valid (with a key); no entry without one after a signed entry; with a key,
/// none without one after the head either (the head pins what comes before it).
fn check_macs(entries: &[Entry], head: Option<&Head>, key: Option<&Key>) -> Option<Problem> {
    let mut seen_signed = false;
    for e in entries {
        match (&e.mac, key) {
            (Some(mac), Some(k)) if !k.signed(&e.hash, mac) => {
                return Some(Problem::Forged { seq: e.seq });
            }
            (Some(_), _) => seen_signed = true,
            (None, _) if seen_signed => return Some(Problem::Unsigned { seq: e.seq }),
            (None, Some(_)) if head.is_some_and(|h| e.seq > h.seq && h.seq > 0) => {
                return Some(Problem::Unsigned { seq: e.seq });
            }
            (None, _) => {}
        }
    }
    None
}

/// Before an append: does the stored trail still extend the recorded head? `tail` is
/// the stored entries from the head's sequence number on (from the newest entry when
/// there is no head), `last_seq` the newest stored sequence number (0: none). An
/// append to a trail that fails this would bless a truncated or forged trail with a
/// new head, so it is refused.
pub fn check_tail(
    tail: &[Entry],
    last_seq: u64,
    head: Option<&Head>,
    key: Option<&Key>,
) -> Option<Problem> {
    let h = head?;
    if last_seq < h.seq {
        return Some(Problem::Truncated {
            head_seq: h.seq,
            last_seq,
        });
    }
    if let Some(p) = h.problem(tail.last(), |seq| tail.iter().find(|e| e.seq == seq)) {
        return Some(p);
    }
    let (first, rest) = tail.split_first()?;
    verify_links(rest, Some(first)).or_else(|| {
        // Everything after the head must be signed once the trail is (or a key is given).
        let mut seen_signed = first.mac.is_some();
        for e in rest {
            match (&e.mac, key) {
                (Some(mac), Some(k)) if !k.signed(&e.hash, mac) => {
                    return Some(Problem::Forged { seq: e.seq });
                }
                (Some(_), _) => seen_signed = true,
                (None, Some(_)) => return Some(Problem::Unsigned { seq: e.seq }),
                (None, None) if seen_signed => return Some(Problem::Unsigned { seq: e.seq }),
                (None, None) => {}
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Entry> {
        keyed_chain(n, None)
    }

    fn keyed_chain(n: u64, key: Option<&Key>) -> Vec<Entry> {
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
                key,
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

    #[test]
    fn signed_entries_verify_only_with_their_key() {
        let key = Key::from_text("  a key of sixteen bytes or more\n").expect("key");
        let c = keyed_chain(5, Some(&key));
        let v = check(&c, Some(&Head::of(&c[4])), Some(&key));
        assert_eq!((v.entries, v.signed, v.problem), (5, 5, None));
        let other = Key::from_text("some other key of enough bytes").expect("key");
        assert_eq!(
            check(&c, None, Some(&other)).problem,
            Some(Problem::Forged { seq: 1 })
        );
        // Without a key the chain is checked, not the MACs.
        let v = check(&c, None, None);
        assert_eq!((v.macs_checked, v.problem), (false, None));
        assert!(matches!(
            Key::from_text("short\n"),
            Err(KeyError::TooShort { len: 5, .. })
        ));
        assert_eq!(format!("{key:?}"), "Key(…)");
    }

    #[test]
    fn the_head_catches_truncation_and_rewriting() {
        let c = chain(10);
        let head = Head::of(&c[9]);
        assert_eq!(
            check(&c[..7], Some(&head), None).problem,
            Some(Problem::Truncated {
                head_seq: 10,
                last_seq: 7
            })
        );
        let mut other = chain(10);
        other[9].reason = "rewritten".into();
        other[9].hash = other[9].compute_hash();
        assert_eq!(
            check(&other, Some(&head), None).problem,
            Some(Problem::HeadMismatch { seq: 10 })
        );
        assert_eq!(check_tail(&c[9..], 10, Some(&head), None), None);
        assert_eq!(
            check_tail(&[], 7, Some(&head), None),
            Some(Problem::Truncated {
                head_seq: 10,
                last_seq: 7
            })
        );
        assert_eq!(Head::parse(&head.text(), "test").expect("parse"), head);
        assert!(Head::parse("12 nothex", "test").is_err());
    }
}

//! The head: the newest entry (`SEQ HASH`), recorded outside the trail after every
//! append. Its sequence number is the trail's high-water mark: a trail that ends
//! before it was truncated, and a trail whose entry there differs was rewritten.
//!
//! An append writes the head twice: before its commit as the last committed entry
//! plus a second line, `pending SEQ HASH`, for the entry being committed; after it,
//! as that entry alone. A process killed between the two leaves a head that holds
//! whether or not the commit happened, where a head naming the new entry alone would
//! read, after a crash before the commit, as a truncated trail (and refuse every
//! append after it).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::{Entry, Problem};

/// The newest entry, as recorded outside the trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// 0 with an all-zero hash: no entry yet (only ever written with `pending`).
    pub seq: u64,
    pub hash: String,
    /// The entry an append was committing when this was written: the trail may hold
    /// it or not, but nothing else at its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("audit head file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit head {at} is not `SEQ HASH`: {text:?}")]
    Bad { at: String, text: String },
}

impl Head {
    pub fn of(e: &Entry) -> Head {
        Head {
            seq: e.seq,
            hash: e.hash.clone(),
            pending: None,
        }
    }

    /// What an append writes before committing `new` after `prev` (none: the first).
    pub fn before_commit(prev: Option<&Entry>, new: &Entry) -> Head {
        Head {
            pending: Some((new.seq, new.hash.clone())),
            ..prev.map_or_else(
                || Head {
                    seq: 0,
                    hash: "0".repeat(64),
                    pending: None,
                },
                Head::of,
            )
        }
    }

    /// `SEQ HASH`, as in the head file, with an optional line `pending SEQ HASH`; `at`
    /// names where it was read, for the error.
    pub fn parse(text: &str, at: &str) -> Result<Head, HeadError> {
        let bad = || HeadError::Bad {
            at: at.to_string(),
            text: text.to_string(),
        };
        let pair = |line: &str| -> Result<(u64, String), HeadError> {
            let (seq, hash) = line.trim().split_once(' ').ok_or_else(bad)?;
            let hash = hash.trim();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            Ok((seq.parse().map_err(|_| bad())?, hash.to_string()))
        };
        let mut lines = text.trim().lines();
        let (seq, hash) = pair(lines.next().ok_or_else(bad)?)?;
        let pending = match lines.next() {
            Some(l) => Some(pair(l.trim().strip_prefix("pending ").ok_or_else(bad)?)?),
            None => None,
        };
        if lines.next().is_some() {
            return Err(bad());
        }
        Ok(Head { seq, hash, pending })
    }

    pub fn text(&self) -> String {
        match &self.pending {
            Some((seq, hash)) => format!("{} {}\npending {seq} {hash}\n", self.seq, self.hash),
            None => format!("{} {}\n", self.seq, self.hash),
        }
    }

    /// The head file at `path`; `None` when there is none yet.
    pub fn read(path: &Path) -> Result<Option<Head>, HeadError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Head::parse(&t, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HeadError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Replaces the file in one rename, so a reader never sees half a head; creates
    /// its directory (owner-only) when missing.
    pub fn write(&self, path: &Path) -> Result<(), HeadError> {
        let err = |source| HeadError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.text()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// What is wrong with a trail against this head: it ends before it
    /// (`Truncated`), or holds another entry at its place (`HeadMismatch`).
    pub fn problem<'a>(
        &self,
        last: Option<&'a Entry>,
        find: impl Fn(u64) -> Option<&'a Entry>,
    ) -> Option<Problem> {
        if let Some((seq, hash)) = &self.pending {
            match find(*seq) {
                Some(e) if e.hash == *hash => return None,
                Some(_) => return Some(Problem::HeadMismatch { seq: *seq }),
                // Not committed: the head before it must hold.
                None => {}
            }
        }
        if self.seq == 0 {
            return None;
        }
        match find(self.seq) {
            Some(e) if e.hash == self.hash => None,
            Some(_) => Some(Problem::HeadMismatch { seq: self.seq }),
            None => Some(Problem::Truncated {
                head_seq: self.seq,
                last_seq: last.map_or(0, |e| e.seq),
            }),
        }
    }
}

//! The head: the newest entry (`SEQ HASH`), recorded outside the trail after every
//! append. Its sequence number is the trail's high-water mark: a trail that ends
//! before it was truncated, and a trail whose entry there differs was rewritten.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::{Entry, Problem};

/// The newest entry, as recorded outside the trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
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
        }
    }

    /// `SEQ HASH`, as in the head file; `at` names where it was read, for the error.
    pub fn parse(text: &str, at: &str) -> Result<Head, HeadError> {
        let bad = || HeadError::Bad {
            at: at.to_string(),
            text: text.to_string(),
        };
        let (seq, hash) = text.trim().split_once(' ').ok_or_else(bad)?;
        let hash = hash.trim();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Head {
            seq: seq.parse().map_err(|_| bad())?,
            hash: hash.to_string(),
        })
    }

    pub fn text(&self) -> String {
        format!("{} {}\n", self.seq, self.hash)
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

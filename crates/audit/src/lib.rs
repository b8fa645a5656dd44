//! A tamper-evident audit trail: every entry carries the SHA-256 of the one before it,
//! so editing, removing or reordering any entry breaks the chain at that entry.
//!
//! A chain alone can be rewritten from any entry on, and truncated, by whoever can
//! write it. So each entry is also signed (HMAC-SHA256) with a key kept out of the
//! trail's reach, and the head (the newest entry, and so the highest sequence number
//! ever written) is recorded outside the trail after every append: without the key
//! nothing can be forged, and without write access to the head nothing can be
//! removed from the end unnoticed. An append to a trail that no longer reaches its
//! head is refused rather than blessing it with a new one.
//!
//! On one machine the chain lives in the controller's SQLite file, in its own table.
//! Appends run in an `IMMEDIATE` transaction, so concurrent writers (the controller and
//! a CLI, in different processes) are serialised by SQLite and never fork the chain.

mod chain;
mod head;
#[cfg(feature = "sqlite")]
mod store;

pub use chain::{
    Entry, GENESIS, Key, KeyError, NewEntry, Problem, Verdict, check, check_tail, digest,
    verify_entries,
};
pub use head::{Head, HeadError};
#[cfg(feature = "sqlite")]
pub use store::{AuditError, AuditLog, Filter};

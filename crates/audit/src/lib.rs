//! A tamper-evident audit trail: every entry carries the SHA-256 of the one before it,
//! so editing, removing or reordering any entry breaks the chain at that entry.
//!
//! Truncation (removing the newest entries) leaves a valid shorter chain; the head is
//! therefore also written to an external sink (a file by default) after every append,
//! and `verify` against that head catches it.
//!
//! On one machine the chain lives in the controller's SQLite file, in its own table.
//! Appends run in an `IMMEDIATE` transaction, so concurrent writers (the controller and
//! a CLI, in different processes) are serialised by SQLite and never fork the chain.

mod chain;
#[cfg(feature = "sqlite")]
mod store;

pub use chain::{Entry, GENESIS, NewEntry, Problem, digest, verify_entries};
#[cfg(feature = "sqlite")]
pub use store::{AuditError, AuditLog, Filter, Head};

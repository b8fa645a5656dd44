//! What the driver persists per rollout: the engine's status, and the events it
//! produced that are not yet known delivered (an outbox), numbered for stable ids.
//!
//! The engine's fields stay at the top level (flattened), so a status written before
//! the driver existed reads as a record with an empty outbox.

use baton_engine::Status;
use serde::{Deserialize, Serialize};

use crate::event::Event;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(flatten)]
    pub status: Status,
    /// Events written with this status and not yet emitted and notified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Event>,
    /// Events numbered so far: the next event's id is built from it.
    #[serde(default)]
    pub events: u64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the stored status of rollout {rollout} cannot be read ({source}); it was left as it is: fix or remove it rather than start the rollout over"
)]
pub struct RecordError {
    pub rollout: String,
    #[source]
    pub source: serde_json::Error,
}

impl Record {
    /// Reads a stored record; a status that cannot be read is an error, never a fresh
    /// rollout (that would start every revision over).
    pub fn decode(rollout: &str, value: serde_json::Value) -> Result<Record, RecordError> {
        serde_json::from_value(value).map_err(|source| RecordError {
            rollout: rollout.to_string(),
            source,
        })
    }

    /// The revision the rollout is about now: the one rolling out, else stable.
    pub fn current_revision(&self) -> Option<String> {
        self.status
            .canary
            .clone()
            .or_else(|| self.status.stable.clone())
    }
}

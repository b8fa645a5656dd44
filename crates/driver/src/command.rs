//! The one vocabulary of what a person can ask of a rollout: the CLI, the control API,
//! the dashboard and the cluster's request annotation all speak it; the engine handles
//! its subset (`undo` re-applies a previous revision's spec, outside the engine).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Go past the current step (a pause, an analysis, a blue-green preview).
    Promote,
    /// Skip every remaining step and analysis: straight to 100 %.
    PromoteFull,
    /// Return all traffic to stable and scale the new revision away.
    Abort,
    /// After an abort: start the steps again from the first.
    Retry,
    /// Hold the current step until `resume`; the progress deadline stops counting.
    Pause,
    /// Go on where `pause` held.
    Resume,
    /// Put the previous stable revision's spec back.
    Undo,
    /// Replace the stable revision's instances (pods) a few at a time, under the same
    /// readiness rules as a rollout.
    Restart,
}

impl Command {
    pub const ALL: [Command; 8] = [
        Command::Promote,
        Command::PromoteFull,
        Command::Abort,
        Command::Retry,
        Command::Pause,
        Command::Resume,
        Command::Undo,
        Command::Restart,
    ];

    /// The wire name: an API path segment, a CLI word, the annotation's `command`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Promote => "promote",
            Command::PromoteFull => "promote-full",
            Command::Abort => "abort",
            Command::Retry => "retry",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Undo => "undo",
            Command::Restart => "restart",
        }
    }

    pub fn parse(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The engine's command, for all but `undo`.
    pub fn engine(self) -> Option<baton_engine::Command> {
        Some(match self {
            Command::Promote => baton_engine::Command::Promote,
            Command::PromoteFull => baton_engine::Command::PromoteFull,
            Command::Abort => baton_engine::Command::Abort,
            Command::Retry => baton_engine::Command::Retry,
            Command::Pause => baton_engine::Command::Pause,
            Command::Resume => baton_engine::Command::Resume,
            Command::Restart => baton_engine::Command::Restart,
            Command::Undo => return None,
        })
    }

    /// The reason its audit entry and event carry (`Promote`, `PromoteFull`, ...).
    pub fn reason(self) -> &'static str {
        match self {
            Command::Promote => "Promote",
            Command::PromoteFull => "PromoteFull",
            Command::Abort => "Abort",
            Command::Retry => "Retry",
            Command::Pause => "Pause",
            Command::Resume => "Resume",
            Command::Undo => "Undo",
            Command::Restart => "Restart",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_round_trips_through_its_wire_name() {
        for c in Command::ALL {
            assert_eq!(Command::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(Command::parse("promote --full"), None);
        assert_eq!(Command::Undo.engine(), None);
        assert_eq!(
            Command::PromoteFull.engine(),
            Some(baton_engine::Command::PromoteFull)
        );
    }
}

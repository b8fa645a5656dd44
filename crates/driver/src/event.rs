//! What the driver tells people: every engine event, every gate verdict and every
//! command acted on, typed. Audit actions, Kubernetes Event reasons and types and
//! webhook notifications are derived here, once, from the kind, never from the text.

use baton_engine::{Cause, EventKind, Millis, Verdict};
use baton_spec::NotificationEvent;
use serde::{Deserialize, Serialize};

use crate::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "of")]
pub enum Kind {
    Engine(EventKind),
    /// A gate's measurement with a verdict (inconclusive ones are not published).
    Gate(Verdict),
    /// A person's command that took effect.
    Command(Command),
}

/// One published event. `id` is stable: it is written with the status that produced
/// the event, so a redelivery after a restart or a leader change carries the same id
/// and receivers can drop duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    pub kind: Kind,
    /// `baton`, or who asked (`os:alice`, `admin/bob`, a Kubernetes user).
    pub actor: String,
    pub message: String,
    /// The revision being rolled out, else stable, when the event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    /// The rollout's phase once the event happened.
    pub phase: String,
    pub at: Millis,
    /// The webhook event it raises, decided when it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotificationEvent>,
}

impl Kind {
    /// `CamelCase`, as logs and Kubernetes Events show it.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::Engine(k) => k.reason(),
            Kind::Gate(Verdict::Pass) => "GatePassed",
            Kind::Gate(Verdict::Fail) => "GateFailed",
            Kind::Gate(Verdict::Error) => "GateError",
            Kind::Gate(Verdict::Inconclusive) => "GateInconclusive",
            Kind::Command(c) => c.reason(),
        }
    }

    /// The audit trail's `action` column.
    pub fn audit_action(self) -> &'static str {
        match self {
            Kind::Engine(k) => match k {
                EventKind::FirstRevision
                | EventKind::NewRevision
                | EventKind::Superseded
                | EventKind::Abandoned => "revision",
                EventKind::StepCompleted => "step",
                EventKind::SmokeStarted | EventKind::SmokePassed => "smoke",
                EventKind::Promote
                | EventKind::PromoteFull
                | EventKind::Promoted
                | EventKind::Switch => "promote",
                EventKind::Aborted(Cause::User) => "abort",
                EventKind::Aborted(_) | EventKind::FailedPaused(_) => "rollback",
                EventKind::Retry => "retry",
                EventKind::Hold => "pause",
                EventKind::Resume => "resume",
                EventKind::Restart | EventKind::Restarted => "restart",
                EventKind::Phase => "phase",
            },
            Kind::Gate(_) => "gate",
            Kind::Command(Command::Promote | Command::PromoteFull) => "promote",
            Kind::Command(Command::Abort) => "abort",
            Kind::Command(Command::Retry) => "retry",
            Kind::Command(Command::Pause) => "pause",
            Kind::Command(Command::Resume) => "resume",
            Kind::Command(Command::Undo) => "undo",
            Kind::Command(Command::Restart) => "restart",
        }
    }

    /// Worth a Kubernetes `Warning`: Baton stopped or held a version on its own.
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            Kind::Engine(EventKind::Aborted(
                Cause::Gate | Cause::Smoke | Cause::Deadline
            )) | Kind::Engine(EventKind::FailedPaused(_))
                | Kind::Gate(Verdict::Fail | Verdict::Error)
        )
    }

    /// Routine: kept in the audit trail, not echoed to a terminal.
    pub fn is_routine(self) -> bool {
        matches!(self, Kind::Gate(Verdict::Pass))
    }

    /// The webhook event this kind raises by itself (a pause is raised by the phase
    /// change that enters it, see the driver).
    pub fn notification(self) -> Option<NotificationEvent> {
        match self {
            Kind::Engine(EventKind::NewRevision) => Some(NotificationEvent::Started),
            Kind::Engine(EventKind::StepCompleted) => Some(NotificationEvent::StepPassed),
            Kind::Engine(EventKind::Promoted) => Some(NotificationEvent::Promoted),
            Kind::Engine(EventKind::Aborted(Cause::User)) => Some(NotificationEvent::Aborted),
            Kind::Engine(EventKind::Aborted(_)) => Some(NotificationEvent::RolledBack),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_abort_is_no_rollback_and_no_warning() {
        let user = Kind::Engine(EventKind::Aborted(Cause::User));
        let gate = Kind::Engine(EventKind::Aborted(Cause::Gate));
        assert_eq!(user.audit_action(), "abort");
        assert_eq!(gate.audit_action(), "rollback");
        assert!(!user.is_warning());
        assert!(gate.is_warning());
        assert_eq!(user.notification(), Some(NotificationEvent::Aborted));
        assert_eq!(gate.notification(), Some(NotificationEvent::RolledBack));
        assert_eq!(user.reason(), "Aborted");
    }

    #[test]
    fn the_first_revision_starts_nothing_to_notify() {
        assert_eq!(Kind::Engine(EventKind::FirstRevision).notification(), None);
        assert_eq!(
            Kind::Engine(EventKind::NewRevision).notification(),
            Some(NotificationEvent::Started)
        );
        assert_eq!(
            Kind::Engine(EventKind::FirstRevision).reason(),
            "NewRevision"
        );
    }

    #[test]
    fn kinds_serialise_with_their_cause() {
        let k = Kind::Engine(EventKind::Aborted(Cause::Deadline));
        let v = serde_json::to_value(k).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "engine", "of": {"kind": "aborted", "cause": "deadline"}})
        );
        assert_eq!(serde_json::from_value::<Kind>(v).unwrap(), k);
    }
}

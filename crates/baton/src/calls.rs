//! What the control API and the dashboard share: the calls handed to the controller,
//! the identities that may make them, and the answer's shape. Both the API server
//! (`api.rs`) and the dashboard (`dashboard.rs`) speak these; neither imports the other's.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::board::Role;
use crate::paths::Paths;

/// A response body of the API and the dashboard.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// Commands a person can give a rollout: the one vocabulary, shared with the cluster.
pub use baton_driver::Command as CommandKind;

#[derive(Debug)]
pub enum ApiCall {
    List,
    Get(String),
    /// A YAML source of one or more Rollouts.
    Apply(String),
    Command {
        name: String,
        kind: CommandKind,
    },
    History(String),
    /// What changed between two revisions' specs (by number).
    Diff {
        name: String,
        from: u64,
        to: u64,
    },
    /// Stop the controller; with `down`, stop the proxy and every instance too.
    Shutdown {
        down: bool,
    },
}

/// An answer: HTTP status and JSON body.
pub type Reply = (StatusCode, Value);

#[derive(Debug)]
pub struct ApiRequest {
    pub call: ApiCall,
    /// Who asked: the name of the token used, with the user the client says it acts
    /// for (`admin/alice`).
    pub actor: String,
    pub reply: oneshot::Sender<Reply>,
}

/// Named API tokens: `.baton/token` is `admin`; `.baton/tokens` may add lines of
/// `NAME TOKEN [ROLE]`, one identity each, ROLE being `viewer` (may read) or
/// `operator` (may also act; the default).
#[derive(Debug, Clone, Default)]
pub struct Identities(pub Vec<(String, String, Role)>);

impl Identities {
    pub fn load(paths: &Paths) -> Identities {
        let mut ids = Vec::new();
        if let Ok(t) = std::fs::read_to_string(paths.token()) {
            ids.push(("admin".to_string(), t.trim().to_string(), Role::Admin));
        }
        if let Ok(text) = std::fs::read_to_string(paths.root.join("tokens")) {
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let mut words = line.split_whitespace();
                let (Some(name), Some(token)) = (words.next(), words.next()) else {
                    continue;
                };
                let role = match words.next() {
                    None => Role::Operator,
                    Some(r) => match Role::parse(r) {
                        Some(Role::Admin) | None => {
                            eprintln!(
                                "warning: {}: identity {name:?} has role {r:?}; use viewer or operator — ignored",
                                paths.root.join("tokens").display()
                            );
                            continue;
                        }
                        Some(role) => role,
                    },
                };
                if token.len() >= 16 {
                    ids.push((name.to_string(), token.to_string(), role));
                }
            }
        }
        Identities(ids)
    }

    pub fn who(&self, given: &str) -> Option<(&str, Role)> {
        self.0
            .iter()
            .find(|(_, t, _)| token_matches(given.as_bytes(), t.as_bytes()))
            .map(|(n, _, r)| (n.as_str(), *r))
    }
}

pub fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
    (status, json!({ "error": msg.into() }))
}

/// Compares without an early exit, so timing does not reveal the token.
pub(crate) fn token_matches(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

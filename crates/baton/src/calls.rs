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
    /// A request refused before it reached the controller (a wrong token, a viewer
    /// acting): recorded in the audit trail.
    Denied(String),
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
/// `operator` (may also act; the default). Both files are read again when they change,
/// so a token is added or revoked without a restart.
#[derive(Debug, Default)]
pub struct Identities {
    /// Where the files are; `None` for a fixed set (the cluster dashboard).
    root: Option<std::path::PathBuf>,
    state: std::sync::Mutex<Loaded>,
}

#[derive(Debug, Default, Clone)]
struct Loaded {
    /// Modification times and lengths of `token` and `tokens` when last read.
    stamp: Vec<Option<(std::time::SystemTime, u64)>>,
    ids: Vec<(String, String, Role)>,
}

/// Shortest token accepted from `.baton/tokens`.
pub const MIN_TOKEN_LEN: usize = 16;

impl Identities {
    /// A fixed set of identities, never reloaded.
    pub fn fixed(ids: Vec<(String, String, Role)>) -> Identities {
        Identities {
            root: None,
            state: std::sync::Mutex::new(Loaded {
                stamp: Vec::new(),
                ids,
            }),
        }
    }

    pub fn load(paths: &Paths) -> Identities {
        let me = Identities {
            root: Some(paths.root.clone()),
            state: Default::default(),
        };
        me.refresh();
        me
    }

    fn stamp(root: &std::path::Path) -> Vec<Option<(std::time::SystemTime, u64)>> {
        ["token", "tokens"]
            .iter()
            .map(|f| {
                let m = std::fs::metadata(root.join(f)).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// Reads the files again when they changed since the last read.
    fn refresh(&self) -> Vec<(String, String, Role)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(root) = &self.root {
            let stamp = Self::stamp(root);
            if stamp != state.stamp || state.stamp.is_empty() {
                state.ids = Self::read(root);
                state.stamp = stamp;
            }
        }
        state.ids.clone()
    }

    fn read(root: &std::path::Path) -> Vec<(String, String, Role)> {
        let mut ids = Vec::new();
        if let Ok(t) = std::fs::read_to_string(root.join("token")) {
            ids.push(("admin".to_string(), t.trim().to_string(), Role::Admin));
        }
        let file = root.join("tokens");
        if let Ok(text) = std::fs::read_to_string(&file) {
            for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(name), Some(token)) = (words.next(), words.next()) else {
                    eprintln!(
                        "warning: {}:{n}: expected NAME TOKEN [ROLE]; line ignored",
                        file.display()
                    );
                    continue;
                };
                let role = match words.next() {
                    None => Role::Operator,
                    Some(r) => match Role::parse(r) {
                        Some(Role::Admin) | None => {
                            eprintln!(
                                "warning: {}:{n}: identity {name:?} has role {r:?}; use viewer or operator — ignored",
                                file.display()
                            );
                            continue;
                        }
                        Some(role) => role,
                    },
                };
                if token.len() < MIN_TOKEN_LEN {
                    eprintln!(
                        "warning: {}:{n}: the token of {name:?} has {} characters, fewer than {MIN_TOKEN_LEN}: refused",
                        file.display(),
                        token.len()
                    );
                    continue;
                }
                ids.push((name.to_string(), token.to_string(), role));
            }
        }
        ids
    }

    pub fn who(&self, given: &str) -> Option<(String, Role)> {
        self.refresh()
            .into_iter()
            .find(|(_, t, _)| token_matches(given.as_bytes(), t.as_bytes()))
            .map(|(n, _, r)| (n, r))
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

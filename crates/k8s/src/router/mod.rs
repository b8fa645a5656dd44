//! Traffic routers: how a canary's weight reaches users. One file per router, one
//! trait. A router reports a weight as served only once it has seen the change take
//! effect (the route's status for its new generation, or the object read back) — the
//! operator scales nothing down before that.

pub mod gateway;
pub mod istio;
pub mod replicas;
pub mod services;

use kube::Client;

use crate::Error;

/// What the traffic should look like now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub namespace: String,
    pub stable_service: Option<String>,
    pub canary_service: Option<String>,
    /// The canary's share, 0-100; the stable Service gets the rest.
    pub canary_weight: u32,
    /// `(name, value)`: requests with this header go to the canary, while one is in
    /// flight (None removes the route).
    pub header: Option<(String, String)>,
    /// Copies of requests to the canary, answers discarded, while one is in flight
    /// (None removes the rule).
    pub mirror: Option<Mirror>,
}

/// `percent` of the requests with one of `methods` copied to the canary.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub percent: u32,
    pub methods: Vec<String>,
}

/// The name Baton gives the route rule it adds for the canary header.
pub const HEADER_RULE: &str = "baton-canary-header";
/// The name of the rule that mirrors: the weighted rule's copy, limited to `methods`.
pub const MIRROR_RULE: &str = "baton-mirror";

/// The weighted rule's matches, each limited to one of `methods` by `with_method`
/// (a rule without matches matches everything: one match per method).
fn method_matches(
    matches: Option<&Vec<serde_json::Value>>,
    methods: &[String],
    with_method: impl Fn(&mut serde_json::Value, &str),
) -> Vec<serde_json::Value> {
    let base = matches
        .filter(|m| !m.is_empty())
        .cloned()
        .unwrap_or_else(|| vec![serde_json::json!({})]);
    methods
        .iter()
        .flat_map(|m| {
            base.iter().map(|b| {
                let mut b = b.clone();
                with_method(&mut b, m);
                b
            })
        })
        .collect()
}

pub trait Router {
    /// Sets the weights if they differ; answers whether the router is seen serving them.
    fn apply(
        &self,
        client: &Client,
        plan: &Plan,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
}

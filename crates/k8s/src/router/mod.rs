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
}

/// The name Baton gives the route rule it adds for the canary header.
pub const HEADER_RULE: &str = "baton-canary-header";

pub trait Router {
    /// Sets the weights if they differ; answers whether the router is seen serving them.
    fn apply(
        &self,
        client: &Client,
        plan: &Plan,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
}

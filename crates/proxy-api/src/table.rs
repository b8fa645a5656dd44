//! The routing table the controller sends to the proxy.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTable {
    /// Monotonic; the proxy acknowledges the version it runs.
    pub version: u64,
    pub services: Vec<ServiceRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoute {
    pub name: String,
    pub listen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_listen: Option<String>,
    /// Revision served on the preview listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    pub revisions: Vec<RevisionRoute>,
    /// The stable and canary revisions' names: the order sticky clients are laid out
    /// in, where header routing and shielding send requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// `(name, value)`: requests with it go to the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_header: Option<(String, String)>,
    #[serde(default)]
    pub shield_canary: bool,
    /// How long a WebSocket to an instance that left routing may stay open before the
    /// proxy closes it with 1001 (the instance may close it first, with 1012).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
    /// Share (0-100) of stable's requests with a mirrored method copied to the canary.
    #[serde(default)]
    pub mirror_percent: u32,
    /// The methods mirrored; empty means the safe ones (GET, HEAD, OPTIONS): a copied
    /// write would run twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_methods: Vec<String>,
    /// How the proxy speaks to this service's instances.
    #[serde(default, skip_serializing_if = "BackendProtocol::is_http1")]
    pub backend_protocol: BackendProtocol,
    /// `(certificate PEM file, key PEM file)`: serve the main listener over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<(String, String)>,
}

/// The protocol to instances: HTTP/1.1 over pooled keep-alive connections, or HTTP/2
/// by prior knowledge (`h2c`, what gRPC services speak), streams multiplexed on one
/// connection per instance. Clients may speak either to the proxy whatever this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Http1,
    H2c,
}

impl BackendProtocol {
    pub fn is_http1(&self) -> bool {
        *self == BackendProtocol::Http1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRoute {
    pub name: String,
    /// Share of traffic, 0-100.
    pub weight: u32,
    /// Ready instances, `host:port`.
    pub backends: Vec<SocketAddr>,
}

/// Every instance address the services route to: what a table keeps serving.
pub fn routed(services: &[ServiceRoute]) -> HashSet<SocketAddr> {
    services
        .iter()
        .flat_map(|s| s.revisions.iter().flat_map(|r| r.backends.iter().copied()))
        .collect()
}

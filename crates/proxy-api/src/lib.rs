//! The built-in proxy's wire types: what the controller and the operator exchange
//! with it, apart from the data plane, so that they need not link hyper or rustls.
//!
//! `baton-proxy` re-exports all of it at its own paths.

pub mod control;
pub mod metrics;
pub mod table;

pub use control::{
    ControlError, CpuAffinity, ProxyClient, Request as ControlRequest, Response as ControlResponse,
    Settings,
};
pub use metrics::{BUCKETS, RevisionStats, StatsSnapshot};
pub use table::{RevisionRoute, RoutingTable, ServiceRoute, routed};

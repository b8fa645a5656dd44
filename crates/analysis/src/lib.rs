//! Metric providers and judges.
//!
//! Providers, one file each: builtin (the proxy's own per-revision counters, read
//! over its control socket with no scrape delay), mesh (the same counters read from a
//! traffic router's metrics in Prometheus, on a cluster), prometheus, web, command; smoke
//! tests for blue-green previews. Judges: thresholds (`successCondition` /
//! `failureCondition` over `result`, evaluated by `evalexpr`) and comparison with the
//! stable revision over the same window; builtin error-rate gates are also tested
//! sequentially as requests arrive (`sequential`).

pub mod builtin;
pub mod command;
pub mod mesh;
pub mod prometheus;
pub mod provider;
pub mod registry;
pub mod sequential;
pub mod smoke;
pub mod statistical;
pub mod stats;
pub mod threshold;
pub mod web;

pub use builtin::Measurer;
pub use provider::{MetricProvider, ProviderError, Sample, Vars};
pub use registry::{judge_sample, measure};
pub use smoke::run_smoke;
pub use threshold::judge;

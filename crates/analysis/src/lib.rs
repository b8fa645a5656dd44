//! Metric providers and judges.
//!
//! Today: the built-in provider (the proxy's own per-revision counters, read over its
//! control socket with no scrape delay), the threshold judge (`successCondition` /
//! `failureCondition` expressions over `result`, evaluated by `evalexpr`), and HTTP
//! smoke tests for blue-green previews. One file per provider as more arrive.

pub mod builtin;
pub mod smoke;
pub mod threshold;

pub use builtin::Measurer;
pub use smoke::run_smoke;
pub use threshold::judge;

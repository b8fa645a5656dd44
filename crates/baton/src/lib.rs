//! The `baton` command: CLI, controller (`baton up`), control API, demo.
//!
//! The library half exists so integration tests can reuse the load generator and the
//! API client; the binary is `src/main.rs`.

pub mod api;
pub mod board;
pub mod calls;
pub mod controller;
pub mod dashboard;
pub mod demo;
pub mod load;
pub mod logs;
pub mod paths;
pub mod trail;
pub mod view;

/// Milliseconds since the Unix epoch: the controller's clock, read only here and
/// handed to the pure engine.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

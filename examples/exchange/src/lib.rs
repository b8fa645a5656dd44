//! A mock crypto exchange: the workload Baton is built to roll out without losing
//! anything. Three services share one store (SQLite on one machine, PostgreSQL in a
//! cluster): `user` (accounts, JWTs), `trade` (limit orders matched by price-time
//! priority, with idempotency keys and an outbox of events) and `notification` (a
//! WebSocket feed of each user's events, resumable by sequence number). The `trader`
//! module is a client that loads them and checks that nothing was lost or doubled.

pub mod auth;
pub mod matching;
pub mod model;
pub mod service;
pub mod services;
pub mod store;
pub mod trader;
pub mod ws;

/// Milliseconds since the Unix epoch: services stamp rows with it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

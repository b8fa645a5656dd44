//! The three services as routers, so that binaries and tests build them the same way.

pub mod notification;
pub mod trade;
pub mod user;

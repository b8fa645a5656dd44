//! The control socket between controller and proxy: one JSON object per line each way.
//!
//! The protocol and the client are in `baton-proxy-api`, so that a controller needs
//! none of the data plane to drive a proxy; the server is `serve_control` in this
//! crate.

pub use baton_proxy_api::control::{ControlError, ProxyClient, Request, Response, Settings};

//! The local platform: instances as processes on this machine, probed over loopback,
//! stopped gracefully, recorded in SQLite so a restarted controller adopts them.

pub mod machine;
pub mod platform;
pub mod probe;
pub mod process;
pub mod router;
pub mod store;
pub mod supervise;

pub use platform::{Desired, InstancePhase, InstanceView, Platform, PlatformEvent, RevisionWant};
pub use store::{InstanceRecord, Store, StoreError};

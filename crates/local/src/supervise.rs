//! The proxy as a process of its own: started detached (its own process group, output
//! appended to its log) so that it outlives the controller, and waited for over its
//! control socket. The controller starts one when none answers; `baton restart-proxy`
//! starts one that takes the sockets over from the running one.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use baton_proxy_api::{ControlError, ProxyClient};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot find the baton executable to start the proxy: {0}")]
    Exe(std::io::Error),
    #[error("cannot open {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the proxy process: {0}")]
    Spawn(std::io::Error),
}

/// Starts `baton proxy --control-socket SOCKET ARGS…`, detached, from this executable.
pub fn spawn_proxy(socket: &Path, log: &Path, args: &[String]) -> Result<Child, SuperviseError> {
    let exe = std::env::current_exe().map_err(SuperviseError::Exe)?;
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SuperviseError::Log {
                path: log.to_path_buf(),
                source,
            })
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("proxy")
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .process_group(0);
    crate::process::only_standard_fds(&mut cmd);
    cmd.spawn().map_err(SuperviseError::Spawn)
}

/// Pings the proxy every 50 ms until `done` takes an answer, or `within` has passed.
pub async fn wait_for<T>(
    proxy: &ProxyClient,
    within: Duration,
    mut done: impl FnMut(Result<(u32, u64), ControlError>) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = done(proxy.ping().await) {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

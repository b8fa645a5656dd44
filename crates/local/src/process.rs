//! Starting, watching and signalling instance processes.
//!
//! Instances run in their own process group, detached from the controller, so that a
//! controller crash (or Ctrl-C in its terminal) leaves them serving. A recorded
//! instance is identified by pid *and* kernel start time, so a reused pid is never
//! mistaken for it.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use baton_spec::RunSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start {program:?}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
    #[error("no free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
}

/// Ports handed out lately, not handed out again: between `free_port` and the instance
/// binding it the port is free, and the kernel once gave the same one to two instances
/// started a millisecond apart (one of them failed with "address in use").
const RECENT_PORTS: usize = 64;
static RECENT: std::sync::Mutex<std::collections::VecDeque<u16>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// A free loopback port, found by binding port 0 and letting it go, and not one of the
/// last [`RECENT_PORTS`] this process handed out.
pub fn free_port() -> Result<u16, SpawnError> {
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    // Rejected listeners stay bound until a port is chosen, so the kernel offers
    // another one each time.
    let mut held = Vec::new();
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(SpawnError::Port)?;
        let port = l.local_addr().map_err(SpawnError::Port)?.port();
        if !recent.contains(&port) || held.len() >= RECENT_PORTS {
            if recent.len() >= RECENT_PORTS {
                recent.pop_front();
            }
            recent.push_back(port);
            return Ok(port);
        }
        held.push(l);
    }
}

/// Starts one instance of `run` on `port`, its output appended to `log`.
pub fn spawn(run: &RunSpec, port: u16, log: &Path) -> Result<Child, SpawnError> {
    let subst = |s: &str| s.replace("{port}", &port.to_string());
    let program = subst(&run.command[0]);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| SpawnError::Log {
            path: log.display().to_string(),
            source,
        })?;
    let err = out.try_clone().map_err(|source| SpawnError::Log {
        path: log.display().to_string(),
        source,
    })?;
    let mut cmd = Command::new(&program);
    cmd.args(run.command[1..].iter().map(|a| subst(a)))
        .env("PORT", port.to_string())
        .envs(run.env.iter().map(|(k, v)| (k, subst(v))))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    if let Some(dir) = &run.working_dir {
        cmd.current_dir(dir);
    }
    cmd.spawn()
        .map_err(|source| SpawnError::Start { program, source })
}

/// The kernel's start time (clock ticks since boot) of a live, non-zombie process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the recorded process still runs (same pid, same start time).
pub fn alive(pid: u32, recorded_start: u64) -> bool {
    start_time(pid) == Some(recorded_start)
}

/// Signals the instance's whole process group.
pub fn signal(pid: u32, sig: Signal) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    killpg(Pid::from_raw(pid), sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_not_handed_out_twice_in_a_row() {
        // Without the memory of recent ports, a thousand draws from the kernel's
        // ephemeral range repeat one of the previous 64 several times over.
        let ports: Vec<u16> = (0..1000)
            .map(|_| free_port().expect("a free port"))
            .collect();
        for (i, w) in ports.windows(RECENT_PORTS).enumerate() {
            let mut sorted = w.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), w.len(), "a port repeats within draws {i}..");
        }
    }

    #[test]
    fn spawned_processes_are_tracked_by_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = RunSpec {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo port=$PORT arg={port}; sleep 30".into(),
            ],
            env: Default::default(),
            working_dir: None,
        };
        let log = dir.path().join("i.log");
        let mut child = spawn(&run, 4321, &log).expect("spawn");
        let pid = child.id();
        let st = start_time(pid).expect("running");
        assert!(alive(pid, st));
        assert!(
            !alive(pid, st + 1),
            "a different start time is a different process"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("port=4321 arg=4321") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "log never showed the port: {text:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(signal(pid, Signal::SIGKILL));
        child.wait().expect("reaped");
        assert!(!alive(pid, st));
    }
}

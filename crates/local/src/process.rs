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
    free_port_avoiding(&std::collections::BTreeSet::new())
}

/// [`free_port`], never one of `avoid`: a rollout's listener is free until the proxy
/// binds it, after its first instances are ready, and an instance handed that port
/// would take the rollout's own address.
pub fn free_port_avoiding(avoid: &std::collections::BTreeSet<u16>) -> Result<u16, SpawnError> {
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    // Rejected listeners stay bound until a port is chosen, so the kernel offers
    // another one each time.
    let mut held = Vec::new();
    for _ in 0..MAX_OFFERS {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(SpawnError::Port)?;
        let port = l.local_addr().map_err(SpawnError::Port)?.port();
        // A reserved port is held too (let go, it was offered again and again: the
        // kernel prefers one half of the range for these sockets), for the
        // microseconds until another is chosen; a proxy binding it in that
        // window fails once and binds it on its next table.
        if !avoid.contains(&port) && (!recent.contains(&port) || held.len() >= RECENT_PORTS) {
            if recent.len() >= RECENT_PORTS {
                recent.pop_front();
            }
            recent.push_back(port);
            return Ok(port);
        }
        held.push(l);
    }
    Err(SpawnError::Port(std::io::Error::other(format!(
        "the kernel offered only reserved ports in {MAX_OFFERS} tries"
    ))))
}

/// Offers of the kernel looked at before giving up; one or two do unless the reserved
/// ports cover most of the ephemeral range.
const MAX_OFFERS: usize = 4096;

/// Starts one instance of `run` on `port`, its output appended to `log`.
/// The environment variable that marks an instance as this state directory's, so a
/// controller finds it again even without its record (a lost database, a crash
/// between spawning and recording).
pub const MARK_VAR: &str = "BATON_INSTANCE";

/// What an instance's mark says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub id: u64,
    pub port: u16,
    pub rollout: String,
    pub revision: String,
}

impl Mark {
    /// `1 ID PORT ROLLOUT REVISION ROOT`: names and revisions hold no space; the
    /// state directory's path, last, may.
    pub fn encode(&self, root: &Path) -> String {
        format!(
            "1 {} {} {} {} {}",
            self.id,
            self.port,
            self.rollout,
            self.revision,
            root.display()
        )
    }

    fn decode(text: &str) -> Option<(Mark, &str)> {
        let mut it = text.splitn(6, ' ');
        if it.next()? != "1" {
            return None;
        }
        let mark = Mark {
            id: it.next()?.parse().ok()?,
            port: it.next()?.parse().ok()?,
            rollout: it.next()?.to_string(),
            revision: it.next()?.to_string(),
        };
        Some((mark, it.next()?))
    }
}

/// Live processes marked as instances of the state directory `root`: `(pid, kernel
/// start time, mark)`. Processes of other users are not readable and not ours.
pub fn find_marked(root: &Path) -> Vec<(u32, u64, Mark)> {
    let want = root.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let prefix = format!("{MARK_VAR}=");
        let found = env
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix(&prefix).and_then(Mark::decode));
        // Instances start as their own process group's leader; their children inherit
        // the mark but not the leadership, and are part of the instance, not others.
        if let Some((mark, r)) = found
            && r == want
            && group_leader(pid)
            && let Some(start) = start_time(pid)
        {
            out.push((pid, start, mark));
        }
    }
    out
}

pub fn spawn(run: &RunSpec, port: u16, log: &Path, mark: &str) -> Result<Child, SpawnError> {
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
        .env(MARK_VAR, mark)
        .envs(run.env.iter().map(|(k, v)| (k, subst(v))))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    only_standard_fds(&mut cmd);
    allow_huge_pages(&mut cmd);
    if let Some(dir) = &run.working_dir {
        cmd.current_dir(dir);
    }
    cmd.spawn()
        .map_err(|source| SpawnError::Start { program, source })
}

/// Makes every descriptor above stderr close at exec, so a detached child holds nothing
/// its starter happened to inherit: a shell's pipe held open by an instance or by the
/// proxy (they outlive the command that started them) leaves its reader waiting for an
/// EOF that never comes. Marking (CLOSE_RANGE_CLOEXEC) rather than closing keeps the
/// pipe the standard library uses to report a failed exec. Best effort: a kernel older
/// than 5.11 leaves them inherited, as before.
pub(crate) fn only_standard_fds(cmd: &mut Command) {
    // SAFETY: close_range is async-signal-safe, allocates nothing, and only sets flags
    // on this (forked) process's descriptors.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Gives an instance the machine's transparent-huge-page policy back: `baton up` turns
/// it off for itself (its allocator's memory grew in 2 MiB steps), and the kernel
/// passes that setting on through fork and exec to programs that may want it.
pub(crate) fn allow_huge_pages(cmd: &mut Command) {
    // SAFETY: prctl with integer arguments is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            Ok(())
        });
    }
}

/// Whether `pid` leads its process group (the `pgrp` field of `/proc/PID/stat`).
fn group_leader(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    // After the command: state, ppid, pgrp.
    stat[close + 1..]
        .split_whitespace()
        .nth(2)
        .and_then(|g| g.parse::<u32>().ok())
        == Some(pid)
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

/// When a process started (Unix ms) from its kernel start time, for instances this
/// controller did not start itself. The boot time is whole seconds, so this is up to a
/// second early: never later than the truth, so an old instance never passes as new.
pub fn started_at_ms(start_ticks: u64) -> Option<u64> {
    /// USER_HZ: the /proc ABI fixes it at 100 on Linux.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot * 1000 + start_ticks * 1000 / TICKS_PER_SECOND)
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
        let mark = Mark {
            id: 3,
            port: 4321,
            rollout: "web".into(),
            revision: "r1".into(),
        };
        let mut child = spawn(&run, 4321, &log, &mark.encode(dir.path())).expect("spawn");
        let pid = child.id();
        let st = start_time(pid).expect("running");
        // Found by its mark, for this state directory only; the `sleep` it forks
        // carries the mark too but is part of it, not another instance.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
        {
            assert!(std::time::Instant::now() < deadline, "sh forked no child");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(find_marked(dir.path()), vec![(pid, st, mark)]);
        assert!(find_marked(&dir.path().join("other")).is_empty());
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

#[cfg(test)]
mod fd_tests {
    use super::*;

    /// A detached instance must not hold its starter's descriptors: a shell that ran
    /// `baton restart-proxy` with a pipe open waited forever for that pipe's EOF.
    #[test]
    fn an_instance_holds_none_of_its_starters_descriptors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fds = [0; 2];
        // SAFETY: fds is two ints; plain pipe(2) leaves both ends inheritable.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let ours = std::fs::read_link(format!("/proc/self/fd/{}", fds[1])).expect("our pipe");
        let run = RunSpec {
            command: vec!["sleep".into(), "30".into()],
            env: Default::default(),
            working_dir: None,
        };
        let mut child = spawn(&run, 4322, &dir.path().join("i.log"), "m").expect("spawn");
        // spawn returns once exec succeeded: what the child holds now, it keeps.
        let held: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .expect("its fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(signal(child.id(), Signal::SIGKILL));
        child.wait().expect("reaped");
        // SAFETY: both ends are ours and closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert!(
            !held.contains(&ours),
            "the instance holds our pipe: {held:?}"
        );
        assert!(held.len() <= 3, "more than stdin/out/err: {held:?}");
    }

    /// `baton up` turns transparent huge pages off for itself; the kernel would pass
    /// that on to every instance.
    #[test]
    fn an_instance_gets_the_machines_huge_page_policy_back() {
        let thp = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .expect("status")
                .lines()
                .find_map(|l| l.strip_prefix("THP_enabled:").map(|v| v.trim().to_string()))
                .expect("a THP_enabled line (Linux 5.0 and later)")
        };
        // SAFETY: prctl with integer arguments; this test runs in a process of its own.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) },
            0
        );
        assert_eq!(thp("self"), "0", "the starter's setting did not take");
        let dir = tempfile::tempdir().expect("tempdir");
        let run = RunSpec {
            command: vec!["sleep".into(), "30".into()],
            env: Default::default(),
            working_dir: None,
        };
        let mut child = spawn(&run, 4323, &dir.path().join("i.log"), "m").expect("spawn");
        let theirs = thp(&child.id().to_string());
        assert!(signal(child.id(), Signal::SIGKILL));
        child.wait().expect("reaped");
        assert_eq!(theirs, "1", "the instance inherited huge pages off");
    }
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_with_a_path_that_has_spaces() {
        let m = Mark {
            id: 7,
            port: 40001,
            rollout: "web".into(),
            revision: "abc123".into(),
        };
        let root = Path::new("/tmp/my state/.baton/logs");
        let text = m.encode(root);
        assert_eq!(Mark::decode(&text), Some((m, "/tmp/my state/.baton/logs")));
        assert_eq!(Mark::decode("2 7 1 a b /x"), None);
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    /// A rollout's listener is free until the proxy binds it; an instance once got the
    /// port a blue-green's listener was about to take.
    #[test]
    fn no_instance_port_is_a_reserved_one() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("the ephemeral port range");
        let mut bounds = range
            .split_whitespace()
            .map(|x| x.parse::<u16>().expect("a port"));
        let (lo, hi) = (bounds.next().expect("low"), bounds.next().expect("high"));
        // Every other port of the range: without the reservation about half of the
        // kernel's offers are reserved ones (it offers odd ports to bind, so "other"
        // means every second odd port).
        let avoid: std::collections::BTreeSet<u16> =
            (lo..=hi).filter(|p| (p / 2) % 2 == 0).collect();
        for _ in 0..50 {
            let port = free_port_avoiding(&avoid).expect("a free port");
            assert!(!avoid.contains(&port), "handed out reserved port {port}");
        }
    }
}

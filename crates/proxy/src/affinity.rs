//! Optional binding of each data-plane thread to a CPU of its own.
//!
//! On a machine shared with the load and the backends, the kernel now and then puts
//! both data-plane threads on one CPU. Neither blocks while requests keep arriving, so
//! they take turns a scheduler tick at a time (4 ms at HZ 250) and the requests of the
//! one waiting wait a tick: measured, p99 4.5 ms unbound against 1.6–1.7 ms bound, same
//! throughput (BENCHMARKS.md). Binding is opt-in, as nginx's `worker_cpu_affinity` and
//! HAProxy's `cpu-map` are: a bound thread cannot move off a CPU that something else
//! keeps busy.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

pub use baton_proxy_api::CpuAffinity;

#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("cannot read the CPUs this process may use: {0}")]
    Read(nix::Error),
    #[error(
        "{workers} data-plane threads but only {cpus} usable CPUs: binding needs one CPU per thread (lower --workers or turn --cpu-affinity off)"
    )]
    TooFewCpus { workers: usize, cpus: usize },
}

/// The CPU for each of `workers` threads, or none when binding is off.
pub fn plan(affinity: CpuAffinity, workers: usize) -> Result<Vec<Option<usize>>, AffinityError> {
    match affinity {
        CpuAffinity::Off => Ok(vec![None; workers]),
        CpuAffinity::Auto => {
            let set = sched_getaffinity(Pid::from_raw(0)).map_err(AffinityError::Read)?;
            let cpus: Vec<usize> = (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect();
            assign(&cpus, workers)
        }
    }
}

fn assign(cpus: &[usize], workers: usize) -> Result<Vec<Option<usize>>, AffinityError> {
    if workers > cpus.len() {
        return Err(AffinityError::TooFewCpus {
            workers,
            cpus: cpus.len(),
        });
    }
    Ok(cpus.iter().take(workers).map(|&c| Some(c)).collect())
}

/// Binds the calling thread to `cpu`.
pub fn bind_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// The CPUs the calling thread may run on.
#[cfg(test)]
pub fn current_thread_cpus() -> Vec<usize> {
    let set = sched_getaffinity(Pid::from_raw(0)).expect("own affinity");
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_per_thread_in_the_order_of_the_usable_cpus() {
        assert_eq!(assign(&[1, 3, 5], 2).unwrap(), vec![Some(1), Some(3)]);
        assert_eq!(plan(CpuAffinity::Off, 3).unwrap(), vec![None, None, None]);
        match assign(&[0, 1], 3) {
            Err(AffinityError::TooFewCpus {
                workers: 3,
                cpus: 2,
            }) => {}
            other => panic!("more threads than CPUs must be refused: {other:?}"),
        }
    }

    /// The CPUs each data-plane thread may run on, asked from inside its runtime.
    fn worker_cpus(affinity: CpuAffinity, n: usize) -> Vec<Vec<usize>> {
        let (handles, stops) = crate::start_workers(&plan(affinity, n).unwrap()).unwrap();
        let got = handles
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move { tx.send(current_thread_cpus()) });
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the worker answers")
            })
            .collect();
        drop(stops);
        got
    }

    #[test]
    fn bound_workers_run_each_on_its_own_cpu_and_unbound_ones_anywhere() {
        let usable = current_thread_cpus();
        let n = usable.len().min(2);
        let bound = worker_cpus(CpuAffinity::Auto, n);
        let want: Vec<Vec<usize>> = usable.iter().take(n).map(|&c| vec![c]).collect();
        assert_eq!(bound, want);
        // Binding a worker leaves the thread that started it alone.
        assert_eq!(current_thread_cpus(), usable);
        assert_eq!(worker_cpus(CpuAffinity::Off, n), vec![usable.clone(); n]);
    }
}

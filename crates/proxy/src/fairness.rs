//! A data-plane thread gives its CPU back to another one waiting for that CPU.
//!
//! Now and then the kernel puts both data-plane threads on one CPU (the load and the
//! instances busy on the other). While requests keep arriving neither thread ever
//! blocks, so they take turns a scheduler tick at a time (4 ms at HZ 250) and every
//! request of the waiting one waits that long: p99 4.4 ms where HAProxy's was 2.0.
//! So each thread notes the CPU it serves a request on (`sched_getcpu`: a read of the
//! rseq area or the vDSO, no system call), and one that has run for [`SLICE`] since it
//! last slept and finds another data-plane thread on its CPU calls `sched_yield`: the
//! other gets the CPU within a millisecond. Measured with `wrk` (BENCHMARKS.md). Yielding also
//! when alone on the CPU gave the same p99 but cost 2–3 % of throughput (the load and
//! the instances then got the CPU too early).
//!
//! "Slept" is read off the runtime's park hooks: a park that lasted longer than
//! [`SLEPT`] blocked in the kernel; a shorter one found events waiting and did not.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Work without sleeping after which the thread yields to another data-plane thread.
const SLICE: Duration = Duration::from_millis(1);
/// A park at least this long blocked (an `epoll_wait` that returns at once takes a
/// microsecond or two).
const SLEPT: Duration = Duration::from_micros(20);

/// One thread's running time since it last slept.
#[derive(Debug, Default, Clone, Copy)]
struct Slice {
    parked_at: Option<Instant>,
    running_since: Option<Instant>,
}

impl Slice {
    fn parked(&mut self, now: Instant) {
        self.parked_at = Some(now);
    }

    fn unparked(&mut self, now: Instant) {
        if self
            .parked_at
            .is_some_and(|at| now.duration_since(at) >= SLEPT)
        {
            self.running_since = Some(now);
        }
    }

    /// Whether to yield now; if so the next slice starts when the yield returns.
    fn should_yield(&mut self, now: Instant) -> bool {
        match self.running_since {
            Some(since) if now.duration_since(since) >= SLICE => true,
            Some(_) => false,
            None => {
                self.running_since = Some(now);
                false
            }
        }
    }

    fn yielded(&mut self, now: Instant) {
        self.running_since = Some(now);
    }
}

/// The CPU a data-plane thread last served a request on (-1: none yet), on a cache
/// line of its own.
#[repr(align(64))]
pub struct OnCpu(AtomicI32);

/// One slot per data-plane thread.
pub fn placements(n: usize) -> Arc<[OnCpu]> {
    (0..n).map(|_| OnCpu(AtomicI32::new(-1))).collect()
}

thread_local! {
    static SLICE_OF_THIS_THREAD: Cell<Slice> = Cell::new(Slice::default());
    /// This thread's index among the data-plane threads, and where they all are.
    static PLACEMENT: RefCell<Option<(usize, Arc<[OnCpu]>)>> = const { RefCell::new(None) };
}

/// Makes the calling thread data-plane thread `me`.
pub fn register(me: usize, all: Arc<[OnCpu]>) {
    PLACEMENT.with(|p| *p.borrow_mut() = Some((me, all)));
}

/// Notes the CPU this thread runs on and returns it. Written only when it changed, so
/// the other threads' copies of the slot stay valid.
fn note_cpu() -> i32 {
    // SAFETY: sched_getcpu takes no arguments and only reads the calling thread's CPU.
    let cpu = unsafe { libc::sched_getcpu() };
    PLACEMENT.with(|p| {
        if let Some((me, all)) = &*p.borrow() {
            let slot = &all[*me].0;
            if slot.load(Ordering::Relaxed) != cpu {
                slot.store(cpu, Ordering::Relaxed);
            }
        }
    });
    cpu
}

/// Whether another data-plane thread was last seen on `cpu`.
fn shared_with_another(cpu: i32) -> bool {
    PLACEMENT.with(|p| match &*p.borrow() {
        Some((me, all)) if cpu >= 0 => all
            .iter()
            .enumerate()
            .any(|(i, o)| i != *me && o.0.load(Ordering::Relaxed) == cpu),
        _ => false,
    })
}

fn with<R>(f: impl FnOnce(&mut Slice) -> R) -> R {
    SLICE_OF_THIS_THREAD.with(|c| {
        let mut s = c.get();
        let r = f(&mut s);
        c.set(s);
        r
    })
}

/// The runtime's `on_thread_park` hook.
pub fn before_park() {
    with(|s| s.parked(Instant::now()));
}

/// The runtime's `on_thread_unpark` hook.
pub fn after_unpark() {
    with(|s| s.unparked(Instant::now()));
}

/// Called as a request starts (`now` is its start time, already read).
pub fn maybe_yield(now: Instant) {
    let cpu = note_cpu();
    // The other threads' slots are read only once a slice is up (once a millisecond at
    // most), not per request.
    if with(|s| s.should_yield(now)) {
        if shared_with_another(cpu) {
            let _ = nix::sched::sched_yield();
            with(|s| s.yielded(Instant::now()));
        } else {
            // Alone on this CPU: nobody of ours to make room for; look again in a slice.
            with(|s| s.yielded(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_after_a_slice_of_work_without_a_real_sleep() {
        let t0 = Instant::now();
        let us = |n| t0 + Duration::from_micros(n);
        let mut s = Slice::default();
        assert!(!s.should_yield(us(0)), "the first request starts the slice");
        assert!(!s.should_yield(us(900)));
        // A park that found events waiting is no sleep: the slice goes on.
        s.parked(us(950));
        s.unparked(us(952));
        assert!(s.should_yield(us(1_000)));
        s.yielded(us(1_010));
        assert!(!s.should_yield(us(1_500)));
        // A real sleep starts a new slice.
        s.parked(us(1_600));
        s.unparked(us(1_700));
        assert!(!s.should_yield(us(2_600)));
        assert!(s.should_yield(us(2_700)));
    }

    #[test]
    fn a_thread_sees_another_data_plane_thread_on_its_cpu() {
        let all = placements(2);
        let cpu = crate::affinity::current_thread_cpus()[0];
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Bound, so that the CPU it notes is known.
                    crate::affinity::bind_current_thread(cpu).expect("bind");
                    register(0, all.clone());
                    let here = note_cpu();
                    assert_eq!(here, cpu as i32);
                    assert_eq!(all[0].0.load(Ordering::Relaxed), here, "noted");
                    assert!(
                        !shared_with_another(here),
                        "the other thread has not served anything yet"
                    );
                    all[1].0.store(here, Ordering::Relaxed);
                    assert!(
                        shared_with_another(here),
                        "the other thread was last seen here"
                    );
                    all[1].0.store(here + 1, Ordering::Relaxed);
                    assert!(!shared_with_another(here), "the other thread is elsewhere");
                })
                .join()
                .expect("thread");
        });
    }
}

//! hyper's timer for client connections: coarse (half a second), per thread, and
//! out of tokio's timer wheel.
//!
//! hyper arms a fresh header-read timeout (30 s) for every request on a keep-alive
//! connection. With hyper-util's `TokioTimer` each is a registration in tokio's
//! wheel, and a registration that sorts before the driver's next wake-up wakes the
//! driver through its eventfd: under load that was one eventfd write, and one wasted
//! wake-up, for every five requests. These timeouts (header reads, HTTP/2 keep-alive
//! pings) are tens of seconds long and need no millisecond precision: here a sleep
//! that has to wait is put on its thread's list, and one ticker per thread wakes the
//! ones that are due twice a second. A sleep dropped before its deadline (the usual
//! case: the request head arrived) costs the ticker one failed upgrade of a weak
//! reference.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// How late a sleep may wake.
const RESOLUTION: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

struct CoarseSleep {
    deadline: Instant,
    /// Set once it waits on the thread's list.
    waiting: Option<(Instant, Arc<AtomicWaker>)>,
}

#[derive(Default)]
struct Waiting {
    sleeps: Vec<(Instant, Weak<AtomicWaker>)>,
    ticking: bool,
}

thread_local! {
    /// Behind a (never contended) lock so that the ticker may run on any thread.
    static WAITING: Arc<Mutex<Waiting>> = Arc::default();
}

fn lock(w: &Mutex<Waiting>) -> MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wakes the due sleeps of one thread's list until none wait; then stops.
async fn tick(list: Arc<Mutex<Waiting>>) {
    loop {
        tokio::time::sleep(RESOLUTION).await;
        let now = Instant::now();
        let (due, left) = {
            let mut w = lock(&list);
            let mut due = Vec::new();
            w.sleeps.retain(|(deadline, sleep)| match sleep.upgrade() {
                None => false,
                Some(waker) if *deadline <= now => {
                    due.push(waker);
                    false
                }
                Some(_) => true,
            });
            if w.sleeps.is_empty() {
                w.ticking = false;
            }
            (due, w.sleeps.len())
        };
        // Woken outside the lock: a woken task may register again right away.
        for waker in due {
            waker.wake();
        }
        if left == 0 {
            return;
        }
    }
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let (now, deadline) = (Instant::now(), self.deadline);
        if now >= deadline {
            return Poll::Ready(());
        }
        match &self.waiting {
            // Still on the list, for this deadline or an earlier one (woken then, it
            // lists itself again). Once its listed time has passed the ticker has
            // taken it off.
            Some((listed, waker)) if *listed <= deadline && *listed > now => {
                waker.register(cx.waker())
            }
            _ => {
                let waker = Arc::new(AtomicWaker::new());
                waker.register(cx.waker());
                WAITING.with(|list| {
                    let mut w = lock(list);
                    w.sleeps.push((deadline, Arc::downgrade(&waker)));
                    if !std::mem::replace(&mut w.ticking, true) {
                        tokio::spawn(tick(list.clone()));
                    }
                });
                self.waiting = Some((deadline, waker));
            }
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            deadline,
            waiting: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(mut s) => {
                s.deadline = new_deadline;
                // Listed for a later deadline: list it again for this one on its next poll.
                if s.waiting.as_ref().is_some_and(|(at, _)| *at > new_deadline) {
                    s.waiting = None;
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    fn listed() -> usize {
        WAITING.with(|w| lock(w).sleeps.len())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_wake_after_their_deadline_as_it_moves_and_dropped_ones_are_swept() {
        let t = CoarseTimer;
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut s = t.sleep(ms(300));
        tokio::time::sleep(ms(100)).await;
        t.reset(&mut s, Instant::now() + ms(400));
        s.as_mut().await;
        let took = start.elapsed();
        assert!(took >= ms(500), "woke at the first deadline: {took:?}");
        assert!(took < Duration::from_secs(20), "{took:?}");

        let again = Instant::now();
        t.reset(&mut s, again + Duration::from_secs(3600));
        t.reset(&mut s, again + ms(50));
        s.as_mut().await;
        let took = again.elapsed();
        assert!(
            took >= ms(50) && took < Duration::from_secs(20),
            "an earlier deadline is honoured: {took:?}"
        );

        // Dropped while waiting, as a request head arriving drops hyper's timeout.
        for _ in 0..100 {
            let mut s = t.sleep(Duration::from_secs(30));
            let waker = std::task::Waker::noop();
            assert!(
                s.as_mut()
                    .poll(&mut Context::from_waker(waker))
                    .is_pending()
            );
        }
        assert!(listed() >= 100);
        let deadline = Instant::now() + Duration::from_secs(20);
        while listed() > 0 {
            assert!(Instant::now() < deadline, "{} still listed", listed());
            tokio::time::sleep(ms(50)).await;
        }
    }
}

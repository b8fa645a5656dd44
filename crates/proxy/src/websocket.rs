//! WebSocket (and other HTTP/1.1 upgrade) tunnels, and their draining.
//!
//! Bytes are passed through untouched. When a session's instance leaves routing, the
//! session keeps flowing: a backend that closes it itself (1012, "service restart")
//! is best. If it has not by the drain deadline, the proxy closes it with 1001 ("going
//! away") — between two frames of the instance's stream, never inside one, which is
//! why the backend-to-client direction tracks frame boundaries. A proxy that shuts
//! down (`baton down`, or the old process of `baton restart-proxy`) closes every
//! tunnel the same way once its HTTP connections have drained: its clients reconnect,
//! to the new process if there is one, instead of seeing their connection dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// A close frame from server to client (unmasked): code 1001, "going away".
const CLOSE_1001: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Open tunnels, by the instance they reach.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<u64, Session>,
    /// Set when the proxy shuts down: every tunnel's deadline, those opened after too.
    going_away: Option<Instant>,
}

struct Session {
    service: String,
    backend: SocketAddr,
    drain: watch::Sender<Option<Instant>>,
}

impl Sessions {
    fn register(
        &self,
        service: &str,
        backend: SocketAddr,
    ) -> (u64, watch::Receiver<Option<Instant>>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut open = self.lock();
        let (tx, rx) = watch::channel(open.going_away);
        open.by_id.insert(
            id,
            Session {
                service: service.to_string(),
                backend,
                drain: tx,
            },
        );
        (id, rx)
    }

    fn remove(&self, id: u64) {
        self.lock().by_id.remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().by_id.len()
    }

    /// The proxy is going away: every tunnel closes with 1001 at its next frame
    /// boundary after `deadline` (or at its own drain deadline, if that is sooner),
    /// and so does any opened from now on.
    pub fn close_all(&self, deadline: Instant) {
        let mut open = self.lock();
        let deadline = open.going_away.map_or(deadline, |g| g.min(deadline));
        open.going_away = Some(deadline);
        for s in open.by_id.values() {
            if s.drain.borrow().is_none_or(|d| d > deadline) {
                s.drain.send_replace(Some(deadline));
            }
        }
    }

    /// Starts the drain clock of every session whose instance is no longer routed;
    /// `drain_of(service)` is that service's drain time.
    pub fn drain_unrouted(
        &self,
        routed: &std::collections::HashSet<SocketAddr>,
        drain_of: impl Fn(&str) -> Duration,
    ) {
        let now = Instant::now();
        for s in self.lock().by_id.values() {
            if !routed.contains(&s.backend) && s.drain.borrow().is_none() {
                let deadline = now + drain_of(&s.service);
                s.drain.send_replace(Some(deadline));
            }
        }
    }
}

/// Where WebSocket frames begin and end in a server's byte stream.
#[derive(Default)]
struct FrameTracker {
    header: Vec<u8>,
    remaining: u64,
}

impl FrameTracker {
    fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header.is_empty()
    }

    /// Feeds `chunk`; returns the offset just past the first frame boundary in it
    /// (0 if the stream is at a boundary already), or `None` if it ends inside a frame.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut first = self.at_boundary().then_some(0);
        let mut i = 0;
        while i < chunk.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((chunk.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
            } else {
                self.header.push(chunk[i]);
                i += 1;
                if header_len(&self.header) == Some(self.header.len()) {
                    self.remaining = payload_len(&self.header);
                    self.header.clear();
                }
            }
            if first.is_none() && self.at_boundary() {
                first = Some(i);
            }
        }
        first
    }
}

/// The full header length once the first two bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    if h.len() < 2 {
        return None;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    Some(2 + ext + mask)
}

fn payload_len(h: &[u8]) -> u64 {
    match h[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => u64::from(n),
    }
}

/// Registers a tunnel and pumps it until either side closes or the drain ends it.
pub async fn tunnel(
    sessions: &Sessions,
    service: &str,
    backend: SocketAddr,
    client: Upgraded,
    server: Upgraded,
) {
    let (id, drain) = sessions.register(service, backend);
    pump(TokioIo::new(client), TokioIo::new(server), drain).await;
    sessions.remove(id);
}

async fn pump(
    client: TokioIo<Upgraded>,
    server: TokioIo<Upgraded>,
    mut drain: watch::Receiver<Option<Instant>>,
) {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut frames = FrameTracker::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut closing = false;
    loop {
        let deadline = *drain.borrow();
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if expired && frames.at_boundary() {
            let _ = cw.write_all(&CLOSE_1001).await;
            break;
        }
        let read = tokio::select! {
            r = sr.read(&mut buf) => r,
            _ = async {
                match deadline {
                    Some(d) if !closing => tokio::time::sleep_until(d).await,
                    _ => { let _ = drain.changed().await; }
                }
            } => {
                closing = deadline.is_some();
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if expired {
            // Forward up to the end of the frame in flight, then close.
            if let Some(end) = frames.feed(&buf[..n]) {
                let _ = cw.write_all(&buf[..end]).await;
                let _ = cw.write_all(&CLOSE_1001).await;
                break;
            }
        } else {
            frames.feed(&buf[..n]);
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = cw.shutdown().await;
    up.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0x81];
        match payload {
            0..=125 => f.push(payload as u8),
            126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(b'x', payload));
        f
    }

    #[test]
    fn going_away_reaches_open_tunnels_and_those_opened_after() {
        let s = Sessions::default();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let (_, before) = s.register("svc", addr);
        let at = Instant::now() + Duration::from_secs(10);
        s.close_all(at);
        assert_eq!(*before.borrow(), Some(at));
        let (_, after) = s.register("svc", addr);
        assert_eq!(*after.borrow(), Some(at), "opened while going away");
        // The sooner deadline stands, whichever came first.
        let sooner = at - Duration::from_secs(5);
        s.close_all(sooner);
        s.close_all(at);
        assert_eq!(
            (*before.borrow(), *after.borrow()),
            (Some(sooner), Some(sooner))
        );
        assert_eq!(*s.register("svc", addr).1.borrow(), Some(sooner));
    }

    #[test]
    fn boundaries_are_found_across_chunks() {
        let mut stream = frame(5);
        stream.extend(frame(300));
        stream.extend(frame(70_000));
        let mut t = FrameTracker::default();
        assert!(t.at_boundary());
        // Split so that headers and payloads straddle chunk edges.
        assert_eq!(t.feed(&stream[..3]), Some(0), "starts at a boundary");
        assert_eq!(
            t.feed(&stream[3..8]),
            Some(4),
            "the 5-byte frame ends inside this chunk"
        );
        assert_eq!(t.feed(&stream[8..9]), None);
        let second_end = 7 + 4 + 300;
        assert_eq!(t.feed(&stream[9..second_end + 10]), Some(second_end - 9));
        let rest = &stream[second_end + 10..];
        assert_eq!(t.feed(&rest[..rest.len() - 1]), None);
        assert_eq!(t.feed(&rest[rest.len() - 1..]), Some(1));
        assert!(t.at_boundary());
    }
}

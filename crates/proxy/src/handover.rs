//! Hot restart: a new proxy process takes the listening sockets of the running one
//! over its control socket (file descriptors passed with SCM_RIGHTS), together with
//! its routing table and counters. Both accept on the same sockets for a moment; then
//! the old one stops accepting, lets its open connections finish, and exits. The
//! kernel's accept queue is never closed, so no connection is refused and no request
//! lost (the same idea as Envoy's hot restart and Pingora's graceful upgrade).

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::control::{Request, Response};
use crate::metrics::StatsSnapshot;
use crate::table::RoutingTable;

/// What the new process inherits.
pub struct Inherited {
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    pub metrics: Option<(SocketAddr, std::net::TcpListener)>,
    pub table: RoutingTable,
    pub stats: StatsSnapshot,
    pub unrouted: Vec<baton_proxy_api::control::Unrouted>,
    /// The connection to the old process, to tell it when to stop accepting.
    pub old: UnixStream,
}

const MAX_FDS: usize = 256;

/// Sends `fds` with one byte of data (a control message needs some).
pub(crate) fn send_fds(socket: RawFd, fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(b"F")];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(socket, &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    Ok(())
}

fn recv_fds(socket: RawFd) -> std::io::Result<Vec<RawFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(socket, &mut iov, Some(&mut space), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            fds.extend(received);
        }
    }
    Ok(fds)
}

fn listener(fd: RawFd) -> std::io::Result<std::net::TcpListener> {
    // SAFETY: the fd was just received with SCM_RIGHTS, so this process owns this copy
    // and nothing else refers to it; it is a listening TCP socket by the protocol.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Asks the proxy at `control_socket` to hand over; blocks until it has.
pub fn take_over(control_socket: &Path) -> std::io::Result<Inherited> {
    use std::os::fd::AsRawFd;
    let mut old = UnixStream::connect(control_socket)?;
    let mut line = serde_json::to_string(&Request::Handover).map_err(std::io::Error::other)?;
    line.push('\n');
    old.write_all(line.as_bytes())?;
    let fds = recv_fds(old.as_raw_fd())?;
    let mut reader = BufReader::new(old.try_clone()?);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    let Response::Handover {
        listeners,
        metrics,
        table,
        stats,
        unrouted,
    } = serde_json::from_str::<Response>(&answer).map_err(std::io::Error::other)?
    else {
        return Err(std::io::Error::other(format!(
            "the running proxy did not hand over: {answer}"
        )));
    };
    let expected = listeners.len() + usize::from(metrics.is_some());
    if fds.len() != expected {
        return Err(std::io::Error::other(format!(
            "got {} sockets for {expected} listeners",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut inherited = Vec::new();
    for addr in listeners {
        let fd = fds
            .next()
            .ok_or_else(|| std::io::Error::other("missing socket"))?;
        inherited.push((addr, listener(fd)?));
    }
    let metrics = match (metrics, fds.next()) {
        (Some(addr), Some(fd)) => Some((addr, listener(fd)?)),
        _ => None,
    };
    Ok(Inherited {
        listeners: inherited,
        metrics,
        table,
        stats,
        unrouted,
        old,
    })
}

/// Tells the old process the new one is serving: it stops accepting and drains.
pub fn release(old: &mut UnixStream) -> std::io::Result<()> {
    let mut line = serde_json::to_string(&Request::HandoverDone).map_err(std::io::Error::other)?;
    line.push('\n');
    old.write_all(line.as_bytes())
}

/// What the old process counted after handing its counters over, sent once it has
/// drained; none from a process too old to send it, or after `wait`.
pub fn final_counts(old: UnixStream, wait: std::time::Duration) -> Option<StatsSnapshot> {
    old.set_read_timeout(Some(wait)).ok()?;
    let mut answer = String::new();
    BufReader::new(old).read_line(&mut answer).ok()?;
    match serde_json::from_str::<Response>(&answer).ok()? {
        Response::Stats { stats } => Some(stats),
        _ => None,
    }
}

//! The control socket's server side: tables, stats, hand-over to a new process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::accept_loop;
use crate::table::{Compiled, RoutingTable};
use crate::{ControlRequest, ControlResponse, Shared, handover, table};
use baton_proxy_api::ServiceRoute;
use baton_proxy_api::control::ServiceRefusal;

pub(crate) async fn serve_control(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(ControlRequest::Handover) => {
                        use std::os::fd::AsRawFd;
                        match hand_over(&shared, w.as_ref().as_raw_fd()) {
                            Ok(r) => r,
                            Err(e) => ControlResponse::Error {
                                error: format!("cannot hand over: {e}"),
                            },
                        }
                    }
                    Ok(ControlRequest::HandoverDone) => {
                        shared.handed_over.store(true, Ordering::SeqCst);
                        // What we count while draining goes to the new process on
                        // this connection once drained (`send_final_counts`).
                        *shared
                            .final_counts
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(w);
                        shared.stop.notify_one();
                        info!("a new proxy process took over: draining");
                        // Its tables come on this connection while we drain.
                        while let Ok(Some(line)) = lines.next_line().await {
                            if let Ok(ControlRequest::SetTable { table }) =
                                serde_json::from_str::<ControlRequest>(&line)
                            {
                                follow_table(&shared, table).await;
                            }
                        }
                        break;
                    }
                    Ok(req) => control_request(&shared, req).await,
                    Err(e) => ControlResponse::Error {
                        error: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_string(&resp)
                    .unwrap_or_else(|e| format!("{{\"reply\":\"error\",\"error\":\"{e}\"}}"));
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends our listening sockets to the process on the other end of `socket`, then
/// (the caller writes it) the table and counters that go with them.
pub(crate) fn hand_over(shared: &Shared, socket: RawFd) -> std::io::Result<ControlResponse> {
    let listeners: Vec<(SocketAddr, RawFd)> = shared
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(a, (_, l))| (*a, l.as_raw_fd()))
        .collect();
    let metrics = *shared
        .metrics_socket
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut fds: Vec<RawFd> = listeners.iter().map(|l| l.1).collect();
    fds.extend(metrics.map(|m| m.1));
    handover::send_fds(socket, &fds)?;
    Ok(ControlResponse::Handover {
        listeners: listeners.iter().map(|l| l.0).collect(),
        metrics: metrics.map(|m| m.0),
        table: shared.table.load().source.clone(),
        stats: {
            let s = shared.metrics.snapshot();
            *shared
                .handed_stats
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
            s
        },
        unrouted: shared.metrics.unrouted(std::time::Instant::now()),
    })
}

/// After a takeover's drain: the requests this process finished since it handed its
/// counters over, sent to the new process on the handover connection, so that they are
/// counted (as `Stats`, the counters' difference). An older new process does not read
/// them; the write then fails and is ignored.
pub(crate) async fn send_final_counts(shared: &Shared) {
    let writer = shared
        .final_counts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let handed = shared
        .handed_stats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let (Some(mut w), Some(handed)) = (writer, handed) else {
        return;
    };
    let now = shared.metrics.snapshot();
    let mut delta = crate::StatsSnapshot::new();
    for (svc, revs) in now {
        for (rev, s) in revs {
            let since = match handed.get(&svc).and_then(|r| r.get(&rev)) {
                Some(before) => s.since(before),
                None => s,
            };
            if since.requests() > 0 {
                delta.entry(svc.clone()).or_default().insert(rev, since);
            }
        }
    }
    let resp = ControlResponse::Stats { stats: delta };
    if let Ok(mut line) = serde_json::to_string(&resp) {
        line.push('\n');
        let _ = tokio::time::timeout(Duration::from_secs(2), w.write_all(line.as_bytes())).await;
    }
}

pub(crate) async fn control_request(shared: &Arc<Shared>, req: ControlRequest) -> ControlResponse {
    match req {
        ControlRequest::Ping => ControlResponse::Pong {
            pid: std::process::id(),
            version: shared.table.load().version,
            settings: Some(shared.settings.clone()),
        },
        ControlRequest::GetTable => ControlResponse::Table {
            table: shared.table.load().source.clone(),
        },
        ControlRequest::Stats => ControlResponse::Stats {
            stats: shared.metrics.snapshot(),
        },
        ControlRequest::SetTable { table } => {
            let version = table.version;
            match apply_table(shared, table).await {
                Ok(refused) => ControlResponse::Ack { version, refused },
                Err(error) => ControlResponse::Refused { version, error },
            }
        }
        ControlRequest::Shutdown => {
            shared.stop.notify_one();
            ControlResponse::ShuttingDown
        }
        ControlRequest::Handover | ControlRequest::HandoverDone => ControlResponse::Error {
            error: "handover is answered on its own connection".into(),
        },
    }
}

/// Binds any new listener first, then swaps the table in one atomic store: a request
/// sees either its service's old route or its new one, never a mix. Each service is
/// admitted on its own: one that cannot be served (a listener that cannot be bound, a
/// certificate that does not load, an address another service holds) keeps the route
/// it had, or none, and is answered as refused, while every other service moves on.
pub(crate) async fn apply_table(
    shared: &Arc<Shared>,
    table: RoutingTable,
) -> Result<Vec<ServiceRefusal>, String> {
    apply_table_with(shared, table, HashMap::new()).await
}

/// Tunnels to instances that left routing start their drain clock.
fn drain_unrouted(shared: &Shared, table: &RoutingTable) {
    let drain: HashMap<String, Duration> = table
        .services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Duration::from_millis(s.drain_ms.unwrap_or(30_000)),
            )
        })
        .collect();
    shared
        .sessions
        .drain_unrouted(&table::routed(&table.services), |svc| {
            drain.get(svc).copied().unwrap_or(Duration::from_secs(30))
        });
}

/// Sends the table in force to the process this one took over from, while it drains:
/// its open connections (an HTTP/2 client's, a keep-alive client's last request) still
/// take requests, and with the table of the moment of the takeover it sent them to
/// instances that had left routing and stopped (the chaos soak saw 502s from it when a
/// rollout finished within the drain). The write is short and bounded; a predecessor
/// that is gone is forgotten.
fn forward_to_predecessor(shared: &Shared, table: &RoutingTable) {
    use std::io::Write;
    let mut slot = shared.predecessor.lock().unwrap_or_else(|p| p.into_inner());
    let Some(stream) = slot.as_mut() else {
        return;
    };
    let line = serde_json::to_string(&ControlRequest::SetTable {
        table: table.clone(),
    });
    let sent = line.map_err(std::io::Error::other).and_then(|mut line| {
        line.push('\n');
        stream.set_write_timeout(Some(Duration::from_millis(200)))?;
        stream.write_all(line.as_bytes())
    });
    if sent.is_err() {
        *slot = None;
    }
}

/// A table forwarded by the process that took over (`forward_to_predecessor`): the
/// listeners are its own now, so nothing is bound; only the routing of the connections
/// still open here follows it.
async fn follow_table(shared: &Arc<Shared>, table: RoutingTable) {
    let _guard = shared.apply_lock.lock().await;
    if table.version < shared.table.load().version {
        return;
    }
    match Compiled::build(&table, &shared.metrics, &shared.outliers) {
        Ok(compiled) => {
            shared.table.store(Arc::new(compiled));
            drain_unrouted(shared, &table);
        }
        Err(error) => warn!(%error, "cannot follow the new process's table"),
    }
}

/// A service's addresses, main listener first; `None` when one does not parse.
fn addresses(svc: &ServiceRoute) -> Option<Vec<SocketAddr>> {
    let mut v = vec![svc.listen.parse().ok()?];
    if let Some(p) = &svc.preview_listen {
        v.push(p.parse().ok()?);
    }
    Some(v)
}

/// As [`apply_table`], taking listening sockets from `inherited` (hot restart) before
/// binding new ones.
pub(crate) async fn apply_table_with(
    shared: &Arc<Shared>,
    table: RoutingTable,
    mut inherited: HashMap<SocketAddr, std::net::TcpListener>,
) -> Result<Vec<ServiceRefusal>, String> {
    let _guard = shared.apply_lock.lock().await;
    let current = shared.table.load();
    if table.version < current.version {
        return Err(format!(
            "version {} is older than the table in force ({})",
            table.version, current.version
        ));
    }
    let listening: Vec<SocketAddr> = {
        let l = shared.listeners.lock().unwrap_or_else(|p| p.into_inner());
        l.keys().copied().collect()
    };
    let mut taken: HashMap<SocketAddr, String> = HashMap::new();
    let mut accepted: Vec<ServiceRoute> = Vec::new();
    let mut refused: Vec<ServiceRefusal> = Vec::new();
    let mut bound: Vec<(SocketAddr, TcpListener)> = Vec::new();
    for svc in &table.services {
        let one = RoutingTable {
            version: table.version,
            services: vec![svc.clone()],
        };
        let admitted = match Compiled::build(&one, &shared.metrics, &shared.outliers) {
            Err(e) => Err(e),
            Ok(_) => {
                let addrs = addresses(svc).unwrap_or_default();
                match addrs.iter().find_map(|a| taken.get(a).map(|o| (a, o))) {
                    Some((a, other)) => Err(format!("address {a} is also service {other}'s")),
                    None => bind_missing(&addrs, &listening, &bound, &mut inherited)
                        .await
                        .map(|mut new| {
                            bound.append(&mut new);
                            addrs
                        }),
                }
            }
        };
        match admitted {
            Ok(addrs) => {
                for a in addrs {
                    taken.insert(a, svc.name.clone());
                }
                accepted.push(svc.clone());
            }
            Err(error) => {
                warn!(service = %svc.name, %error, "cannot serve this service's new route");
                refused.push(ServiceRefusal {
                    service: svc.name.clone(),
                    error,
                })
            }
        }
    }
    // A refused service keeps the route it had, if its addresses are still its own.
    for r in &refused {
        let old = current.source.services.iter().find(|o| o.name == r.service);
        if let Some(old) = old
            && let Some(addrs) = addresses(old)
            && addrs.iter().all(|a| !taken.contains_key(a))
        {
            for a in addrs {
                taken.insert(a, old.name.clone());
            }
            accepted.push(old.clone());
        }
    }
    let table = RoutingTable {
        version: table.version,
        services: accepted,
    };
    let compiled = Compiled::build(&table, &shared.metrics, &shared.outliers)?;
    let wanted: Vec<SocketAddr> = compiled.routes.keys().copied().collect();
    shared.table.store(Arc::new(compiled));
    drain_unrouted(shared, &table);
    forward_to_predecessor(shared, &table);
    let in_table = table
        .services
        .iter()
        .flat_map(|s| {
            let named = s.revisions.iter().map(|r| r.name.clone());
            let roles = [&s.stable, &s.canary, &s.preview]
                .into_iter()
                .flatten()
                .cloned();
            named.chain(roles).map(|r| (s.name.clone(), r))
        })
        .collect();
    shared.metrics.retire(
        &in_table,
        std::time::Instant::now(),
        crate::metrics::RETAIN_UNROUTED,
    );
    let mut listeners = shared.listeners.lock().unwrap_or_else(|p| p.into_inner());
    for (addr, l) in bound {
        info!(%addr, "listening");
        // Every data-plane thread accepts on the same socket.
        let std_listener = l.into_std().map_err(|e| format!("{addr}: {e}"))?;
        let mut loops = Vec::new();
        for (me, w) in shared.workers.iter().enumerate() {
            let mine = std_listener
                .try_clone()
                .map_err(|e| format!("{addr}: {e}"))?;
            let shared = shared.clone();
            loops.push(w.spawn(async move {
                match TcpListener::from_std(mine) {
                    Ok(l) => accept_loop(shared, addr, l, me).await,
                    Err(e) => warn!(%addr, error = %e, "cannot accept on this thread"),
                }
            }));
        }
        listeners.insert(addr, (loops, std_listener));
    }
    listeners.retain(|addr, (hs, _)| {
        let keep = wanted.contains(addr);
        if !keep {
            info!(%addr, "no longer routed: closing listener");
            hs.iter().for_each(JoinHandle::abort);
        }
        keep
    });
    Ok(refused)
}

/// Binds the addresses nobody listens on yet (taking inherited sockets first); binds
/// nothing when one fails.
async fn bind_missing(
    addrs: &[SocketAddr],
    listening: &[SocketAddr],
    bound: &[(SocketAddr, TcpListener)],
    inherited: &mut HashMap<SocketAddr, std::net::TcpListener>,
) -> Result<Vec<(SocketAddr, TcpListener)>, String> {
    let mut new = Vec::new();
    for &addr in addrs {
        if listening.contains(&addr) || bound.iter().any(|(a, _)| *a == addr) {
            continue;
        }
        let l = match inherited.remove(&addr) {
            Some(std_listener) => TcpListener::from_std(std_listener),
            None => TcpListener::bind(addr).await,
        };
        match l {
            Ok(l) => new.push((addr, l)),
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
    Ok(new)
}

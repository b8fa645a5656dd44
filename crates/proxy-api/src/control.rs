//! The control socket between controller and proxy: one JSON object per line each way.
//!
//! A line protocol over a Unix socket keeps the proxy free of any HTTP API of its own
//! for control, and the socket's file permissions are its access control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::metrics::StatsSnapshot;
use crate::table::RoutingTable;

/// Where the proxy's data-plane threads may run (the binding itself is the proxy's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuAffinity {
    /// Wherever the kernel puts them.
    #[default]
    Off,
    /// Thread `i` on the `i`-th CPU this process may use (its affinity mask, so a
    /// `taskset` or cgroup cpuset around the proxy is honoured).
    Auto,
}

impl CpuAffinity {
    /// As `--cpu-affinity` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuAffinity::Off => "off",
            CpuAffinity::Auto => "auto",
        }
    }
}

/// What a proxy process was started with: a hot restart starts the new one alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// As configured: 0 is one per usable CPU.
    pub workers: usize,
    pub cpu_affinity: CpuAffinity,
    pub max_body_bytes: usize,
    pub request_timeout_secs: u64,
    /// A file whose text `/metrics` serves after the proxy's own (the controller's
    /// rollout metrics). Absent from proxies older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_textfile: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    Ping,
    /// Replace the routing table; answered with `Ack` once requests use it.
    SetTable {
        table: RoutingTable,
    },
    GetTable,
    Stats,
    /// Stop accepting, let in-flight requests finish, exit.
    Shutdown,
    /// A new proxy process asks for the listening sockets (hot restart).
    Handover,
    /// The new process serves: stop accepting, drain, exit.
    HandoverDone,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "camelCase")]
pub enum Response {
    Pong {
        pid: u32,
        version: u64,
        /// Absent from proxies older than this field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        settings: Option<Settings>,
    },
    Ack {
        version: u64,
        /// Services the proxy could not serve as asked (a listener it cannot bind, a
        /// certificate it cannot load): each keeps the route it had, or none. Every
        /// other service serves the new table. Absent from proxies older than this
        /// field, which refused whole tables.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<ServiceRefusal>,
    },
    Refused {
        version: u64,
        error: String,
    },
    Table {
        table: RoutingTable,
    },
    Stats {
        stats: StatsSnapshot,
    },
    ShuttingDown,
    /// Sent right after the listening sockets (SCM_RIGHTS), in the same order.
    Handover {
        listeners: Vec<std::net::SocketAddr>,
        metrics: Option<std::net::SocketAddr>,
        table: RoutingTable,
        stats: StatsSnapshot,
        /// Revisions of `stats` no table names any more, and for how long (ms): the
        /// new process forgets them when the old one would have. Without it, every
        /// hot restart started their clock again. Absent from older proxies.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unrouted: Vec<Unrouted>,
    },
    Error {
        error: String,
    },
}

/// A revision out of every table, and since how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unrouted {
    pub service: String,
    pub revision: String,
    pub for_ms: u64,
}

/// One service of a table the proxy could not serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRefusal {
    pub service: String,
    pub error: String,
}

/// A table the proxy answered for: the version in force and the services it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub refused: Vec<ServiceRefusal>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the proxy at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proxy control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proxy control socket {0}: no answer within the timeout")]
    Timeout(PathBuf),
    #[error("proxy control socket: bad answer: {0}")]
    Protocol(String),
    #[error("the proxy refused routing table {version}: {error}")]
    Refused { version: u64, error: String },
}

/// The controller's side of the socket.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    path: PathBuf,
    timeout: Duration,
}

impl ProxyClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        ProxyClient {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same socket with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn call(&self, req: &Request) -> Result<Response, ControlError> {
        let answer = self.call_raw(req).await?;
        serde_json::from_str::<Response>(&answer)
            .map_err(|e| ControlError::Protocol(format!("{e}: {answer:?}")))
    }

    /// The answer's line as it came.
    async fn call_raw(&self, req: &Request) -> Result<String, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let fut = async {
            let stream =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|source| ControlError::Connect {
                        path: self.path.clone(),
                        source,
                    })?;
            let (r, mut w) = stream.into_split();
            let mut line =
                serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
            line.push('\n');
            w.write_all(line.as_bytes()).await.map_err(io)?;
            let mut answer = String::new();
            BufReader::new(r).read_line(&mut answer).await.map_err(io)?;
            Ok(answer)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ControlError::Timeout(self.path.clone()))?
    }

    pub async fn ping(&self) -> Result<(u32, u64), ControlError> {
        match self.call(&Request::Ping).await? {
            Response::Pong { pid, version, .. } => Ok((pid, version)),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// The running proxy's settings (`None` from a proxy too old to tell).
    pub async fn settings(&self) -> Result<Option<Settings>, ControlError> {
        match self.call(&Request::Ping).await? {
            Response::Pong { settings, .. } => Ok(settings),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends a table and returns the version the proxy confirmed, or the first
    /// service it refused (use [`ProxyClient::apply_table`] to learn of each).
    pub async fn set_table(&self, table: &RoutingTable) -> Result<u64, ControlError> {
        let applied = self.apply_table(table).await?;
        match applied.refused.into_iter().next() {
            None => Ok(applied.version),
            Some(r) => Err(ControlError::Refused {
                version: applied.version,
                error: r.error,
            }),
        }
    }

    /// Sends a table: each service is served as asked or refused on its own.
    pub async fn apply_table(&self, table: &RoutingTable) -> Result<Applied, ControlError> {
        match self
            .call(&Request::SetTable {
                table: table.clone(),
            })
            .await?
        {
            Response::Ack { version, refused } => Ok(Applied { version, refused }),
            Response::Refused { version, error } => Err(ControlError::Refused { version, error }),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn table(&self) -> Result<RoutingTable, ControlError> {
        match self.call(&Request::GetTable).await? {
            Response::Table { table } => Ok(table),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Read straight into the snapshot: through [`Response`], an internally tagged
    /// enum, serde first copies the whole answer into a generic tree, some 30 bytes
    /// per histogram bucket — a megabyte per read in the controller, every cycle.
    pub async fn stats(&self) -> Result<StatsSnapshot, ControlError> {
        /// A plain struct is read as it streams by.
        #[derive(Deserialize)]
        struct StatsAnswer {
            reply: String,
            stats: StatsSnapshot,
        }
        let answer = self.call_raw(&Request::Stats).await?;
        if let Ok(a) = serde_json::from_str::<StatsAnswer>(&answer)
            && a.reply == "stats"
        {
            return Ok(a.stats);
        }
        match serde_json::from_str::<Response>(&answer) {
            Ok(other) => Err(ControlError::Protocol(format!("{other:?}"))),
            Err(e) => Err(ControlError::Protocol(format!("{e}: {answer:?}"))),
        }
    }

    pub async fn shutdown(&self) -> Result<(), ControlError> {
        self.call(&Request::Shutdown).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape on the socket, which proxies and controllers of other versions read.
    #[test]
    fn messages_keep_their_wire_shape() {
        let req = serde_json::to_value(Request::SetTable {
            table: RoutingTable::default(),
        })
        .expect("serialises");
        assert_eq!(
            req,
            serde_json::json!({"op": "setTable", "table": {"version": 0, "services": []}})
        );
        // A proxy older than `settings` answers a ping without it.
        let pong: Response =
            serde_json::from_str(r#"{"reply":"pong","pid":7,"version":3}"#).expect("parses");
        assert!(matches!(
            pong,
            Response::Pong {
                pid: 7,
                version: 3,
                settings: None
            }
        ));
        let settings: Settings = serde_json::from_str(
            r#"{"workers":0,"cpuAffinity":"auto","maxBodyBytes":1,"requestTimeoutSecs":2}"#,
        )
        .expect("parses");
        assert_eq!(settings.cpu_affinity, CpuAffinity::Auto);
        assert_eq!(settings.cpu_affinity.as_str(), "auto");
    }
}

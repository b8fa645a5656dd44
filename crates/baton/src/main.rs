//! The `baton` command line.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// The proxy allocates for every request (headers, bodies, connection state); glibc's
/// malloc and free were 5–6 % of its CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use baton::api::{ApiCall, ApiClient, CommandKind};
use baton::controller::{self, UpOptions};
use baton::paths::Paths;
use baton::{demo, view};

mod cluster;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// Zero-downtime rollouts on one machine: canary, blue-green and rolling, gated on
/// readiness and SLOs, with automatic rollback.
///
/// Start with `baton demo` to watch a whole canary and an automatic rollback, or
/// `baton up -f examples/hello/canary.yaml` to run your own spec.
#[derive(Parser, Debug)]
#[command(
    name = "baton",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    /// State directory: SQLite state, API token and address, proxy socket, logs.
    #[arg(long, global = true, env = "BATON_DIR", default_value = ".baton")]
    dir: PathBuf,
    /// Work against a Kubernetes cluster (kubeconfig from KUBECONFIG or ~/.kube/config)
    /// in this namespace: `status`, `promote`, `abort`, `retry`, `undo` and `history`
    /// then talk to the operator's Rollouts. Run as `kubectl baton` (the binary named
    /// `kubectl-baton`), the cluster is the default and the namespace the context's.
    /// For `baton operator`: watch only this namespace.
    #[arg(short = 'n', long, global = true, env = "BATON_NAMESPACE")]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct SpecArgs {
    /// A YAML file (several `---`-separated Rollouts allowed), a directory of them
    /// (*.yaml, *.yml), or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "SPEC")]
    file: PathBuf,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check the hash chain; names the first entry altered, removed or reordered, and
    /// catches truncation against the head file.
    Verify {
        /// The head recorded outside the database (default: `audit.head` in the state
        /// directory, when present).
        #[arg(long, value_name = "FILE")]
        head: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller in the foreground: starts (or re-adopts) the proxy and the
    /// instances, applies SPEC, and rolls out every change until stopped.
    ///
    /// Ctrl-C stops only the controller: the proxy and instances keep serving, and the
    /// next `baton up` carries on where this one stopped. `baton down` stops everything.
    Up {
        /// Rollouts to apply at start; without it, the stored ones resume.
        #[arg(short = 'f', long = "filename", value_name = "SPEC")]
        file: Option<PathBuf>,
        /// Address of the control API (the CLI finds it in the state directory).
        #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
        api_listen: SocketAddr,
        /// Serve Prometheus metrics of the proxy (per-revision requests and latency)
        /// at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Mirror the audit trail's head to this file after every entry (keep it
        /// outside the state directory to detect truncation of the database).
        #[arg(long, value_name = "FILE")]
        audit_head: Option<PathBuf>,
    },
    /// Stop the proxy and every instance gracefully, and the controller if it runs.
    Down,
    /// Send new or changed Rollouts to the running controller. A change under `run`
    /// starts a new revision.
    Apply(SpecArgs),
    /// Check a spec and report every problem with its field path; changes nothing.
    Validate {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show rollouts: phase, step, weight per revision, instances, gates.
    Status {
        /// One rollout; all when left out.
        name: Option<String>,
        /// Redraw as things change until Ctrl-C (plain lines when not on a terminal).
        #[arg(short, long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Move past the current pause or analysis step (or blue-green preview).
    Promote {
        name: String,
        /// Skip every remaining step and analysis: straight to 100 %.
        #[arg(long)]
        full: bool,
    },
    /// Send all traffic back to stable and scale the new revision away.
    Abort { name: String },
    /// After an abort: roll the same revision out again from the first step.
    Retry { name: String },
    /// Roll back to the previous stable revision (through the strategy).
    Undo { name: String },
    /// Revisions of a rollout with when, outcome and duration, and its events.
    History {
        name: String,
        /// Show what changed between the specs of two revisions, by number:
        /// `--diff 2 3`.
        #[arg(long, num_args = 2, value_names = ["FROM", "TO"])]
        diff: Option<Vec<u64>>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The audit trail: every action with who, when, why, and a hash chain that shows
    /// any later edit. Reads the state directory; works without a controller.
    Audit {
        #[command(subcommand)]
        verify: Option<AuditCmd>,
        /// Only this rollout's entries.
        #[arg(long)]
        rollout: Option<String>,
        /// Only entries this recent (`10m`, `2h`) or since this time (`2026-11-25T17:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// Only the newest N entries.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Tell the whole story in this terminal. With the example exchange (default):
    /// user, trade and notification services under a trader load; trade and
    /// notification rolled to v2 on canaries, user through blue-green, then broken v3s
    /// of trade and notification rolled back on their own; the trader then checks that
    /// no order or notification was lost or doubled. With `--example hello`: a canary
    /// of a tiny HTTP service under plain load. Needs the examples built beside baton.
    Demo {
        /// Which example to roll out.
        #[arg(long, value_enum, default_value = "exchange")]
        example: Example,
        /// Load: orders per second (exchange, default 150) or requests per second
        /// (hello, default 400).
        #[arg(long)]
        rate: Option<u32>,
        /// Simulated traders (exchange).
        #[arg(long, default_value_t = 8)]
        traders: usize,
        /// Concurrent keep-alive clients (hello).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The hello binary (default: `hello` beside this executable).
        #[arg(long, value_name = "PATH")]
        hello: Option<PathBuf>,
        /// Directory holding the exchange's binaries (default: beside this executable).
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Working directory for the demo's state (default: a new temporary one).
        #[arg(long = "workdir", value_name = "DIR")]
        workdir: Option<PathBuf>,
        /// Serve the proxy's metrics here (hello; default: a free port).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Gate the error rate with PromQL on this Prometheus (hello; it must scrape
        /// --metrics-listen) instead of the proxy's own counters.
        #[arg(long, value_name = "URL")]
        prometheus: Option<String>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print a one-time login link to the running controller's web dashboard (valid
    /// for ten minutes, once). The dashboard shows every rollout live: steps, traffic
    /// per revision, instances, gate results and charts, the audit trail, and buttons
    /// to promote, abort, retry or undo.
    ///
    /// With `--namespace` (or as `kubectl baton dashboard`): serve the dashboard for
    /// that namespace's Rollouts on a cluster, on `--listen`, and print its login link.
    Dashboard {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
        /// Where to serve the dashboard for a cluster.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
    /// Run the Kubernetes operator: reconciles `Rollout` resources (baton.dev/v1alpha1)
    /// with ReplicaSets, Services, Gateway API or Istio routes, with leader election on
    /// a Lease so that several replicas can run. Uses the kubeconfig or the pod's
    /// service account; `--namespace` limits it to one namespace.
    Operator {
        /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else the
        /// kubeconfig context's).
        #[arg(long, value_name = "NS")]
        leader_election_namespace: Option<String>,
        /// This replica's name in the Lease (default: $POD_NAME, else the host name).
        #[arg(long)]
        identity: Option<String>,
        /// `/healthz` and `/readyz`.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
        health_listen: SocketAddr,
        /// Prometheus `/metrics` of the controller itself.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
        metrics_listen: SocketAddr,
    },
    /// Convert Argo Rollouts `Rollout`s (with the AnalysisTemplates in the same input)
    /// and Flagger `Canary`s into Baton Rollouts for the operator: YAML on stdout,
    /// and on stderr every field or step that could not be carried over.
    Convert {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the CustomResourceDefinitions (Rollout, GateTemplate,
    /// ClusterGateTemplate), or write them to a directory (as under deploy/crds/).
    Crd {
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Upgrade or restart the proxy without dropping a connection: a new proxy process
    /// (this executable) takes the listening sockets, table and counters over, and the
    /// old one drains and exits.
    RestartProxy,
    /// Run the data-plane proxy. `baton up` starts it; you rarely need this.
    Proxy {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Request bodies above this many bytes get 413.
        #[arg(long, default_value_t = 10 << 20)]
        max_body_bytes: usize,
        /// Seconds an instance may take to answer before the attempt counts as failed.
        #[arg(long, default_value_t = 60)]
        request_timeout: u64,
        /// Hot restart: take the listening sockets, table and counters over from the
        /// proxy running on --control-socket, which then drains and exits.
        #[arg(long)]
        takeover: bool,
        /// Data-plane threads (0: one per usable CPU). Set it in the environment of
        /// `baton up` to size the proxy it starts.
        #[arg(long, env = "BATON_PROXY_WORKERS", default_value_t = 0)]
        workers: usize,
        /// `auto` binds data-plane thread i to the i-th CPU this process may use (as
        /// nginx's `worker_cpu_affinity auto`): steadier tail latency where the proxy
        /// has CPUs to itself; `off` lets the kernel place them. Set it in the
        /// environment of `baton up` for the proxy it starts.
        #[arg(long, env = "BATON_PROXY_CPU_AFFINITY", value_enum, default_value_t = CpuAffinityArg::Off)]
        cpu_affinity: CpuAffinityArg,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CpuAffinityArg {
    Off,
    Auto,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn read_spec(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the spec from stdin")?;
        return Ok(s);
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} holds no *.yaml or *.yml file", path.display());
        }
        let texts = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(texts.join("\n---\n"));
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn parse_spec(path: &Path) -> Result<Vec<baton_spec::Rollout>> {
    let text = read_spec(path)?;
    baton_spec::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Turns a non-2xx answer into an error with the controller's message.
fn check((code, v): (u16, Value)) -> Result<Value> {
    if (200..300).contains(&code) {
        return Ok(v);
    }
    let mut msg = v["error"].as_str().unwrap_or("request failed").to_string();
    if let Some(errs) = v["errors"].as_array() {
        msg = format!("{} problem(s) in the spec:", errs.len());
        for e in errs {
            msg.push_str(&format!(
                "\n  - {}: {}",
                e["field"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            ));
        }
    }
    Err(anyhow!("{msg}"))
}

/// The kubectl plugin is this binary under the name `kubectl-baton`.
fn as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().starts_with("kubectl-baton"))
        })
        .unwrap_or(false)
}

async fn run(cli: Cli) -> Result<()> {
    let paths = Paths::new(&cli.dir);
    let on_cluster = cli.namespace.is_some() || as_kubectl_plugin();
    let ns = cli.namespace.clone();
    if on_cluster && let Some(r) = on_a_cluster(&cli.command, ns.as_deref()).await {
        return r;
    }
    match cli.command {
        Cmd::Operator {
            leader_election_namespace,
            identity,
            health_listen,
            metrics_listen,
        } => {
            cluster::operator(cluster::OperatorOptions {
                namespace: ns,
                lease_namespace: leader_election_namespace,
                identity,
                health_listen,
                metrics_listen,
            })
            .await
        }
        Cmd::Crd { write } => cluster::write_crds(write.as_deref()),
        Cmd::Convert { spec, output } => convert(spec, output),
        Cmd::Proxy {
            control_socket,
            metrics_listen,
            max_body_bytes,
            request_timeout,
            takeover,
            workers,
            cpu_affinity,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_ansi(false)
                .init();
            baton_proxy::run(baton_proxy::Config {
                control_socket,
                metrics_listen,
                max_body_bytes,
                drain_timeout: Duration::from_secs(30),
                request_timeout: Duration::from_secs(request_timeout),
                takeover,
                workers,
                cpu_affinity: match cpu_affinity {
                    CpuAffinityArg::Off => baton_proxy::CpuAffinity::Off,
                    CpuAffinityArg::Auto => baton_proxy::CpuAffinity::Auto,
                },
            })
            .await?;
            Ok(())
        }
        Cmd::Validate { spec, output } => validate(spec, output),
        Cmd::Up {
            file,
            api_listen,
            metrics_listen,
            audit_head,
        } => up(&paths, file, api_listen, metrics_listen, audit_head).await,
        Cmd::Down => down(&paths).await,
        Cmd::RestartProxy => restart_proxy(&paths).await,
        Cmd::Dashboard { output, .. } => {
            let client = ApiClient::from_paths(&paths)?;
            let v = check(client.post("/v1/login-link", None).await?)?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!(
                "{}\n  (works once, for {} minutes; afterwards log in with the token in {})",
                v["url"].as_str().unwrap_or(""),
                v["expiresInSeconds"].as_u64().unwrap_or(600) / 60,
                paths.token().display()
            );
            Ok(())
        }
        Cmd::Apply(spec) => {
            let text = read_spec(&spec.file)?;
            // Validate here too, so a bad spec is reported even with no controller.
            baton_spec::parse(&text).map_err(|e| anyhow!("{}: {e}", spec.file.display()))?;
            let client = ApiClient::from_paths(&paths)?;
            let v = check(client.post("/v1/apply", Some(text)).await?)?;
            for n in v["applied"].as_array().into_iter().flatten() {
                println!("rollout {} configured", n.as_str().unwrap_or(""));
            }
            for n in v["unchanged"].as_array().into_iter().flatten() {
                println!("rollout {} unchanged", n.as_str().unwrap_or(""));
            }
            Ok(())
        }
        Cmd::Status {
            name,
            watch,
            output,
        } => status(&paths, name, watch, output).await,
        Cmd::Promote { name, full } => {
            let c = if full {
                CommandKind::PromoteFull
            } else {
                CommandKind::Promote
            };
            command(&paths, &name, c.as_str()).await
        }
        Cmd::Abort { name } => command(&paths, &name, CommandKind::Abort.as_str()).await,
        Cmd::Retry { name } => command(&paths, &name, CommandKind::Retry.as_str()).await,
        Cmd::Undo { name } => command(&paths, &name, CommandKind::Undo.as_str()).await,
        Cmd::History {
            name,
            diff: Some(d),
            ..
        } => {
            let client = ApiClient::from_paths(&paths)?;
            let v = check(
                client
                    .get(&format!(
                        "/v1/rollouts/{name}/diff?from={}&to={}",
                        d[0], d[1]
                    ))
                    .await?,
            )?;
            let text = v["diff"].as_str().unwrap_or("");
            if text.is_empty() {
                println!("#{} and #{} have the same spec", d[0], d[1]);
            } else {
                print!("{text}");
            }
            Ok(())
        }
        Cmd::Audit {
            verify: Some(AuditCmd::Verify { head, output }),
            ..
        } => audit_verify(&paths, head, output),
        Cmd::Audit {
            verify: None,
            rollout,
            since,
            limit,
            output,
        } => audit_list(&paths, rollout, since, limit, output),
        Cmd::History { name, output, .. } => {
            let client = ApiClient::from_paths(&paths)?;
            let v = check(client.get(&format!("/v1/rollouts/{name}/history")).await?)?;
            if output == Output::Json {
                return print_json(&v);
            }
            print!("{}", view::render_history(&v));
            Ok(())
        }
        Cmd::Demo {
            example,
            rate,
            traders,
            concurrency,
            hello,
            bin_dir,
            workdir,
            metrics_listen,
            prometheus,
            output,
        } => {
            if rate == Some(0) || concurrency == 0 || traders == 0 {
                bail!("--rate, --traders and --concurrency must be at least 1");
            }
            if example == Example::Exchange {
                let s = demo::exchange::run(demo::exchange::ExchangeDemoOptions {
                    dir: workdir,
                    bin_dir,
                    traders,
                    rate: rate.unwrap_or(150),
                    narrate_to_stderr: output == Output::Json,
                })
                .await?;
                if output == Output::Json {
                    print_json(&serde_json::to_value(&s)?)?;
                } else {
                    print!("{}", demo::exchange::render_summary(&s));
                }
                if !s.is_clean() {
                    bail!(
                        "the rollouts lost or doubled something, or failed requests themselves (see the summary)"
                    );
                }
                return Ok(());
            }
            let s = demo::run(demo::DemoOptions {
                dir: workdir,
                hello,
                rate: rate.unwrap_or(400),
                concurrency,
                narrate_to_stderr: output == Output::Json,
                metrics_listen,
                prometheus,
            })
            .await?;
            if output == Output::Json {
                return print_json(&serde_json::to_value(&s)?);
            }
            print!("{}", demo::render_summary(&s));
            if s.failed_not_v3 > 0 {
                bail!(
                    "{} request(s) failed because of the rollouts themselves",
                    s.failed_not_v3
                );
            }
            Ok(())
        }
    }
}

/// The example `baton demo` rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Example {
    /// A mock crypto exchange: user, trade and notification services and a trader.
    Exchange,
    /// A tiny HTTP service.
    Hello,
}

fn open_audit(paths: &Paths) -> Result<baton_audit::AuditLog> {
    if !paths.exists() {
        bail!("no audit trail: no state in {}", paths.root.display());
    }
    Ok(baton_audit::AuditLog::open(&paths.db(), None)?)
}

fn parse_since(s: &str) -> Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return Ok(d.as_millis() as u64);
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| anyhow!("--since {s:?}: give a duration such as 10m or 2h, or a time such as 2026-11-25T17:00:00Z"))?;
    Ok(baton::now_ms().saturating_sub(d.as_millis() as u64))
}

fn audit_list(
    paths: &Paths,
    rollout: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    output: Output,
) -> Result<()> {
    let log = open_audit(paths)?;
    let since = since.as_deref().map(parse_since).transpose()?;
    let entries = log.list(&baton_audit::Filter {
        rollout,
        since,
        limit,
    })?;
    if output == Output::Json {
        return print_json(&serde_json::to_value(&entries)?);
    }
    println!(
        "{:>5}  {:<23}  {:<18} {:<9} {:<10} {:<10} REASON",
        "SEQ", "TIME (UTC)", "ACTOR", "ACTION", "ROLLOUT", "REVISION"
    );
    for e in &entries {
        println!(
            "{:>5}  {:<23}  {:<18} {:<9} {:<10} {:<10} {}",
            e.seq,
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(e.at))
                .to_string(),
            e.actor,
            e.action,
            e.rollout,
            e.revision.as_deref().unwrap_or("-"),
            e.reason
        );
    }
    Ok(())
}

fn audit_verify(paths: &Paths, head: Option<PathBuf>, output: Output) -> Result<()> {
    let log = open_audit(paths)?;
    let head_path = head.unwrap_or_else(|| paths.root.join("audit.head"));
    let head = baton_audit::Head::read(&head_path)?;
    let (n, problem) = log.verify(head.as_ref())?;
    if output == Output::Json {
        print_json(&serde_json::json!({
            "intact": problem.is_none(),
            "entries": n,
            "head": head,
            "problem": problem.as_ref().map(|p| serde_json::json!({ "detail": p, "message": p.to_string() })),
        }))?;
        if problem.is_some() {
            std::process::exit(1);
        }
        return Ok(());
    }
    match problem {
        None => {
            let against = match &head {
                Some(h) => format!(
                    ", up to the recorded head #{} in {}",
                    h.seq,
                    head_path.display()
                ),
                None => {
                    " (no head file: truncation of the newest entries cannot be checked)".into()
                }
            };
            println!("audit trail intact: {n} entries{against}");
            Ok(())
        }
        Some(p) => Err(anyhow!("audit trail broken: {p}")),
    }
}

async fn command(paths: &Paths, name: &str, action: &str) -> Result<()> {
    let client = ApiClient::from_paths(paths)?;
    let v = check(
        client
            .post(&format!("/v1/rollouts/{name}/{action}"), None)
            .await?,
    )?;
    println!("{}", v["result"].as_str().unwrap_or("done"));
    Ok(())
}

/// The last recorded state, read from the state directory while no controller runs:
/// rollouts from SQLite, instances checked against the running processes and the
/// proxy's table.
async fn offline_status(paths: &Paths, name: Option<&str>) -> Result<Value> {
    let store = baton_local::Store::open(&paths.db())?;
    let proxy = baton_proxy::ProxyClient::new(paths.proxy_socket());
    let routed = match proxy.table().await {
        Ok(t) => baton_proxy::routed(&t.services),
        Err(_) => Default::default(),
    };
    let platform = baton_local::Platform::inspect(&store, &routed)?;
    let mut list = Vec::new();
    for (n, spec, status) in store.rollouts::<baton_spec::Rollout, baton_engine::Status>()? {
        if name.is_some_and(|want| want != n) {
            continue;
        }
        let mut v = view::rollout(&n, &spec, &status, 0, &platform);
        v["controller"] = "down".into();
        list.push(v);
    }
    match name {
        Some(n) => list
            .pop()
            .ok_or_else(|| anyhow!("no rollout named {n:?} in {}", paths.db().display())),
        None => Ok(serde_json::json!({ "rollouts": list, "controller": "down" })),
    }
}

async fn status(paths: &Paths, name: Option<String>, watch: bool, output: Output) -> Result<()> {
    let client = match ApiClient::from_paths(paths) {
        Ok(c) if c.get("/v1/rollouts").await.is_ok() => Some(c),
        Ok(_) if paths.exists() && !watch => None,
        Ok(c) => Some(c),
        Err(e) => return Err(e),
    };
    let Some(client) = client else {
        let v = offline_status(paths, name.as_deref()).await?;
        if output == Output::Json {
            return print_json(&v);
        }
        eprintln!(
            "note: no controller is running; this is the last recorded state (start one with `baton up`)"
        );
        match v["rollouts"].as_array() {
            Some(list) => list.iter().for_each(|r| print!("{}", view::render(r))),
            None => print!("{}", view::render(&v)),
        }
        return Ok(());
    };
    let path = match &name {
        Some(n) => format!("/v1/rollouts/{n}"),
        None => "/v1/rollouts".into(),
    };
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let v = check(client.get(&path).await?)?;
        let text = if output == Output::Json {
            serde_json::to_string_pretty(&v)?
        } else {
            match v["rollouts"].as_array() {
                Some(list) if list.is_empty() => "no rollouts\n".to_string(),
                Some(list) => list.iter().map(view::render).collect::<Vec<_>>().join("\n"),
                None => view::render(&v),
            }
        };
        if !watch {
            print!("{text}");
            if output == Output::Json {
                println!();
            }
            return Ok(());
        }
        if tty && output != Output::Json {
            // Redrawn in place, with the time so a stuck controller shows.
            let frame = format!(
                "Every 0.5s: baton status {}   {} UTC\n\n{text}",
                name.as_deref().unwrap_or(""),
                view::clock(baton::now_ms()).get(..8).unwrap_or("")
            );
            print!("{}", view::redraw(&frame));
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else if text != last {
            // Not a terminal: a new frame only when something changed.
            println!("{text}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            last = text;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn restart_proxy(paths: &Paths) -> Result<()> {
    let proxy = baton_proxy::ProxyClient::new(paths.proxy_socket());
    let (old_pid, version) = proxy.ping().await.with_context(|| {
        format!(
            "no proxy answers on {}: is `baton up` running?",
            paths.proxy_socket().display()
        )
    })?;
    let mut args = vec!["--takeover".to_string()];
    // The new process runs as the old one did; a setting in this command's environment
    // wins (an upgrade is a moment to change it). A proxy too old to tell: defaults.
    if let Ok(Some(s)) = proxy.settings().await {
        if std::env::var_os("BATON_PROXY_WORKERS").is_none() {
            args.extend(["--workers".to_string(), s.workers.to_string()]);
        }
        if std::env::var_os("BATON_PROXY_CPU_AFFINITY").is_none() {
            args.extend(["--cpu-affinity".into(), s.cpu_affinity.as_str().into()]);
        }
        args.extend([
            "--max-body-bytes".to_string(),
            s.max_body_bytes.to_string(),
            "--request-timeout".to_string(),
            s.request_timeout_secs.to_string(),
        ]);
    }
    baton_local::supervise::spawn_proxy(&paths.proxy_socket(), &paths.proxy_log(), &args)
        .context("cannot start the new proxy")?;
    let taken = baton_local::supervise::wait_for(&proxy, Duration::from_secs(15), |r| {
        r.ok().filter(|(pid, _)| *pid != old_pid)
    })
    .await;
    let Some((pid, v)) = taken else {
        bail!(
            "the new proxy did not take over within 15 s; see {}",
            paths.proxy_log().display()
        );
    };
    let said = format!(
        "proxy restarted: pid {old_pid} → {pid}, routing table {v} (was {version}); the old process drains and exits"
    );
    audit_local(paths, "config", &said)?;
    println!("{said}");
    Ok(())
}

/// Stops everything: through the controller when it runs, directly otherwise.
async fn down(paths: &Paths) -> Result<()> {
    if !paths.exists() {
        bail!("nothing to stop: no state in {}", paths.root.display());
    }
    if let Ok(client) = ApiClient::from_paths(paths)
        && let Ok(answer) = client.post("/v1/shutdown?down=true", None).await
    {
        let v = check(answer)?;
        println!("{}", v["result"].as_str().unwrap_or("stopped"));
        return Ok(());
    }
    // No controller: stop the proxy, then the recorded instances.
    let proxy = baton_proxy::ProxyClient::new(paths.proxy_socket());
    let proxy_stopped = proxy.shutdown().await.is_ok();
    if proxy_stopped {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while proxy.ping().await.is_ok() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let store = baton_local::Store::open(&paths.db())?;
    let (mut platform, _) =
        baton_local::Platform::adopt(paths.logs(), &store, &Default::default())?;
    let n = platform.stop_all(&store, Duration::from_secs(10)).await?;
    let said = format!(
        "stopped {}{n} instance(s) (no controller was running)",
        if proxy_stopped { "the proxy and " } else { "" }
    );
    audit_local(paths, "down", &said)?;
    println!("{said}");
    Ok(())
}

/// Records, in the same hash-chained trail, what a command did without the
/// controller (which records everything that goes through it).
fn audit_local(paths: &Paths, action: &str, reason: &str) -> Result<()> {
    let log = baton_audit::AuditLog::open(&paths.db(), Some(paths.root.join("audit.head")))
        .context("cannot open the audit trail")?;
    log.append(
        baton_audit::NewEntry {
            actor: format!("os:{}", baton::api::local_user()),
            action: action.into(),
            rollout: String::new(),
            revision: None,
            spec_digest: None,
            reason: reason.into(),
        },
        baton::now_ms(),
    )
    .context("cannot record in the audit trail")?;
    Ok(())
}

fn convert(spec: SpecArgs, output: Output) -> Result<()> {
    let text = read_spec(&spec.file)?;
    let out =
        baton_k8s::convert::convert(&text).map_err(|e| anyhow!("{}: {e}", spec.file.display()))?;
    for c in &out {
        for n in &c.notes {
            eprintln!("baton convert: {}: not carried over: {n}", c.name);
        }
    }
    if output == Output::Json {
        let list: Vec<&Value> = out.iter().map(|c| &c.rollout).collect();
        return print_json(&serde_json::json!(list));
    }
    for c in &out {
        print!(
            "---\n{}",
            serde_saphyr::to_string(&c.rollout).context("cannot write YAML")?
        );
    }
    Ok(())
}

fn validate(spec: SpecArgs, output: Output) -> Result<()> {
    let text = read_spec(&spec.file)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_default();
    if !docs.is_empty() && docs.iter().all(baton_k8s::cli::is_cluster_form) {
        return match baton_k8s::cli::parse_cluster(&docs) {
            Ok(list) => {
                let names: Vec<String> = list
                    .iter()
                    .map(|r| r.metadata.name.clone().unwrap_or_default())
                    .collect();
                if output == Output::Json {
                    print_json(
                        &serde_json::json!({ "valid": true, "rollouts": names, "target": "kubernetes" }),
                    )
                } else {
                    for n in names {
                        println!(
                            "{}: rollout {n} is valid (for the Kubernetes operator)",
                            spec.file.display()
                        );
                    }
                    Ok(())
                }
            }
            Err(e) => {
                if output == Output::Json {
                    print_json(&serde_json::json!({ "valid": false, "errors": e.0 }))?;
                    std::process::exit(1);
                }
                Err(anyhow!("{}: {e}", spec.file.display()))
            }
        };
    }
    match baton_spec::parse(&text) {
        Ok(rollouts) => {
            if output == Output::Json {
                print_json(
                    &serde_json::json!({ "valid": true, "rollouts": rollouts.iter().map(|r| &r.metadata.name).collect::<Vec<_>>() }),
                )?;
            } else {
                for r in &rollouts {
                    println!(
                        "{}: rollout {} is valid (revision {})",
                        spec.file.display(),
                        r.metadata.name,
                        r.spec.run.revision_hash()
                    );
                }
            }
            Ok(())
        }
        Err(e) => {
            if output == Output::Json {
                print_json(&serde_json::json!({ "valid": false, "errors": e.0 }))?;
                std::process::exit(1);
            }
            Err(anyhow!("{}: {e}", spec.file.display()))
        }
    }
}

async fn up(
    paths: &Paths,
    file: Option<PathBuf>,
    api_listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    audit_head: Option<PathBuf>,
) -> Result<()> {
    let specs = match &file {
        Some(f) => parse_spec(f)?,
        None => Vec::new(),
    };
    if specs.is_empty() && !paths.exists() {
        bail!(
            "nothing to run: give a spec with -f (no state in {} to resume)",
            paths.root.display()
        );
    }
    let h = controller::start(UpOptions {
        paths: paths.clone(),
        specs,
        api_listen,
        metrics_listen,
        tick: Duration::from_millis(100),
        echo: true,
        audit_head,
    })
    .await?;
    println!(
        "baton up: control API on http://{} (token in {}){}",
        h.api_addr,
        paths.token().display(),
        metrics_listen
            .map(|m| format!(", metrics on http://{m}/metrics"))
            .unwrap_or_default()
    );
    println!(
        "  dashboard on http://{}/ui/ (log in with the token, or `baton dashboard` for a one-time link)",
        h.api_addr
    );
    println!(
        "  watch with `baton status --watch`; Ctrl-C stops the controller only, `baton down` stops everything"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let tx = h.tx.clone();
    let mut join = h.join;
    tokio::select! {
        r = &mut join => return r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    let _ = tx
        .send(baton::api::ApiRequest {
            call: ApiCall::Shutdown { down: false },
            actor: format!("os:{}", baton::api::local_user()),
            reply,
        })
        .await;
    let _ = rx.await;
    let _ = join.await;
    println!("controller stopped; the proxy and instances keep serving (`baton down` stops them)");
    Ok(())
}

/// Commands that act on a Rollout in the cluster (`-n`, or run as `kubectl baton`);
/// `None` for those that work the same on both.
async fn on_a_cluster(cmd: &Cmd, ns: Option<&str>) -> Option<Result<()>> {
    let json = |o: &Output| *o == Output::Json;
    let act = |c: CommandKind| c.as_str();
    Some(match cmd {
        Cmd::Status {
            name: Some(n),
            output,
            watch: false,
        } => cluster::command(ns, "status", n, json(output)).await,
        Cmd::Status { .. } => Err(anyhow!(
            "on a cluster, name the Rollout: `baton -n NS status NAME` (no --watch yet: use `kubectl get brl -w`)"
        )),
        Cmd::Promote { name, full } => {
            let c = if *full {
                CommandKind::PromoteFull
            } else {
                CommandKind::Promote
            };
            cluster::command(ns, act(c), name, false).await
        }
        Cmd::Abort { name } => cluster::command(ns, act(CommandKind::Abort), name, false).await,
        Cmd::Retry { name } => cluster::command(ns, act(CommandKind::Retry), name, false).await,
        Cmd::Undo { name } => cluster::command(ns, act(CommandKind::Undo), name, false).await,
        Cmd::History {
            name,
            diff: None,
            output,
        } => cluster::command(ns, "history", name, json(output)).await,
        Cmd::History { diff: Some(_), .. } => Err(anyhow!(
            "on a cluster, history has no --diff yet: compare the ReplicaSets' pod templates (`kubectl get rs -o yaml`)"
        )),
        Cmd::Dashboard { listen, .. } => cluster::dashboard(ns, *listen).await,
        _ => return None,
    })
}

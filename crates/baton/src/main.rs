//! The `baton` command line: the clap command tree and the dispatch to `cmd/`, one
//! module per command.
#![warn(clippy::too_many_lines)]

use std::path::PathBuf;

use anyhow::Result;
use baton::api::CommandKind;
use baton::paths::Paths;
use clap::{CommandFactory, Parser, Subcommand};

use cmd::{
    SpecArgs, Target, act, apply, audit, completions, convert, dashboard, demo, down, history, man,
    operator, proxy, smoke, status, up, validate, wait,
};

mod cmd;

/// The proxy allocates for every request (headers, bodies, connection state); glibc's
/// malloc and free were 5–6 % of its CPU under load. The `system-allocator` feature
/// leaves it out for heap profilers (heaptrack) that see only malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` in the version it builds (v3's `mimalloc.h`;
/// the Rust bindings leave this one out).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns freed memory to the system at once instead of after mimalloc's purge delay.
/// In the chaos soak a fresh controller then held 12–14 MB instead of 15–27 MB (with
/// huge pages still on; BENCHMARKS.md, "Where the memory goes"). Only the controller
/// asks for it: on the proxy's request path each purge is a system call,
/// and its cost there is not measured yet.
fn purge_freed_memory_at_once() {
    // SAFETY: sets one integer option; mimalloc reads options at each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// Turns transparent huge pages off for this process. mimalloc asked for them on its
/// arena (it is built without that now, the `no_thp` feature): with the kernel's
/// `madvise` policy the controller's and the proxy's anonymous memory then moved in
/// 2 MiB steps, 12–35 MB for a live heap of 2–3 MB, and read as growth in the soak
/// (BENCHMARKS.md). This covers kernels whose policy is `always`. An explicit
/// `MIMALLOC_ALLOW_THP` is left to decide. Instances get the machine's policy back
/// (`process::allow_huge_pages`).
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl with integer arguments; it changes only this process's flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// `baton 0.1.0 (1a2b3c4d5e6f)`: the commit tells which source a binary was built
/// from between releases (build.rs; `unknown commit` outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BATON_GIT_COMMIT"),
    ")"
);

/// Zero-downtime rollouts on one machine: canary, blue-green and rolling, gated on
/// readiness and SLOs, with automatic rollback.
///
/// Start with `baton demo` to watch a whole canary and an automatic rollback, or
/// `baton up -f examples/hello/canary.yaml` to run your own spec.
#[derive(Parser, Debug)]
#[command(
    name = "baton",
    version = VERSION,
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
    /// The kubeconfig file to use instead of KUBECONFIG or ~/.kube/config (as
    /// kubectl's flag); implies a cluster, in the context's namespace unless `-n`.
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use instead of its current one (as kubectl's flag);
    /// implies a cluster.
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// The audit trail's head, recorded after every entry so that removing entries
    /// shows: keep it where whoever can write the state directory cannot (default
    /// `$XDG_STATE_HOME/baton/ID/audit.head`, ID from the state directory's path).
    #[arg(long, global = true, env = "BATON_AUDIT_HEAD", value_name = "FILE")]
    audit_head: Option<PathBuf>,
    /// The key (0600) that signs audit entries, kept outside the state directory; or
    /// the key itself in BATON_AUDIT_KEY. Default: `audit.key` beside the default
    /// head, made by `baton up` when missing.
    #[arg(long, global = true, env = "BATON_AUDIT_KEY_FILE", value_name = "FILE")]
    audit_key_file: Option<PathBuf>,
    /// How `baton up`, `baton proxy` and `baton operator` log: `text`, one line per
    /// event for a person (the default, but for the operator), or `json`, one object
    /// per line (time, level, message, rollout, revision, reason, actor) for a log
    /// pipeline (the operator's default). `RUST_LOG` filters, as `info` by default.
    #[arg(
        long,
        global = true,
        env = "BATON_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    log_format: Option<baton::logs::LogFormat>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum SetCmd {
    /// New images for containers of a cluster Rollout's pod template (`*` for all):
    /// a new revision, rolled out by the operator as any template change. On one
    /// machine, change `run` in the spec and `baton apply` it.
    Image {
        name: String,
        /// `CONTAINER=IMAGE`, one or more.
        #[arg(required = true, value_name = "CONTAINER=IMAGE")]
        images: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller in the foreground: starts (or re-adopts) the proxy and the
    /// instances, applies SPEC, and rolls out every change until stopped.
    ///
    /// Ctrl-C stops only the controller: the proxy and instances keep serving, and the
    /// next `baton up` carries on where this one stopped. `baton down` stops everything.
    Up(up::UpArgs),
    /// Stop the proxy and every instance gracefully, and the controller if it runs.
    Down,
    /// Send new or changed Rollouts to the running controller. A change under `run`
    /// starts a new revision.
    Apply(SpecArgs),
    /// Check a spec and report every problem with its field path; changes nothing.
    Validate(validate::ValidateArgs),
    /// Show rollouts: phase, step, weight per revision, instances, gates.
    Status(status::StatusArgs),
    /// Wait for a rollout's verdict: exit 0 once it is `--for` (healthy by default), 1
    /// when it settles on another (degraded while waiting for healthy), 2 on timeout.
    Wait(wait::WaitArgs),
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
    /// Hold a canary or blue-green rollout at its step: traffic stays, no step advances,
    /// a timed pause and the progress deadline stop counting; gates still judge.
    Pause { name: String },
    /// Go on where `pause` held, with what was left of a timed pause.
    Resume { name: String },
    /// Roll back to the previous stable revision (through the strategy).
    Undo { name: String },
    /// Replace the stable revision's instances (pods on a cluster) one at a time: each
    /// replacement is ready before an old one stops, traffic never moves. For a
    /// process that leaks or holds stale state; refused while a revision rolls out.
    Restart { name: String },
    /// Change a cluster Rollout's template: `baton set image NAME CONTAINER=IMAGE...`.
    #[command(subcommand)]
    Set(SetCmd),
    /// Revisions of a rollout with when, outcome and duration, and its events.
    History(history::HistoryArgs),
    /// The audit trail: every action with who, when, why, and a hash chain that shows
    /// any later edit. Reads the state directory; works without a controller.
    Audit(audit::AuditArgs),
    /// Tell the whole story in this terminal. With the example exchange (default):
    /// user, trade and notification services under a trader load; trade and
    /// notification rolled to v2 on canaries, user through blue-green, then broken v3s
    /// of trade and notification rolled back on their own; the trader then checks that
    /// no order or notification was lost or doubled. With `--example hello`: a canary
    /// of a tiny HTTP service under plain load. Needs the examples built beside baton.
    Demo(demo::DemoArgs),
    /// Print a one-time login link to the running controller's web dashboard (valid
    /// for ten minutes, once). The dashboard shows every rollout live: steps, traffic
    /// per revision, instances, gate results and charts, the audit trail, and buttons
    /// to promote, abort, retry or undo.
    ///
    /// With `--namespace` (or as `kubectl baton dashboard`): serve the dashboard for
    /// that namespace's Rollouts on a cluster, on `--listen`, and print its login link.
    Dashboard(dashboard::DashboardArgs),
    /// Run the Kubernetes operator: reconciles `Rollout` resources (baton.dev/v1alpha1)
    /// with ReplicaSets, Services, Gateway API or Istio routes, with leader election on
    /// a Lease so that several replicas can run. Uses the kubeconfig or the pod's
    /// service account; `--namespace` limits it to one namespace.
    Operator(operator::OperatorArgs),
    /// Convert Argo Rollouts `Rollout`s (with the AnalysisTemplates in the same input)
    /// and Flagger `Canary`s into Baton Rollouts for the operator: YAML on stdout,
    /// and on stderr every field or step that could not be carried over.
    Convert(convert::ConvertArgs),
    /// Print the CustomResourceDefinitions (Rollout, GateTemplate,
    /// ClusterGateTemplate), or write them to a directory (as under deploy/crds/).
    Crd(operator::CrdArgs),
    /// Upgrade or restart the proxy without dropping a connection: a new proxy process
    /// (this executable) takes the listening sockets, table and counters over, and the
    /// old one drains and exits.
    RestartProxy,
    /// Run the data-plane proxy. `baton up` starts it; you rarely need this.
    Proxy(proxy::ProxyArgs),
    /// Run smoke tests (a spec's `smoke` list, as JSON) against a URL; exit status 0
    /// when all pass. What the operator's smoke Jobs run; handy by hand too.
    Smoke(smoke::SmokeArgs),
    /// Print shell completions for bash, zsh or fish, made from this binary's own
    /// commands and flags.
    ///
    /// Install: `baton completions bash > ~/.local/share/bash-completion/completions/baton`.
    Completions(completions::CompletionsArgs),
    /// Print the manual page `baton.1`, or write it and one page per subcommand
    /// (`baton-up.1`, ...) into a directory.
    ///
    /// Install: `baton man --write ~/.local/share/man/man1`, then `man baton-up`.
    Man(man::ManArgs),
}

fn main() {
    let cli = Cli::parse();
    // The controller runs on one thread: its work is mostly waiting (probes, scrapes,
    // the proxy's socket, SQLite on the local disk), and each runtime thread keeps its
    // own allocator pages and stack: on two workers it held 8.0 MB at the chaos soak's
    // 10th rollout, on one 6.5 MB (BENCHMARKS.md, "Where the memory goes").
    let mut builder = if matches!(cli.command, Cmd::Up(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
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

/// Commands that work on both platforms take the `Target`; the others name what
/// they need (the state directory, or the operator's namespace) themselves.
async fn run(cli: Cli) -> Result<()> {
    let paths = Paths::new(&cli.dir);
    let cluster = cmd::target::Kube {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
    };
    let target = Target::choose(&paths, cli.namespace.clone(), &cluster);
    cmd::target::use_kube(cluster);
    let seal = baton::trail::Seal {
        head: cli.audit_head.clone(),
        key_file: cli.audit_key_file.clone(),
    };
    match cli.command {
        Cmd::Up(args) => {
            no_transparent_huge_pages();
            purge_freed_memory_at_once();
            up::run(&paths, seal, cli.log_format, args).await
        }
        Cmd::Down => down::down(&paths, &seal).await,
        Cmd::RestartProxy => down::restart_proxy(&paths, &seal).await,
        Cmd::Proxy(args) => {
            no_transparent_huge_pages();
            proxy::run(cli.log_format, args).await
        }
        Cmd::Smoke(args) => smoke::run(args).await,
        Cmd::Apply(spec) => apply::run(&paths, spec).await,
        Cmd::Validate(args) => validate::run(args),
        Cmd::Convert(args) => convert::run(args),
        Cmd::Audit(args) => audit::run(&target, &seal, args).await,
        Cmd::Demo(args) => demo::run(args).await,
        Cmd::Operator(args) => operator::operator(cli.namespace, cli.log_format, args).await,
        Cmd::Crd(args) => operator::crd(args),
        Cmd::Completions(args) => completions::run(Cli::command(), args),
        Cmd::Man(args) => man::run(Cli::command(), args),
        Cmd::Status(args) => status::run(&target, args).await,
        Cmd::Wait(args) => wait::run(&target, args).await,
        Cmd::History(args) => history::run(&target, args).await,
        Cmd::Dashboard(args) => dashboard::run(&target, args).await,
        Cmd::Promote { name, full } => act::run(&target, &name, act::promote(full)).await,
        Cmd::Abort { name } => act::run(&target, &name, CommandKind::Abort).await,
        Cmd::Retry { name } => act::run(&target, &name, CommandKind::Retry).await,
        Cmd::Pause { name } => act::run(&target, &name, CommandKind::Pause).await,
        Cmd::Resume { name } => act::run(&target, &name, CommandKind::Resume).await,
        Cmd::Undo { name } => act::run(&target, &name, CommandKind::Undo).await,
        Cmd::Restart { name } => act::run(&target, &name, CommandKind::Restart).await,
        Cmd::Set(SetCmd::Image { name, images }) => act::set_image(&target, &name, &images).await,
    }
}

//! `baton-kube-fake`: the in-memory API server as a process, so real clients
//! (`kubectl`, `kubectl baton`) can be tried against it. Test support, not a feature.

use std::io::Write;
use std::process::ExitCode;

use baton_kube_fake::{FakeApi, sim};

const USAGE: &str = "usage: baton-kube-fake [--listen ADDR] [--kubeconfig PATH] [--sim]";

struct Args {
    listen: String,
    kubeconfig: Option<String>,
    sim: bool,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:0".into(),
        kubeconfig: None,
        sim: false,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => args.listen = it.next().ok_or("--listen needs an address")?,
            "--kubeconfig" => args.kubeconfig = Some(it.next().ok_or("--kubeconfig needs a path")?),
            "--sim" => args.sim = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// One cluster, user and context, plain http without credentials (JSON is valid YAML).
fn kubeconfig(url: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "baton-kube-fake", "cluster": {"server": url}}],
        "users": [{"name": "baton-kube-fake", "user": {}}],
        "contexts": [{"name": "baton-kube-fake", "context":
            {"cluster": "baton-kube-fake", "user": "baton-kube-fake", "namespace": "default"}}],
        "current-context": "baton-kube-fake", "preferences": {}
    })
    .to_string()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let api = match FakeApi::start_on(&args.listen).await {
        Ok(api) => api,
        Err(e) => {
            eprintln!("baton-kube-fake: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.kubeconfig
        && let Err(e) = std::fs::write(path, kubeconfig(&api.url()))
    {
        eprintln!("baton-kube-fake: cannot write kubeconfig {path}: {e}");
        return ExitCode::FAILURE;
    }
    let _sim = args
        .sim
        .then(|| sim::start(api.store.clone(), sim::SimConfig::default()));
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", api.url());
    let _ = out.flush();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("baton-kube-fake: cannot wait for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    ExitCode::SUCCESS
}

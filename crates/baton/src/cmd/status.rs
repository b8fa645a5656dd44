//! `baton status`: through the controller's API, from the state directory when no
//! controller runs, or from a cluster's Rollout.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Result, anyhow};
use baton::api::ApiClient;
use baton::paths::Paths;
use baton::view;
use clap::Args;
use serde_json::Value;

use super::target::kube_client;
use super::{Output, Target, check, print_as};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One rollout; all when left out.
    name: Option<String>,
    /// Redraw as things change until Ctrl-C (plain lines when not on a terminal).
    #[arg(short, long)]
    watch: bool,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

pub async fn run(target: &Target, args: StatusArgs) -> Result<()> {
    match target {
        Target::Local(paths) => local(paths, args).await,
        Target::Cluster { namespace } => {
            let (client, ns) = kube_client(namespace.as_deref()).await?;
            let name = args.name.clone();
            show(&args, async || match &name {
                Some(n) => Ok(baton_k8s::cli::status(&client, &ns, n).await?),
                None => {
                    let list = baton_k8s::cli::dashboard_list(&client, &ns).await?;
                    Ok(serde_json::json!({ "rollouts": list }))
                }
            })
            .await
        }
    }
}

/// Without a running controller (and not watching), the last recorded state.
async fn local(paths: &Paths, args: StatusArgs) -> Result<()> {
    let client = match ApiClient::from_paths(paths) {
        Ok(c) if c.get("/v1/rollouts").await.is_ok() => c,
        Ok(_) if paths.exists() && !args.watch => return offline(paths, args).await,
        Ok(c) => c,
        Err(e) => return Err(e),
    };
    let path = match &args.name {
        Some(n) => format!("/v1/rollouts/{n}"),
        None => "/v1/rollouts".into(),
    };
    show(&args, async || check(client.get(&path).await?)).await
}

/// Prints the status once, or with `--watch` redraws it every half second until
/// Ctrl-C (plain frames, only when something changed, when not on a terminal).
async fn show(args: &StatusArgs, mut fetch: impl AsyncFnMut() -> Result<Value>) -> Result<()> {
    let json = args.output.structured();
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let v = fetch().await?;
        let text = if json {
            args.output.document(&v)?
        } else {
            match v["rollouts"].as_array() {
                Some(list) if list.is_empty() => "no rollouts\n".to_string(),
                Some(list) => list.iter().map(view::render).collect::<Vec<_>>().join("\n"),
                None => view::render(&v),
            }
        };
        if !args.watch {
            print!("{text}");
            return Ok(());
        }
        if tty && !json {
            // Redrawn in place, with the time so a stuck controller shows.
            let frame = format!(
                "Every 0.5s: baton status {}   {} UTC\n\n{text}",
                args.name.as_deref().unwrap_or(""),
                view::clock(baton::now_ms()).get(..8).unwrap_or("")
            );
            print!("{}", view::redraw(&frame));
            let _ = std::io::stdout().flush();
        } else if text != last {
            // Not a terminal: a new frame only when something changed.
            println!("{text}");
            let _ = std::io::stdout().flush();
            last = text;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn offline(paths: &Paths, args: StatusArgs) -> Result<()> {
    let v = offline_view(paths, args.name.as_deref()).await?;
    if args.output.structured() {
        return print_as(args.output, &v);
    }
    eprintln!(
        "note: no controller is running; this is the last recorded state (start one with `baton up`)"
    );
    match v["rollouts"].as_array() {
        Some(list) => list.iter().for_each(|r| print!("{}", view::render(r))),
        None => print!("{}", view::render(&v)),
    }
    Ok(())
}

/// The last recorded state, read from the state directory while no controller runs:
/// rollouts from SQLite, instances checked against the running processes and the
/// proxy's table.
async fn offline_view(paths: &Paths, name: Option<&str>) -> Result<Value> {
    let store = baton_local::Store::open(&paths.db())?;
    let proxy = baton_proxy::ProxyClient::new(paths.proxy_socket());
    let table = proxy.table().await.ok();
    let routed = match &table {
        Some(t) => baton_proxy::routed(&t.services),
        None => Default::default(),
    };
    let platform = baton_local::Platform::inspect(&store, &routed)?;
    let mut list = Vec::new();
    for (n, spec, status) in store.rollouts::<baton_spec::Rollout, baton_engine::Status>()? {
        if name.is_some_and(|want| want != n) {
            continue;
        }
        // What the proxy serves, read from its table: the one thing known for sure
        // while no controller runs.
        let served = table.as_ref().map(|t| {
            t.services
                .iter()
                .find(|s| s.name == n)
                .map(|s| {
                    s.revisions
                        .iter()
                        .map(|r| (r.name.clone(), r.weight))
                        .collect()
                })
                .unwrap_or_default()
        });
        let routing = view::Routing {
            served,
            ..Default::default()
        };
        let mut v = view::rollout(&n, &spec, &status, routing, &platform);
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

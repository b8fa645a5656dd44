//! `baton dashboard`: a one-time login link to the running controller's dashboard,
//! or, on a cluster, the same dashboard served here for a namespace's Rollouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use baton::api::{ApiCall, ApiClient, ApiRequest, CommandKind, Identities, Reply, error};
use baton::board::{Board, Role};
use baton::paths::Paths;
use clap::Args;
use hyper::StatusCode;
use serde_json::{Value, json};

use super::target::kube_client;
use super::{Output, Target, check, print_as};

#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Where to serve the dashboard for a cluster.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

pub async fn run(target: &Target, args: DashboardArgs) -> Result<()> {
    match target {
        Target::Local(paths) => login_link(paths, args.output).await,
        Target::Cluster { namespace } => cluster(namespace.as_deref(), args.listen).await,
    }
}

async fn login_link(paths: &Paths, output: Output) -> Result<()> {
    let client = ApiClient::from_paths(paths)?;
    let v = check(client.post("/v1/login-link", None).await?)?;
    if output.structured() {
        return print_as(output, &v);
    }
    println!(
        "{}\n  (works once, for {} minutes; afterwards log in with the token in {})",
        v["url"].as_str().unwrap_or(""),
        v["expiresInSeconds"].as_u64().unwrap_or(600) / 60,
        paths.token().display()
    );
    Ok(())
}

/// The page is the same as `baton up`'s; its data comes from the API server (one
/// list a second for all browsers), and its actions become the same requests
/// `baton promote` makes. Serves until Ctrl-C.
async fn cluster(namespace: Option<&str>, listen: SocketAddr) -> Result<()> {
    let (client, ns) = kube_client(namespace).await?;
    let token = baton::paths::new_token()?;
    let ids = Identities::fixed(vec![("admin".into(), token, Role::Admin)]);
    let board = Arc::new(Board::default());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ApiRequest>(64);
    tokio::spawn(baton::api::serve(listener, ids, tx, board.clone()));
    let code = board
        .one_time_code("admin", Role::Admin, baton::now_ms())
        .context("cannot make a login link")?;
    println!(
        "dashboard for namespace {ns}: {}\n  (the link works once; Ctrl-C stops the dashboard, not the operator)",
        baton::dashboard::login_link(addr, &code)
    );
    let publisher = tokio::spawn(publish(client.clone(), ns.clone(), board));
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = tokio::signal::ctrl_c() => break,
        };
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(async move {
            let reply = answer(&client, &ns, req.call, &req.actor).await;
            let _ = req.reply.send(reply);
        });
    }
    publisher.abort();
    Ok(())
}

/// The namespace's Rollouts to every open page, once a second.
async fn publish(client: kube::Client, ns: String, board: Arc<Board>) {
    loop {
        match baton_k8s::cli::dashboard_list(&client, &ns).await {
            Ok(list) => board.publish(Value::Array(list)),
            Err(e) => tracing::warn!(error = %e, "cannot list Rollouts"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A dashboard call, answered from the cluster; changes other than the commands go
/// through kubectl or GitOps.
async fn answer(client: &kube::Client, ns: &str, call: ApiCall, actor: &str) -> Reply {
    match call {
        ApiCall::List => match baton_k8s::cli::dashboard_list(client, ns).await {
            Ok(list) => (StatusCode::OK, json!({ "rollouts": list })),
            Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        ApiCall::Get(name) => match baton_k8s::cli::dashboard_list(client, ns).await {
            Ok(list) => match list.into_iter().find(|r| r["name"] == name.as_str()) {
                Some(v) => (StatusCode::OK, v),
                None => error(
                    StatusCode::NOT_FOUND,
                    format!("no Rollout {name:?} in {ns}"),
                ),
            },
            Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        ApiCall::History(name) => match baton_k8s::cli::history(client, ns, &name).await {
            Ok(h) => (StatusCode::OK, history_page(&name, &h)),
            Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        ApiCall::Command { name, kind } => {
            let result = match kind {
                CommandKind::Undo => baton_k8s::cli::undo(client, ns, &name).await,
                k => {
                    let wait = Duration::from_secs(30);
                    baton_k8s::cli::request(client, ns, &name, k.as_str(), actor, wait).await
                }
            };
            match result {
                Ok(msg) => (StatusCode::OK, json!({ "result": msg })),
                Err(e) => error(StatusCode::CONFLICT, e.to_string()),
            }
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "not available for a cluster: use kubectl or GitOps to change Rollouts",
        ),
    }
}

/// The cluster's history in the shape of the page's audit table: time, actor,
/// action, reason.
fn history_page(name: &str, h: &Value) -> Value {
    let events: Vec<Value> = h["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let at = e["at"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map(|t| t.as_millisecond())
                .unwrap_or(0);
            json!({"at": at, "actor": "baton-operator", "action": e["reason"], "reason": e["note"]})
        })
        .collect();
    json!({"name": name, "revisions": h["revisions"], "events": events})
}

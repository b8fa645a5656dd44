//! `baton down` and `baton restart-proxy`: the two commands that act on the proxy
//! and instances directly, and so record in the audit trail themselves.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton::api::ApiClient;
use baton::paths::Paths;
use baton::trail::Seal;

use super::check;

/// Stops everything: through the controller when it runs, directly otherwise.
pub async fn down(paths: &Paths, seal: &Seal) -> Result<()> {
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
    audit_local(paths, seal, "down", &said);
    println!("{said}");
    Ok(())
}

/// A new proxy process takes the running one's sockets over; it runs with the old
/// one's settings unless this command's environment sets them.
pub async fn restart_proxy(paths: &Paths, seal: &Seal) -> Result<()> {
    let proxy = baton_proxy::ProxyClient::new(paths.proxy_socket());
    let (old_pid, version) = proxy.ping().await.with_context(|| {
        format!(
            "no proxy answers on {}: is `baton up` running?",
            paths.proxy_socket().display()
        )
    })?;
    let args = takeover_args(&proxy).await;
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
    audit_local(paths, seal, "config", &said);
    println!("{said}");
    Ok(())
}

/// The new process runs as the old one did; a setting in this command's environment
/// wins (an upgrade is a moment to change it). A proxy too old to tell: defaults.
async fn takeover_args(proxy: &baton_proxy::ProxyClient) -> Vec<String> {
    let mut args = vec!["--takeover".to_string()];
    if let Ok(Some(s)) = proxy.settings().await {
        if std::env::var_os("BATON_PROXY_WORKERS").is_none() {
            args.extend(["--workers".to_string(), s.workers.to_string()]);
        }
        if std::env::var_os("BATON_PROXY_CPU_AFFINITY").is_none() {
            args.extend(["--cpu-affinity".into(), s.cpu_affinity.as_str().into()]);
        }
        if let Some(f) = &s.metrics_textfile {
            args.extend(["--metrics-textfile".to_string(), f.display().to_string()]);
        }
        args.extend([
            "--max-body-bytes".to_string(),
            s.max_body_bytes.to_string(),
            "--request-timeout".to_string(),
            s.request_timeout_secs.to_string(),
        ]);
    }
    args
}

/// Records, in the same hash-chained trail, what a command did without the
/// controller (which records everything that goes through it). What was done is
/// done: a trail that refuses the entry (no key for a signed trail, a truncated
/// trail) is reported, as the controller reports it.
fn audit_local(paths: &Paths, seal: &Seal, action: &str, reason: &str) {
    if let Err(e) = append_local(paths, seal, action, reason) {
        eprintln!("warning: {e:#}");
    }
}

fn append_local(paths: &Paths, seal: &Seal, action: &str, reason: &str) -> Result<()> {
    // Only the controller makes a key: one made here would not be the controller's.
    let log = seal.writer(paths, false)?;
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

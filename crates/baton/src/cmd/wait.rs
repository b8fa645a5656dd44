//! `baton wait NAME --for healthy`: waits for a rollout's verdict and says it with the
//! exit status, so a CI pipeline is written once for both platforms (the model is
//! `kubectl argo rollouts status --timeout`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use baton::api::ApiClient;
use baton::view::printable;
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::target::kube_client;
use super::{Target, check};

#[derive(Args, Debug)]
pub struct WaitArgs {
    name: String,
    /// The verdict to wait for. `healthy`: the spec's revision serves all traffic;
    /// `degraded`: the new revision was aborted; `paused`: waiting for a person.
    #[arg(long = "for", value_enum, default_value = "healthy")]
    until: Until,
    /// Give up after this long (exit status 2), e.g. `90s`, `10m`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Until {
    Healthy,
    Degraded,
    Paused,
}

/// Exit status when the rollout settles on another verdict than the one waited for.
const OTHER_VERDICT: i32 = 1;
/// Exit status on timeout.
const TIMED_OUT: i32 = 2;

pub async fn run(target: &Target, args: WaitArgs) -> Result<()> {
    let Some(deadline) = Instant::now().checked_add(args.timeout) else {
        bail!(
            "--timeout {}: longer than this machine's clock can count",
            humantime::format_duration(args.timeout)
        );
    };
    let local = match target {
        Target::Local(paths) => Some(ApiClient::from_paths(paths)?),
        Target::Cluster { .. } => None,
    };
    let mut said = String::new();
    loop {
        let v = match (&local, target) {
            (Some(client), _) => check(client.get(&format!("/v1/rollouts/{}", args.name)).await?)?,
            (None, Target::Cluster { namespace }) => {
                let (client, ns) = kube_client(namespace.as_deref()).await?;
                baton_k8s::cli::status(&client, &ns, &args.name).await?
            }
            (None, Target::Local(_)) => bail!("no controller to ask"),
        };
        let phase = v["phase"].as_str().unwrap_or("");
        let message = printable(v["message"].as_str().unwrap_or(""));
        let line = format!("{phase}: {message}");
        if line != said {
            eprintln!("{} {line}", args.name);
            said = line;
        }
        match verdict(&v) {
            Some(got) if got == args.until => {
                println!("{}: {phase}: {message}", args.name);
                return Ok(());
            }
            // A rollout that settled elsewhere will not get there by itself.
            Some(Until::Degraded | Until::Healthy) => {
                eprintln!("{}: {phase}, not {:?}: {message}", args.name, args.until);
                std::process::exit(OTHER_VERDICT);
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            eprintln!(
                "{}: still {phase} after {}: {message}",
                args.name,
                humantime::format_duration(args.timeout)
            );
            std::process::exit(TIMED_OUT);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where a rollout stands: healthy only once the spec's revision is the stable one
/// (an `apply` the controller has not stepped yet still shows the old Healthy) and,
/// on a cluster, the operator has seen the latest generation.
fn verdict(v: &Value) -> Option<Until> {
    let current_generation =
        v["observedGeneration"] == v["generation"] || v["generation"].is_null();
    match v["phase"].as_str()? {
        "Healthy"
            if v["stableRevision"] == v["specRevision"]
                && v["canaryRevision"].is_null()
                && current_generation =>
        {
            Some(Until::Healthy)
        }
        "Degraded" if current_generation => Some(Until::Degraded),
        "Paused" if current_generation => Some(Until::Paused),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn healthy_means_the_spec_revision_serves_everything() {
        let done = json!({"phase": "Healthy", "stableRevision": "b", "specRevision": "b", "canaryRevision": null});
        assert_eq!(verdict(&done), Some(Until::Healthy));
        let stale = json!({"phase": "Healthy", "stableRevision": "a", "specRevision": "b", "canaryRevision": null});
        assert_eq!(verdict(&stale), None, "an apply not stepped yet");
        let old_generation = json!({"phase": "Healthy", "stableRevision": "b", "specRevision": "b", "canaryRevision": null, "generation": 3, "observedGeneration": 2});
        assert_eq!(verdict(&old_generation), None);
        assert_eq!(
            verdict(&json!({"phase": "Degraded"})),
            Some(Until::Degraded)
        );
        assert_eq!(verdict(&json!({"phase": "Progressing"})), None);
    }
}

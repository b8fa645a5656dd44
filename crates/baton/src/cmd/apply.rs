//! `baton apply`: new or changed Rollouts to the running controller.

use anyhow::{Result, anyhow};
use baton::api::ApiClient;
use baton::paths::Paths;

use super::{SpecArgs, check, read_spec};

pub async fn run(paths: &Paths, spec: SpecArgs) -> Result<()> {
    let text = read_spec(&spec.file)?;
    // Said here, before sending: a controller that refuses a body mid-upload leaves the
    // client with a "Broken pipe" instead of the reason.
    if text.len() > baton::api::MAX_SPEC_BYTES {
        return Err(anyhow!(
            "{}: the spec is {} bytes; apply takes at most 1 MiB (1048576 bytes)",
            spec.file.display(),
            text.len()
        ));
    }
    // Validate here too, so a bad spec is reported even with no controller.
    baton_spec::parse(&text).map_err(|e| anyhow!("{}: {e}", spec.file.display()))?;
    let client = ApiClient::from_paths(paths)?;
    let v = check(client.post("/v1/apply", Some(text)).await?)?;
    for n in v["applied"].as_array().into_iter().flatten() {
        println!("rollout {} configured", n.as_str().unwrap_or(""));
    }
    for n in v["unchanged"].as_array().into_iter().flatten() {
        println!("rollout {} unchanged", n.as_str().unwrap_or(""));
    }
    Ok(())
}

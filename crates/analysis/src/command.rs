//! The command provider: a program's exit status is the result.

use std::process::Stdio;

use baton_spec::CommandMetric;

use crate::provider::{MetricProvider, ProviderError, Sample, Vars};

pub struct Command<'a>(pub &'a CommandMetric);

impl MetricProvider for Command<'_> {
    async fn sample(&self, vars: &Vars) -> Result<Sample, ProviderError> {
        let argv = &self.0.command;
        let Some(program) = argv.first() else {
            return Err(ProviderError::Invalid("the command is empty".into()));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&argv[1..])
            .env("BATON_SERVICE", &vars.service)
            .env("BATON_REVISION", &vars.revision)
            .env("BATON_STABLE", vars.stable.as_deref().unwrap_or(""))
            .env(
                "BATON_ADDRESS",
                vars.address.map(|a| a.to_string()).unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // The machine's transparent-huge-page policy, not the one `baton up` chose for
        // itself (the kernel passes it on through fork and exec).
        // SAFETY: prctl with integer arguments is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ProviderError::Invalid(format!("cannot run {program:?}: {e}")))?;
        match tokio::time::timeout(self.0.timeout.0, child.wait()).await {
            Ok(Ok(status)) => match status.code() {
                Some(code) => Ok(Sample::Value(f64::from(code))),
                None => Err(ProviderError::Invalid(format!(
                    "{program:?} was killed by a signal"
                ))),
            },
            Ok(Err(e)) => Err(ProviderError::Invalid(format!("{program:?}: {e}"))),
            Err(_) => Err(ProviderError::Timeout {
                what: format!("{program:?}"),
                seconds: self.0.timeout.0.as_secs_f64(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_spec::Duration;

    #[tokio::test]
    async fn exit_status_is_the_result() {
        let run = |script: &str, timeout: u64| CommandMetric {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs(timeout),
        };
        let vars = Vars {
            service: "web".into(),
            revision: "abc".into(),
            ..Vars::default()
        };
        assert_eq!(
            Command(&run("exit 0", 5)).sample(&vars).await,
            Ok(Sample::Value(0.0))
        );
        assert_eq!(
            Command(&run("exit 3", 5)).sample(&vars).await,
            Ok(Sample::Value(3.0))
        );
        let env = run("test \"$BATON_SERVICE/$BATON_REVISION\" = web/abc", 5);
        assert_eq!(Command(&env).sample(&vars).await, Ok(Sample::Value(0.0)));
        let slow = Command(&run("sleep 5", 1)).sample(&vars).await;
        assert!(
            matches!(slow, Err(ProviderError::Timeout { .. })),
            "{slow:?}"
        );
    }
}

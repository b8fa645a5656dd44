//! Webhook notifications: a JSON body or a Slack-compatible one, delivered in the
//! background with retries, so a slow or dead receiver never holds up a rollout.
//!
//! Secrets stay secret: URLs and header values may take `${NAME}` from the
//! controller's environment, and what is logged names the webhook and its host only.

use std::time::Duration;

use baton_spec::{Notification, NotificationEvent, NotificationFormat};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

/// Tries per notification, and the wait before the second (doubling after).
pub const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    /// The event's stable id: a receiver drops a notice whose id it has seen (a
    /// restart may deliver one again).
    pub id: String,
    pub rollout: String,
    pub event: &'static str,
    pub revision: Option<String>,
    pub app_version: Option<String>,
    pub phase: String,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
}

/// What became of one delivery, for the controller's log and audit trail.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub rollout: String,
    pub ok: bool,
    pub message: String,
}

#[derive(Clone)]
pub struct Notifier {
    https: Option<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
    http: Client<HttpConnector, Full<Bytes>>,
    reports: mpsc::UnboundedSender<Delivery>,
}

impl Notifier {
    pub fn new(reports: mpsc::UnboundedSender<Delivery>) -> Notifier {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30));
            b
        };
        // Without the system's CA certificates, https webhooks fail with a clear error
        // and http ones still work.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .ok()
            .map(|b| builder().build(b.https_or_http().enable_http1().build()));
        Notifier {
            https,
            http: builder().build_http(),
            reports,
        }
    }

    /// Sends `notice` to every webhook that wants its event, each in its own task.
    pub fn notify(&self, targets: &[Notification], event: NotificationEvent, notice: Notice) {
        for t in targets.iter().filter(|t| t.events.contains(&event)) {
            let (n, t, notice) = (self.clone(), t.clone(), notice.clone());
            tokio::spawn(async move { n.deliver(t, notice).await });
        }
    }

    async fn deliver(&self, target: Notification, notice: Notice) {
        let report = |ok, message: String| {
            let _ = self.reports.send(Delivery {
                rollout: notice.rollout.clone(),
                ok,
                message,
            });
        };
        let url = match expand(&target.url) {
            Ok(u) => u,
            Err(var) => {
                return report(
                    false,
                    format!(
                        "notification {}: ${{{var}}} is not set in the controller's environment",
                        target.name
                    ),
                );
            }
        };
        let shown = redact(&url);
        let body = match target.format {
            NotificationFormat::Json => serde_json::to_vec(&notice).unwrap_or_default(),
            NotificationFormat::Slack => {
                serde_json::to_vec(&json!({ "text": slack_text(&notice) })).unwrap_or_default()
            }
        };
        let mut headers = Vec::new();
        for (k, v) in &target.headers {
            match expand(v) {
                Ok(v) => headers.push((k.clone(), v)),
                Err(var) => {
                    return report(
                        false,
                        format!(
                            "notification {}: header {k} needs ${{{var}}}, which is not set",
                            target.name
                        ),
                    );
                }
            }
        }
        // A doubling wait between a few attempts, written out: a retry crate would add
        // a dependency for these six lines, and each attempt's outcome is reported here.
        let mut wait = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.post(&url, &headers, body.clone()).await {
                Ok(()) => {
                    if attempt > 1 {
                        report(
                            true,
                            format!(
                                "notification {} ({}) delivered to {shown} on attempt {attempt}",
                                target.name, notice.event
                            ),
                        );
                    }
                    return;
                }
                Err(e) => last = e,
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        report(
            false,
            format!(
                "notification {} ({}) to {shown} failed after {ATTEMPTS} attempts: {last}",
                target.name, notice.event
            ),
        );
    }

    async fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<(), String> {
        let mut req = Request::post(url).header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        // Errors from here on may quote the URL: they are reduced to their kind.
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "the URL or a header is malformed".to_string())?;
        let fut = async {
            let resp = if url.starts_with("https://") {
                match &self.https {
                    Some(c) => c.request(req).await,
                    None => return Err("no CA certificates on this machine for https".to_string()),
                }
            } else {
                self.http.request(req).await
            }
            .map_err(|e| {
                if e.is_connect() {
                    "cannot connect".to_string()
                } else {
                    "the connection failed".to_string()
                }
            })?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", status.as_u16()))
            }
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")))
    }
}

impl crate::Notify for Notifier {
    fn notify(&self, t: &crate::Target<'_>, e: &crate::Event) {
        let Some(event) = e.notify else { return };
        if t.spec.spec.notifications.is_empty() {
            return;
        }
        let notice = Notice {
            id: e.id.clone(),
            rollout: t.name.to_string(),
            event: event.as_str(),
            revision: e.revision.clone(),
            app_version: e.app_version.clone(),
            phase: e.phase.clone(),
            reason: notice_reason(e),
            at: e.at,
        };
        Notifier::notify(self, &t.spec.spec.notifications, event, notice);
    }
}

/// A pause is told in the status' words, not as the phase change that carries it.
fn notice_reason(e: &crate::Event) -> String {
    match e.notify {
        Some(NotificationEvent::Paused) => e
            .message
            .split_once(": ")
            .map(|(_, why)| why.to_string())
            .unwrap_or_else(|| e.message.clone()),
        _ => e.message.clone(),
    }
}

fn slack_text(n: &Notice) -> String {
    let what = match n.event {
        "started" => "rollout started",
        "paused" => "paused",
        "stepPassed" => "step passed",
        "promoted" => "promoted",
        "aborted" => "aborted",
        "rolledBack" => "rolled back",
        other => other,
    };
    format!(
        "*{}* {what}{}: {}",
        n.rollout,
        n.app_version
            .as_deref()
            .map(|v| format!(" ({v})"))
            .unwrap_or_default(),
        n.reason
    )
}

/// Replaces `${NAME}` from the environment; the error is the first unset name.
pub fn expand(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &rest[start + 2..start + end];
        out.push_str(&std::env::var(name).map_err(|_| name.to_string())?);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `scheme://host:port/…`: enough to tell webhooks apart, never a token in a path or query.
pub fn redact(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => format!(
            "{}://{}/…",
            u.scheme_str().unwrap_or("http"),
            u.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or(""))
                .unwrap_or("")
        ),
        Err(_) => "(unparsable URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_to_their_host() {
        assert_eq!(
            redact("https://hooks.example.com/services/T0/B0/secret"),
            "https://hooks.example.com/…"
        );
        assert_eq!(
            redact("http://user:pw@127.0.0.1:9000/x?token=s"),
            "http://127.0.0.1:9000/…"
        );
    }

    #[test]
    fn placeholders_come_from_the_environment() {
        // PATH is set in every test environment.
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(
            expand("a${PATH}b").as_deref(),
            Ok(format!("a{path}b").as_str())
        );
        assert_eq!(
            expand("${BATON_SURELY_UNSET_VARIABLE}"),
            Err("BATON_SURELY_UNSET_VARIABLE".to_string())
        );
        assert_eq!(expand("plain").as_deref(), Ok("plain"));
    }
}

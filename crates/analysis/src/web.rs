//! The web provider: an HTTP GET whose JSON answer holds the value.

use baton_spec::WebMetric;

use crate::provider::{MetricProvider, ProviderError, Sample, Vars, http_get};

pub struct Web<'a>(pub &'a WebMetric);

impl MetricProvider for Web<'_> {
    async fn sample(&self, vars: &Vars) -> Result<Sample, ProviderError> {
        let url = vars.apply(&self.0.url);
        let headers: Vec<(String, String)> = self
            .0
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), vars.apply(v)))
            .collect();
        let body = http_get(&url, &headers, self.0.timeout.0, "the web metric").await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Invalid(format!("the web metric's answer is not JSON: {e}"))
        })?;
        pick(&v, self.0.json_path.as_deref().unwrap_or(""))
    }
}

/// The number at a dotted path (`data.items.0.value`). A dotted path covers what a
/// gate reads; a JSONPath engine would be a dependency for features no gate needs.
pub fn pick(v: &serde_json::Value, path: &str) -> Result<Sample, ProviderError> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = match (cur, part.parse::<usize>()) {
            (serde_json::Value::Array(a), Ok(i)) => a.get(i),
            (serde_json::Value::Object(o), _) => o.get(part),
            _ => None,
        }
        .ok_or_else(|| {
            ProviderError::Invalid(format!(
                "the answer has nothing at {path:?} (stopped at {part:?})"
            ))
        })?;
    }
    match cur {
        serde_json::Value::Number(n) => Ok(Sample::Value(n.as_f64().unwrap_or(f64::NAN))),
        serde_json::Value::String(s) => s
            .parse()
            .map(Sample::Value)
            .map_err(|_| ProviderError::Invalid(format!("{path:?} holds {s:?}, not a number"))),
        serde_json::Value::Bool(b) => Ok(Sample::Value(if *b { 1.0 } else { 0.0 })),
        serde_json::Value::Null => Ok(Sample::NoData(format!("{path:?} is null"))),
        other => Err(ProviderError::Invalid(format!(
            "{path:?} holds {other}, not a number"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https server on loopback with a fresh self-signed certificate for
    /// `localhost`, answering `{"value": 0.25}`; its port and the certificate's PEM.
    async fn https_server() -> (u16, String) {
        use tokio_rustls::rustls;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(r#"{"value": 0.25}"#)),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (port, cert.cert.pem())
    }

    #[tokio::test]
    async fn https_metrics_are_read_and_their_certificates_checked() {
        let (trusted, pem) = https_server().await;
        let (untrusted, _) = https_server().await;
        let dir = std::env::temp_dir().join(format!("baton-web-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pem).expect("write ca");
        // SAFETY: set before any other thread of this test process reads the
        // environment (a current-thread runtime; nextest runs one test per process).
        unsafe { std::env::set_var("SSL_CERT_FILE", &ca) };
        let vars = Vars {
            service: "web".into(),
            revision: "r1".into(),
            stable: None,
            address: None,
        };
        let metric = |port: u16| WebMetric {
            url: format!("https://localhost:{port}/metric"),
            json_path: Some("value".into()),
            headers: Default::default(),
            timeout: baton_spec::Duration::from_secs(5),
        };
        let m = metric(trusted);
        assert_eq!(Web(&m).sample(&vars).await, Ok(Sample::Value(0.25)));
        let m = metric(untrusted);
        let e = Web(&m)
            .sample(&vars)
            .await
            .expect_err("a certificate no CA signed");
        assert!(e.to_string().contains("certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_reach_numbers() {
        let v = serde_json::json!({"data": {"items": [{"value": 0.5}, {"value": "7"}], "ok": true, "none": null}});
        assert_eq!(pick(&v, "data.items.0.value"), Ok(Sample::Value(0.5)));
        assert_eq!(pick(&v, "data.items.1.value"), Ok(Sample::Value(7.0)));
        assert_eq!(pick(&v, "data.ok"), Ok(Sample::Value(1.0)));
        assert!(matches!(pick(&v, "data.none"), Ok(Sample::NoData(_))));
        assert!(pick(&v, "data.items.5").is_err());
        assert!(
            pick(&v, "data")
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
    }
}

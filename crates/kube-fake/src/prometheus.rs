//! A real Prometheus server on loopback, for tests whose gates read a cluster's
//! metrics: it scrapes exporters the test runs and stops when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus` (Debian's package; `scripts/test` installs it) scraping
    /// `targets` every second, its data and log under `dir`; waits until it listens.
    pub fn start(dir: &Path, targets: &[SocketAddr]) -> std::io::Result<Prometheus> {
        Prometheus::start_path(dir, targets, "/metrics")
    }

    /// The same, scraping `path` (Envoy's admin serves `/stats/prometheus`).
    pub fn start_path(
        dir: &Path,
        targets: &[SocketAddr],
        path: &str,
    ) -> std::io::Result<Prometheus> {
        Prometheus::start_scraping(dir, targets, path, None)
    }

    /// The same, and the pods listed in `pods` (a file_sd file, as the box's kubelet
    /// writes it from the pods' `prometheus.io/*` annotations: Debian's Prometheus has
    /// no Kubernetes discovery), re-read as it changes.
    pub fn start_scraping(
        dir: &Path,
        targets: &[SocketAddr],
        path: &str,
        pods: Option<&Path>,
    ) -> std::io::Result<Prometheus> {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let pods = pods
            .map(|f| {
                format!(
                    "  - job_name: pods\n    file_sd_configs: [{{ files: [\"{}\"], refresh_interval: 1s }}]\n",
                    f.display()
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: baton\n    metrics_path: \"{path}\"\n    static_configs: [{{ targets: [{}] }}]\n{pods}",
                targets.join(", ")
            ),
        )?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .spawn()?;
        let p = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "Prometheus did not listen on {addr} within 30 s (see {})",
                    dir.join("prometheus.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

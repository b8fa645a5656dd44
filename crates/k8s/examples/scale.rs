//! Scale benchmark: N Rollouts reconciled by a real `baton operator` process on the
//! in-memory API server with the simulated cluster. Creates N Rollouts, waits until
//! all are Healthy, changes every template (a canary each: 50 %, then promotion),
//! waits again, and reports the operator's peak memory (VmHWM) and its reconcile
//! latency quantiles (from its own /metrics).
//!
//! cargo run --release -p baton-k8s --example scale -- 10000 target/release/baton

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_kube_fake::{FakeApi, Key, sim};
use serde_json::{Value, json};

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn rollout(i: usize, image: &str) -> Value {
    json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": format!("r{i}"), "namespace": "bench"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": format!("r{i}")}},
            "template": {"metadata": {"labels": {"app": format!("r{i}")}}, "spec": {"containers": [{"name": "app", "image": image}]}},
            "strategy": {"canary": {"steps": [{"setWeight": 50}]}},
        },
    })
}

fn count(api: &FakeApi, version: &str) -> usize {
    let (items, _) = api
        .store
        .list("baton.dev/v1alpha1", "rollouts", Some("bench"));
    items
        .iter()
        .filter(|r| r["status"]["phase"] == "Healthy" && r["status"]["stableVersion"] == version)
        .count()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let baton = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "target/release/baton".into());
    let api = FakeApi::start().await.expect("fake api");
    let _sim = sim::start(
        api.store.clone(),
        sim::SimConfig {
            tick: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let dir = std::env::temp_dir().join(format!("baton-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, format!("apiVersion: v1\nkind: Config\nclusters: [{{name: f, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: f, context: {{cluster: f, user: u, namespace: bench}}}}]\ncurrent-context: f\n", api.url())).expect("kubeconfig");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
    };
    let (health, metrics) = (free(), free());
    let mut op = Command::new(&baton)
        .args([
            "operator",
            "--namespace",
            "bench",
            "--leader-election-namespace",
            "bench",
            "--identity",
            "scale",
        ])
        .args([
            "--health-listen",
            &health.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .env("KUBECONFIG", &kc)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("baton operator");
    let pid = op.id();
    let started = Instant::now();
    for i in 0..n {
        api.store
            .create(
                &Key::new("baton.dev/v1alpha1", "rollouts", Some("bench"), ""),
                rollout(i, "app:v1"),
            )
            .expect("create");
    }
    let mut peak_rss = 0;
    let wait = |version: &'static str, peak: &mut u64| {
        let api = &api;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let t0 = Instant::now();
        loop {
            *peak = (*peak).max(rss_kib(pid, "VmRSS:"));
            let done = count(api, version);
            if done == n {
                return t0.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "only {done} of {n} reached {version}"
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    };
    let first = tokio::task::block_in_place(|| wait("v1", &mut peak_rss));
    eprintln!(
        "{n} rollouts Healthy on v1 after {:.1}s",
        first.as_secs_f64()
    );
    for i in 0..n {
        let key = Key::new(
            "baton.dev/v1alpha1",
            "rollouts",
            Some("bench"),
            &format!("r{i}"),
        );
        api.store
            .modify(&key, false, |o| {
                o["spec"]["template"]["spec"]["containers"][0]["image"] = json!("app:v2");
                Ok(())
            })
            .expect("new template");
    }
    let second = tokio::task::block_in_place(|| wait("v2", &mut peak_rss));
    eprintln!(
        "{n} canaries promoted to v2 after {:.1}s",
        second.as_secs_f64()
    );
    let text = scrape(metrics);
    let hwm = rss_kib(pid, "VmHWM:");
    let _ = op.kill();
    let _ = op.wait();
    let p50 = metric(&text, "baton_operator_reconcile_seconds{quantile=\"0.5\"}") * 1000.0;
    let p99 = metric(&text, "baton_operator_reconcile_seconds{quantile=\"0.99\"}") * 1000.0;
    let reconciles = metric(&text, "baton_operator_reconciles_total");
    println!(
        "| {n} | {:.1} s | {:.1} s | {:.0} | {:.0} MiB | {p50:.1} ms | {p99:.1} ms |",
        first.as_secs_f64(),
        second.as_secs_f64(),
        reconciles,
        hwm.max(peak_rss) as f64 / 1024.0,
    );
    let _ = started;
}

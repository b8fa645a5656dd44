//! Services' virtual addresses for the box's pods: each Service with a selector gets a
//! ClusterIP (`127.SUBNET.255.N`, written into `spec.clusterIP` as the API server
//! assigns one on creation), a userspace proxy on `CLUSTERIP:PORT` for each of its
//! ports that sends each new connection to one of the ready endpoints of its
//! EndpointSlice (round robin; kube-proxy's old userspace mode), and a name in the
//! hosts file the kubelet gives its pods (`NAME.NAMESPACE.svc` and
//! `NAME.NAMESPACE.svc.cluster.local`): the box's DNS.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::store::{Key, Store};

type Endpoints = Arc<Mutex<Vec<SocketAddr>>>;

pub(crate) struct KubeProxy {
    subnet: u8,
    hosts: PathBuf,
    next: u32,
    /// `(namespace, service, port)` → its endpoints, read by the listener's task.
    ports: HashMap<(String, String, u16), (Endpoints, tokio::task::JoinHandle<()>)>,
    written: String,
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        for (_, (_, task)) in self.ports.drain() {
            task.abort();
        }
    }
}

impl KubeProxy {
    pub(crate) fn new(subnet: u8, hosts: PathBuf) -> KubeProxy {
        KubeProxy {
            subnet,
            hosts,
            next: 1,
            ports: HashMap::new(),
            written: String::new(),
        }
    }

    pub(crate) fn sync(&mut self, store: &Store) {
        let (services, _) = store.list("v1", "services", None);
        let (slices, _) = store.list("discovery.k8s.io/v1", "endpointslices", None);
        let mut names = BTreeMap::new();
        for svc in &services {
            if !svc["spec"]["selector"].is_object() {
                continue;
            }
            let ns = svc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = svc["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ip: Ipv4Addr = match svc["spec"]["clusterIP"]
                .as_str()
                .and_then(|s| s.parse().ok())
            {
                Some(ip) => ip,
                None => {
                    let ip = Ipv4Addr::new(127, self.subnet, 255, (self.next % 250 + 1) as u8);
                    self.next += 1;
                    let key = Key::new("v1", "services", Some(&ns), &name);
                    if store
                        .modify(&key, false, |o| {
                            o["spec"]["clusterIP"] = json!(ip.to_string());
                            o["spec"]["clusterIPs"] = json!([ip.to_string()]);
                            Ok(())
                        })
                        .is_err()
                    {
                        continue;
                    }
                    ip
                }
            };
            names.insert(format!("{name}.{ns}.svc"), ip);
            let ready: Vec<(u16, Vec<Ipv4Addr>)> = slices
                .iter()
                .filter(|s| {
                    s["metadata"]["namespace"].as_str() == Some(ns.as_str())
                        && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                            == Some(name.as_str())
                })
                .filter_map(|s| {
                    let port = s["ports"][0]["port"].as_u64()? as u16;
                    let ips = s["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|e| e["conditions"]["ready"] == true)
                        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
                        .filter_map(|a| a.as_str()?.parse().ok())
                        .collect();
                    Some((port, ips))
                })
                .collect();
            for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
                let Some(port) = p["port"].as_u64().map(|p| p as u16) else {
                    continue;
                };
                let target: Vec<SocketAddr> = ready
                    .iter()
                    .flat_map(|(tp, ips)| ips.iter().map(|ip| SocketAddr::from((*ip, *tp))))
                    .collect();
                let k = (ns.clone(), name.clone(), port);
                if let Some((eps, _)) = self.ports.get(&k) {
                    *eps.lock().unwrap_or_else(|p| p.into_inner()) = target;
                    continue;
                }
                let eps: Endpoints = Arc::new(Mutex::new(target));
                let task = tokio::spawn(serve(SocketAddr::from((ip, port)), eps.clone()));
                self.ports.insert(k, (eps, task));
            }
        }
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in &names {
            hosts.push_str(&format!("{ip} {name} {name}.cluster.local\n"));
        }
        // In place: the pods' mount namespaces hold this file's inode.
        if hosts != self.written && write_in_place(&self.hosts, &hosts).is_ok() {
            self.written = hosts;
        }
    }
}

fn write_in_place(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

async fn serve(addr: SocketAddr, eps: Endpoints) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kube-proxy: cannot listen on {addr}: {e}");
            return;
        }
    };
    let turn = Arc::new(AtomicUsize::new(0));
    while let Ok((mut client, _)) = listener.accept().await {
        let target = {
            let eps = eps.lock().unwrap_or_else(|p| p.into_inner());
            (!eps.is_empty()).then(|| eps[turn.fetch_add(1, Ordering::Relaxed) % eps.len()])
        };
        // No ready endpoint: the connection is refused, as by kube-proxy's REJECT rule.
        let Some(target) = target else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}

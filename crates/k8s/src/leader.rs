//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas
//! can run and only one acts. Optimistic concurrency does the arbitration: every
//! acquire and renew is a replace carrying the resourceVersion that was read, so of
//! two candidates only one write succeeds.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::Api;
use tokio::sync::watch;

use crate::Error;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name (the pod's name on a cluster).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: "baton-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One attempt: true if we hold the lease afterwards.
async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, Error> {
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: Some(acquired.unwrap_or_else(now)),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec(0, None)),
        };
        return match api.create(&crate::post_params(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let mine = current.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let expired = match (&current.renew_time, current.lease_duration_seconds) {
        (Some(MicroTime(t)), Some(d)) => {
            let until = t
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(d)))
                .unwrap_or(*t);
            until < Timestamp::now()
        }
        _ => true,
    };
    if !mine
        && !expired
        && current
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty())
    {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
    lease.spec = Some(spec(
        transitions,
        if mine {
            current.acquire_time.clone()
        } else {
            None
        },
    ));
    match api.replace(&cfg.name, &crate::post_params(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A held lease, renewed in the background. `lost` turns true when a renewal could
/// not be made within the lease's duration (another replica may act from then on).
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leadership {
    /// Resolves once leadership is lost.
    pub fn lost_future(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.lost.clone();
        async move {
            let _ = rx.wait_for(|l| *l).await;
        }
    }
}

/// Waits until this replica holds the lease, then keeps renewing it.
pub async fn acquire(client: Client, cfg: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        match try_hold(&api, &cfg).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(cfg.renew_every).await;
            match try_hold(&api, &cfg).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!("leader election: another replica holds the Lease now");
                    let _ = tx.send(true);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewal failed");
                    if last_ok.elapsed() >= cfg.duration {
                        let _ = tx.send(true);
                        return;
                    }
                }
            }
        }
    });
    Leadership { lost: rx, task }
}

/// Gives the lease up (on a clean shutdown), so that the next replica need not wait
/// for it to expire.
pub async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(cfg.identity.as_str())
    {
        if let Some(s) = lease.spec.as_mut() {
            s.holder_identity = None;
            s.renew_time = None;
        }
        let _ = api.replace(&cfg.name, &crate::post_params(), &lease).await;
    }
}

/// The operator: lead, reconcile while leading, and start over when leadership is lost.
pub async fn run_leading(
    client: Client,
    lease: LeaseConfig,
    namespace: Option<String>,
    seal: crate::audit::Seal,
    jobs: crate::jobs::Settings,
    on_context: impl Fn(std::sync::Arc<crate::controller::Context>) + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    loop {
        let leadership = tokio::select! {
            l = acquire(client.clone(), lease.clone()) => l,
            _ = &mut shutdown => return Ok(()),
        };
        let ctx = crate::controller::Context::configured(
            client.clone(),
            &lease.identity,
            seal.clone(),
            jobs.clone(),
        );
        on_context(ctx.clone());
        let lost = leadership.lost_future();
        // The controller runs inside this task: when leadership goes, dropping its
        // future stops every watch and reconcile at once.
        let controller = crate::controller::run(ctx, namespace.clone(), std::future::pending());
        tokio::select! {
            _ = controller => return Ok(()),
            _ = lost => {
                tracing::warn!("lost the lease: stopping the controller and campaigning again");
            }
            _ = &mut shutdown => {
                release(client.clone(), &lease).await;
                return Ok(());
            }
        }
    }
}

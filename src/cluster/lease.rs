//! One actor at a time: a coordination.k8s.io Lease in the dSSM namespace. The CronJob also uses
//! `concurrencyPolicy: Forbid`; the Lease covers a manual Job or an agent running alongside.
//!
//! The semantics follow client-go's leader election (k8s.io/client-go/tools/leaderelection,
//! `tryAcquireOrRenew`): a lease duration, a renew deadline (2/3 of it) after which a holder that
//! could not renew stops acting, a retry period (1/6) between renewals, every write made with the
//! resourceVersion it read (a lost race is a 409, never two holders). Like client-go, a Lease held
//! by someone else is judged expired on *our* monotonic clock: we watch its resourceVersion stay
//! unchanged for a whole lease duration before taking it, so clocks that disagree cannot make two
//! processes act. The one shortcut: a renewTime older than the lease duration plus
//! `--max-clock-skew` is expired whatever the clocks, and is taken at once (a holder that crashed
//! an hour ago does not cost the next run another lease duration).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;

use super::{call, Cluster, ClusterError};

pub use crate::contract::LEASE_NAME;

/// What to make of a holder whose Lease looks alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderCheck {
    /// Believe it: the Lease is held (exit "locked").
    BelieveAtOnce,
    /// Watch it for one lease duration first: a holder that died mid-restart (TMM may be down)
    /// must not make every later run exit "held" with nobody restoring TMM.
    WatchOneDuration,
}
/// The default of `--lease-duration`: how long the Lease lasts without renewal, i.e. what a
/// crashed run makes the next one wait.
pub const LEASE_SECONDS: i32 = 120;
/// The default of `--max-clock-skew`.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 60;

/// The timings of one Lease, derived from its duration in client-go's proportions (15 s / 10 s /
/// 2 s there).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    pub max_skew: Duration,
}

impl Timing {
    pub fn new(lease_seconds: i32, max_skew_seconds: i64) -> Self {
        let duration = Duration::from_secs(u64::try_from(lease_seconds.max(1)).unwrap_or(120));
        Timing {
            duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration / 6).max(Duration::from_millis(200)),
            max_skew: Duration::from_secs(u64::try_from(max_skew_seconds.max(0)).unwrap_or(0)),
        }
    }
}

/// The Lease, held. `lost()` resolves when it could not be renewed within the renew deadline or
/// was taken over: the holder must stop acting then, before the Lease can expire for others.
pub struct Held {
    api: Api<Lease>,
    namespace: String,
    identity: String,
    renewer: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

/// What we saw of the Lease: who holds it, how old its renewTime is by our clock, its version.
struct Seen {
    lease: Lease,
    holder: String,
    age: Option<Duration>,
}

fn seen(lease: Lease, now: Timestamp) -> Seen {
    let spec = lease.spec.clone().unwrap_or_default();
    let age = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| {
            let d: SignedDuration = now.duration_since(t.0);
            Duration::try_from(d).unwrap_or(Duration::ZERO)
        });
    Seen {
        holder: spec.holder_identity.unwrap_or_default(),
        age,
        lease,
    }
}

fn pp() -> PostParams {
    PostParams {
        field_manager: Some("dssm-certs".into()),
        ..Default::default()
    }
}

impl Cluster {
    fn lease_api(&self) -> (Api<Lease>, String) {
        (
            Api::namespaced(self.client.clone(), &self.dssm_ns),
            format!("lease {}/{LEASE_NAME}", self.dssm_ns),
        )
    }

    fn our_spec(&self, transitions: i32) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(self.lease_seconds),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn locked(&self, what: &str, holder: &str) -> ClusterError {
        ClusterError::Locked(format!(
            "{what} is held by {holder:?} and renewed: another dssm-certs is working on these Secrets; nothing was written"
        ))
    }

    /// Whether the Lease names us now. Only its holder may scale, evict or restore: a dry run, or
    /// a run that found the Lease held, must never "restore" TMM in the middle of another
    /// process's restart.
    pub async fn holds_lease(&self) -> bool {
        let (api, what) = self.lease_api();
        matches!(
            call("get", &what, || api.get_opt(LEASE_NAME)).await,
            Ok(Some(l)) if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str())
        )
    }

    /// Takes the Lease, or says who holds it.
    pub async fn acquire_lease(&self) -> Result<Held, ClusterError> {
        self.acquire_lease_waiting(HolderCheck::BelieveAtOnce).await
    }

    /// Takes the Lease; with `HolderCheck::WatchOneDuration`, a holder that looks alive is
    /// watched for one lease duration too instead of being believed at once. Used when a restart record says TMM may be
    /// down: a holder that died mid-restart must not make every later run exit "held" until its
    /// retries run out, with nobody restoring TMM.
    pub async fn acquire_lease_waiting(&self, holder: HolderCheck) -> Result<Held, ClusterError> {
        let (api, what) = self.lease_api();
        let timing = Timing::new(self.lease_seconds, self.max_clock_skew);
        // (resourceVersion, when we first saw it): client-go's observedRecord/observedTime.
        let mut observed: Option<(String, Instant)> = None;
        loop {
            let current = call("get", &what, || api.get_opt(LEASE_NAME)).await?;
            let Some(lease) = current else {
                self.create_lease(&api, &what).await?;
                break;
            };
            let s = seen(lease, Timestamp::now());
            let rv = s
                .lease
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            let free = s.holder.is_empty() || s.holder == self.identity;
            // Judged by the duration the holder wrote into the Lease, as client-go does.
            let theirs = s
                .lease
                .spec
                .as_ref()
                .and_then(|l| l.lease_duration_seconds)
                .unwrap_or(self.lease_seconds);
            let timing = Timing::new(theirs, self.max_clock_skew);
            let long_dead = s
                .age
                .is_none_or(|age| age > timing.duration + timing.max_skew);
            let watched_long_enough = matches!(&observed,
                Some((seen_rv, since)) if *seen_rv == rv && since.elapsed() >= timing.duration);
            if free || long_dead || watched_long_enough {
                self.take_lease(&api, &what, s.lease).await?;
                break;
            }
            // Held by someone else. Clearly alive (renewed well within the duration, whatever
            // the clocks): say so now. Otherwise watch it for a lease duration on our clock.
            let clearly_alive = s
                .age
                .is_some_and(|age| age + timing.max_skew < timing.duration);
            let changed = observed.as_ref().is_some_and(|(seen_rv, _)| *seen_rv != rv);
            if (clearly_alive && holder == HolderCheck::BelieveAtOnce) || changed {
                return Err(self.locked(&what, &s.holder));
            }
            if observed.is_none() {
                tracing::info!(lease = %what, holder = %s.holder, "the lease looks expired by our clock; watching it for one lease duration before taking it");
                observed = Some((rv, Instant::now()));
            }
            tokio::time::sleep(timing.retry_period).await;
        }
        let (tx, rx) = watch::channel(false);
        let renewer = tokio::spawn(renew(api.clone(), what, self.identity.clone(), timing, tx));
        Ok(Held {
            api,
            namespace: self.dssm_ns.clone(),
            identity: self.identity.clone(),
            renewer,
            lost: rx,
        })
    }

    /// Creates the Lease. A create whose answer was lost (a timeout, a 5xx after it was stored,
    /// then our retry's 409 AlreadyExists) is resolved by reading the Lease back: if it names us,
    /// it was ours.
    async fn create_lease(&self, api: &Api<Lease>, what: &str) -> Result<(), ClusterError> {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(self.our_spec(0)),
        };
        let pp = pp();
        match call("create", what, || api.create(&pp, &lease)).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let back = call("get", what, || api.get_opt(LEASE_NAME)).await?;
                let holder = back
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .unwrap_or_default();
                if holder == self.identity {
                    tracing::info!(lease = %what, error = %e, "the create's answer was lost, but the lease is ours");
                    Ok(())
                } else if e.is_conflict() || matches!(e, ClusterError::Api { code: 409, .. }) {
                    Err(ClusterError::Locked(format!(
                        "{what} was just taken by {holder:?}; nothing was written"
                    )))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Takes over `lease` with the resourceVersion we read: if anyone wrote it since, 409.
    async fn take_lease(
        &self,
        api: &Api<Lease>,
        what: &str,
        mut lease: Lease,
    ) -> Result<(), ClusterError> {
        let old = lease.spec.clone().unwrap_or_default();
        let ours = old.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(self.our_spec(transitions));
        lease.metadata.managed_fields = None;
        let pp = pp();
        match call("update", what, || api.replace(LEASE_NAME, &pp, &lease)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Err(ClusterError::Locked(format!(
                "{what} was just taken by another dssm-certs; nothing was written"
            ))),
            Err(e) => Err(e),
        }
    }
}

/// Renews every retry period; gives up (and says the Lease is lost) when no renewal succeeded
/// within the renew deadline or someone else holds it.
async fn renew(
    api: Api<Lease>,
    what: String,
    identity: String,
    timing: Timing,
    lost: watch::Sender<bool>,
) {
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(timing.retry_period).await;
        let attempt = async {
            let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(identity.as_str()) {
                return Ok(false);
            }
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            lease.metadata.managed_fields = None;
            api.replace(LEASE_NAME, &pp(), &lease).await.map(|_| true)
        };
        // One attempt at a time, each bounded, so the deadline below is kept.
        match tokio::time::timeout(timing.retry_period, attempt).await {
            Ok(Ok(true)) => last_renewed = Instant::now(),
            Ok(Ok(false)) => {
                tracing::warn!(lease = %what, "the lease was taken over: stopping");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => tracing::warn!(lease = %what, error = %e, "could not renew the lease"),
            Err(_) => tracing::warn!(lease = %what, "renewing the lease timed out"),
        }
        if last_renewed.elapsed() >= timing.renew_deadline {
            tracing::error!(lease = %what, "the lease could not be renewed within its renew deadline: stopping before it can expire for others");
            let _ = lost.send(true);
            return;
        }
    }
}

impl Held {
    /// Resolves once the Lease is lost; never while it is held.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Runs `work` while the Lease is held; if it is lost first, `work` is dropped at the next
    /// safe point (a dSSM roll finishes the step it is in and starts no other: `stop`) and the
    /// result is an error saying so.
    pub async fn guard<T, E: From<ClusterError>>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => return r,
            () = self.lost() => {}
        }
        crate::stop::request();
        crate::stop::work_or_safe_point(&mut work)
            .await
            .unwrap_or_else(|| {
                Err(
                    ClusterError::LeaseLost(format!("lease {}/{LEASE_NAME}", self.namespace))
                        .into(),
                )
            })
    }

    /// Gives the Lease back, only if it is still ours, with the resourceVersion read (client-go's
    /// release). Best effort: it expires anyway.
    pub async fn release(self) {
        self.renewer.abort();
        release_if_ours(&self.api, &self.namespace, &self.identity).await;
    }
}

/// The renewer stops with the Lease: a holder dropped mid-work (a signal, a lost Lease) never
/// renews behind the back of whoever releases it.
impl Drop for Held {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Clears the Lease's holder if it is `identity`; a Lease already released is left as it is,
/// another holder's with a warning.
async fn release_if_ours(api: &Api<Lease>, namespace: &str, identity: &str) {
    let what = format!("lease {namespace}/{LEASE_NAME}");
    let Ok(Some(mut lease)) = call("get", &what, || api.get_opt(LEASE_NAME)).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => {}
        None | Some("") => return,
        Some(_) => {
            tracing::warn!(lease = %what, "the lease is no longer ours: not releasing it");
            return;
        }
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    lease.metadata.managed_fields = None;
    let pp = pp();
    if let Err(e) = call("update", &what, || api.replace(LEASE_NAME, &pp, &lease)).await {
        tracing::warn!(error = %e, "could not release the lease");
    }
}

impl Cluster {
    /// Releases the Lease if this process holds it: on a signal, whose handler has dropped the
    /// work (and its `Held`), so the next run need not wait a lease duration.
    pub async fn release_lease(&self) {
        let (api, _) = self.lease_api();
        release_if_ours(&api, &self.dssm_ns, &self.identity).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_keep_client_go_proportions() {
        let t = Timing::new(120, 60);
        assert_eq!(t.renew_deadline, Duration::from_secs(80));
        assert_eq!(t.retry_period, Duration::from_secs(20));
        assert!(
            t.renew_deadline + t.retry_period <= t.duration,
            "the holder stops in time"
        );
        let t = Timing::new(1, 0);
        assert_eq!(t.retry_period, Duration::from_millis(200));
    }
}

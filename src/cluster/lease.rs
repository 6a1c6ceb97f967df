//! One actor at a time: a coordination.k8s.io Lease in the dSSM namespace. The CronJob also uses
//! `concurrencyPolicy: Forbid`; the Lease covers a manual Job or an agent running alongside.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;

use super::{call, Cluster, ClusterError};

pub const LEASE_NAME: &str = "dssm-certs";
/// The default of `--lease-duration`: how long the Lease lasts without renewal, i.e. what a
/// crashed run makes the next one wait. It is renewed every third of that while held, so a long
/// restart keeps it.
pub const LEASE_SECONDS: i32 = 120;

pub struct Held {
    api: Api<Lease>,
    namespace: String,
    renewer: tokio::task::JoinHandle<()>,
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renew) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    renew.0 + SignedDuration::from_secs(secs) < now
}

impl Cluster {
    /// Takes the Lease, or says who holds it.
    pub async fn acquire_lease(&self) -> Result<Held, ClusterError> {
        let ns = self.dssm_ns.clone();
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        let what = format!("lease {ns}/{LEASE_NAME}");
        let now = Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(self.lease_seconds),
            ..Default::default()
        };
        let pp = PostParams {
            field_manager: Some("dssm-certs".into()),
            ..Default::default()
        };
        let locked = |holder: &str, spec: &LeaseSpec| {
            let until = spec
                .renew_time
                .as_ref()
                .map(|t| {
                    (t.0 + SignedDuration::from_secs(i64::from(
                        spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS),
                    )))
                    .to_string()
                })
                .unwrap_or_default();
            ClusterError::Locked(format!(
                "{what} is held by {holder:?} until {until}: another dssm-certs is working on these Secrets; nothing was written"
            ))
        };
        match call("get", &what, || api.get_opt(LEASE_NAME)).await? {
            None => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                match call("create", &what, || api.create(&pp, &lease)).await {
                    Ok(_) => {}
                    Err(ClusterError::Conflict { .. }) => {
                        return Err(ClusterError::Locked(format!(
                            "{what} was just taken by another dssm-certs; nothing was written"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                let holder = current.holder_identity.clone().unwrap_or_default();
                if !holder.is_empty() && holder != self.identity && !expired(&current, now) {
                    return Err(locked(&holder, &current));
                }
                lease.spec = Some(LeaseSpec {
                    lease_transitions: Some(current.lease_transitions.unwrap_or(0) + 1),
                    ..spec
                });
                lease.metadata.managed_fields = None;
                match call("update", &what, || api.replace(LEASE_NAME, &pp, &lease)).await {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {
                        return Err(ClusterError::Locked(format!(
                            "{what} was just taken by another dssm-certs; nothing was written"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let renewer = {
            let (api, identity, what) = (api.clone(), self.identity.clone(), what.clone());
            let every = std::time::Duration::from_millis(
                u64::try_from(self.lease_seconds).unwrap_or(120) * 1000 / 3,
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Ok(Some(mut lease)) = call("get", &what, || api.get_opt(LEASE_NAME)).await
                    else {
                        continue;
                    };
                    let Some(spec) = lease.spec.as_mut() else {
                        break;
                    };
                    if spec.holder_identity.as_deref() != Some(identity.as_str()) {
                        tracing::warn!(lease = %what, "the lease was taken over; no longer renewing it");
                        break;
                    }
                    spec.renew_time = Some(MicroTime(Timestamp::now()));
                    lease.metadata.managed_fields = None;
                    let pp = PostParams {
                        field_manager: Some("dssm-certs".into()),
                        ..Default::default()
                    };
                    if let Err(e) =
                        call("update", &what, || api.replace(LEASE_NAME, &pp, &lease)).await
                    {
                        tracing::warn!(lease = %what, error = %e, "could not renew the lease");
                    }
                }
            })
        };
        Ok(Held {
            api,
            namespace: ns,
            renewer,
        })
    }
}

impl Held {
    /// Gives the Lease back (best effort; it expires anyway).
    pub async fn release(self) {
        self.renewer.abort();
        let what = format!("lease {}/{LEASE_NAME}", self.namespace);
        if let Ok(Some(mut lease)) = call("get", &what, || self.api.get_opt(LEASE_NAME)).await {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
                spec.renew_time = None;
            }
            lease.metadata.managed_fields = None;
            let pp = PostParams {
                field_manager: Some("dssm-certs".into()),
                ..Default::default()
            };
            if let Err(e) = call("update", &what, || {
                self.api.replace(LEASE_NAME, &pp, &lease)
            })
            .await
            {
                tracing::warn!(error = %e, "could not release the lease");
            }
        }
    }
}

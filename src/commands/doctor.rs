//! `doctor`: reads the cluster and reports what would make a rotation unsafe or slow. Nothing
//! is written; the exit code follows `check` (0 ok, 1 warning, 2 critical, 3 cannot tell).

use super::{own_namespace, runtime, CommandError};
use crate::cli::{DoctorArgs, OutputFormat};
use crate::cluster::{doctor as read, Cluster, ClusterError, Observation};
use crate::doctor::{self, Finding, Report, Role};
use crate::inspect::{self, Status, Thresholds};
use crate::materials::SecretObs;

pub fn run(a: DoctorArgs) -> Result<i32, CommandError> {
    let thresholds = Thresholds {
        warn: a.warn,
        critical: a.critical,
    };
    let report = runtime()?
        .block_on(examine(&a, thresholds))
        .map_err(|e| CommandError::CannotTell(e.to_string()))?;
    match a.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", doctor::render_table(&report)),
    }
    Ok(report.exit_code)
}

async fn examine(a: &DoctorArgs, thresholds: Thresholds) -> Result<Report, ClusterError> {
    let cluster = Cluster::connect(&a.cluster.settings()).await?;
    let seen = cluster.observe_for_doctor().await;
    let mut findings = read::findings(&seen);
    findings.extend(doctor::pods_not_ready(&cluster.dssm_ns, &seen.dssm_pods));
    if seen.unreadable.is_empty() {
        for t in &cluster.targets {
            let found = seen.workloads.iter().any(|w| {
                w.role == Role::Tmm
                    && w.meta.namespace.as_deref() == Some(t.namespace.as_str())
                    && w.kind.eq_ignore_ascii_case(t.kind.as_str())
                    && w.meta.name.as_deref() == Some(t.name.as_str())
            });
            if !found {
                findings.push(Finding {
                    check: "target",
                    status: Status::Critical,
                    object: format!("{}/{}/{}", t.namespace, t.kind.as_str(), t.name),
                    message: "not found: a rotation would refuse before writing (check --tmm, \
                              or --tmm-namespace / --tmm-deployment)"
                        .into(),
                });
            }
        }
    }
    findings.extend(access(&cluster, a.service_account.as_deref()).await);
    match cluster.observe().await {
        Ok(obs) => findings.extend(secrets(&obs, &cluster, thresholds).await),
        Err(e) => findings.push(Finding {
            check: "read",
            status: Status::Unknown,
            object: format!("{}/secret", cluster.dssm_ns),
            message: format!("{e}: ownership and time to expiry cannot be told"),
        }),
    }
    Ok(Report::new(findings))
}

/// The permissions of the tool's ServiceAccount (or the caller's, with `self`), from
/// SelfSubjectAccessReviews.
async fn access(cluster: &Cluster, service_account: Option<&str>) -> Vec<Finding> {
    let needed = doctor::required_access(&cluster.dssm_ns, &cluster.targets);
    // In a pod, the identity running doctor is the tool's own ServiceAccount.
    let default_sa = own_namespace()
        .is_none()
        .then(|| format!("{}/dssm-certs", cluster.dssm_ns));
    let (who, user) = match service_account.map(str::to_string).or(default_sa) {
        None => ("this identity".to_string(), None),
        Some(s) if s == "self" => ("this identity".to_string(), None),
        Some(s) => match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => (
                format!("ServiceAccount {ns}/{name}"),
                Some(format!("system:serviceaccount:{ns}:{name}")),
            ),
            _ => {
                return vec![Finding {
                    check: "rbac",
                    status: Status::Unknown,
                    object: "--service-account".into(),
                    message: format!("{s:?} is not NAMESPACE/NAME or self"),
                }]
            }
        },
    };
    match cluster.review_access(user.as_deref(), needed).await {
        Ok(answers) => doctor::missing_access(&who, &answers),
        Err(e) => vec![Finding {
            check: "rbac",
            status: Status::Unknown,
            object: who.clone(),
            message: format!("cannot review the permissions of {who}: {e}"),
        }],
    }
}

/// Who owns each Secret, and the time each copy has left.
async fn secrets(obs: &Observation, cluster: &Cluster, t: Thresholds) -> Vec<Finding> {
    let mut f = Vec::new();
    for c in &obs.copies {
        for (name, s) in [
            (crate::contract::CERTS_SECRET, &c.certs),
            (crate::contract::KEYS_SECRET, &c.keys),
        ] {
            if let SecretObs::Present { owner, .. } = s {
                f.extend(doctor::secret_owner(&c.namespace, name, owner));
            }
        }
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let report = inspect::inspect_observation(
        obs,
        &cluster.dssm_ns,
        now,
        t,
        inspect::KeyMatch::FromKeySecret,
    )
    .await;
    for copy in &report.copies {
        let soonest = copy.certificates.iter().min_by_key(|c| c.residual_seconds);
        let message = match soonest {
            Some(c) => format!(
                "{}; soonest to expire: {} ({}), {} days left",
                copy.status,
                c.file,
                c.role,
                c.residual_seconds.div_euclid(86_400)
            ),
            None => format!("{}: nothing to read", copy.status),
        };
        f.push(Finding {
            check: "expiry",
            status: copy.status,
            object: copy.source.clone(),
            message,
        });
    }
    f
}

//! `probe`: an mTLS PING to Sentinel (and DBs) with the files TMM mounts.

use super::{own_namespace, CommandError};
use crate::cli::{OutputFormat, ProbeArgs};
use crate::inspect::{self, Status};
use crate::probe::{self, ClientMaterials, ProbeReport, Prober, VerifyPath};
use crate::{contract, pki};

pub fn run(a: ProbeArgs) -> Result<i32, CommandError> {
    let materials = read_materials(&a.dir).map_err(CommandError::CannotTell)?;
    let sentinel = match (a.endpoint, a.dssm_namespace.or_else(own_namespace)) {
        (Some(e), _) => e,
        (None, Some(ns)) => probe::sentinel_endpoint(&ns),
        (None, None) => {
            return Err(CommandError::Failed(
                "--endpoint or --dssm-namespace is required outside a pod".into(),
            ))
        }
    };
    let prober = Prober::new(&materials, crate::redis::ClientIdentity::Presented)
        .map_err(|e| CommandError::CannotTell(e.to_string()))?;
    let timeout = std::time::Duration::from_secs(a.timeout.max(1) as u64);
    let deadline = std::time::Duration::from_secs(a.deadline.max(1) as u64);
    let endpoints: Vec<String> = std::iter::once(sentinel).chain(a.db_endpoints).collect();
    let reports = probe::ping_all(
        prober,
        &endpoints,
        a.server_name.as_deref(),
        timeout,
        deadline,
    );
    let worst = reports
        .iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(Status::Unknown);
    match a.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": "dssm-certs.probe/v1",
                "status": worst,
                "exit_code": worst.exit_code(),
                "endpoints": reports,
            }))?
        ),
        OutputFormat::Table => reports.iter().for_each(print_table_row),
    }
    Ok(worst.exit_code())
}

fn read_materials(dir: &std::path::Path) -> Result<ClientMaterials, String> {
    let read = |name: &str| {
        let path = dir.join(name);
        crate::limits::read_bounded(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    let key_path = dir.join(contract::LEAF_KEY);
    Ok(ClientMaterials {
        ca_cert: read(contract::CA_CERT)?,
        leaf_cert: read(contract::LEAF_CERT)?,
        leaf_key: pki::PrivateKey::from_pem(
            &read(contract::LEAF_KEY)?,
            &key_path.display().to_string(),
        )
        .map_err(|e| e.to_string())?,
    })
}

fn print_table_row(r: &ProbeReport) {
    println!(
        "{}  {}  {}",
        r.endpoint,
        r.status,
        inspect::printable(&r.message)
    );
    if let Some(s) = &r.served {
        println!(
            "  served: subject \"{}\", serial {}, notAfter {}, X.509 v{}, {} the deployed leaf, {}",
            inspect::printable(&s.subject),
            s.serial,
            s.not_after,
            s.version,
            if s.matches_deployed_leaf {
                "matches"
            } else {
                "differs from"
            },
            match s.ca_index {
                Some(i) => format!(
                    "under CA {i} of the {} in the deployed bundle",
                    s.bundle_cas
                ),
                None => "under no CA of the deployed bundle".to_string(),
            }
        );
    }
    if let (Some(v), Some(p)) = (&r.tls_version, &r.verify_path) {
        let how = match p {
            VerifyPath::Webpki => format!(
                "rustls WebPKI (chain, validity, EKU, name {:?})",
                r.server_name
            ),
            VerifyPath::LegacyNoNameCheck => {
                "v1/SAN-less certificate: chain and validity via x509-parser, no name check"
                    .to_string()
            }
        };
        println!("  {v}, verified by {how}");
    }
}

//! The pure PKI core: keys, the CA and the leaf, DH parameters, and inspection. No I/O besides
//! the OS random number generator.

pub mod dhparams;
pub mod inspect;
pub mod issue;
pub mod keys;

pub use dhparams::{DhError, DhParams};
pub use inspect::{parse_certificate, Certificate, InspectError};
pub use issue::{
    check_ca_can_sign, issue_ca, issue_leaf, parse_san, CaSigner, IssueError, IssuedLeaf,
    LeafRequest, LeafValidity, Subject,
};
pub use keys::{KeyAlgorithm, KeyError, PrivateKey, SecretBytes};

/// RFC 3339 in UTC, to the second: how times appear in messages and reports.
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

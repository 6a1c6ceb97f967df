//! `redis`: the only code that talks Redis during a rotation (with `probe`, which shares its TLS
//! setup): a small RESP client over mutual TLS, `INFO replication`, the in-place TLS reload of a
//! DB, Sentinel's quorum and topology views, the paused switchover, and the pure rollout plan
//! that orders them.
//!
//! Every operation takes a deadline; nothing here waits unbounded.

pub mod reload;
pub mod replication;
pub mod resp;
pub mod rollout;
pub mod sentinel;
pub mod switchover;
pub mod tls;

pub use replication::{info_replication, Replication, Role};
pub use resp::{Connection, Value};
pub use tls::{ClientMaterials, TlsClient};

/// The name Sentinel monitors dSSM's primary under, unless configured otherwise.
pub const DEFAULT_MASTER_NAME: &str = "mymaster";

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("{endpoint}: {detail}")]
    Io { endpoint: String, detail: String },
    #[error("{endpoint}: no answer to {what} before the deadline")]
    Timeout { endpoint: String, what: String },
    #[error("{endpoint}: {command} failed: {message}")]
    Reply {
        endpoint: String,
        command: String,
        message: String,
    },
    #[error("{endpoint}: unexpected reply to {command}: {reply}")]
    Unexpected {
        endpoint: String,
        command: String,
        reply: String,
    },
    #[error("{endpoint}: still serves certificate {served} instead of {expected} after reloading until the deadline: the mounted files were not swapped (subPath mount, or kubelet has not synced yet){last_error}")]
    NotSwapped {
        endpoint: String,
        expected: String,
        served: String,
        last_error: String,
    },
    #[error("{0}")]
    Topology(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// Sleeps `step`, but never past `deadline`.
pub(crate) fn pause_until(deadline: std::time::Instant, step: std::time::Duration) {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    std::thread::sleep(step.min(left));
}

//! Exit codes, in one place. `check` and `probe` follow the monitoring-plugin convention so that
//! they can drive alerts directly.

/// Everything is fine / the command did what was asked.
pub const OK: i32 = 0;
/// Something needs attention soon (e.g. a certificate inside the `--warn` window).
pub const WARNING: i32 = 1;
/// Broken or about to break: expired, inside the `--critical` window, broken chain, key mismatch.
pub const CRITICAL: i32 = 2;
/// Cannot tell: the input is missing or unreadable.
pub const UNKNOWN: i32 = 3;
/// The command failed (bad input, refused overwrite, I/O error). Nothing was half-written.
pub const FAILED: i32 = 4;
/// Another dssm-certs holds the Lease: nothing was done, try again later.
pub const LOCKED: i32 = 5;
/// The pre-flight check refused a restart (a dSSM pod not Ready, TMM mid-rollout): nothing was
/// touched; an Event names the blocking object. `--force` overrides.
pub const PREFLIGHT: i32 = 6;
/// The command line itself is wrong (unknown flag, bad value).
pub const USAGE: i32 = 64;

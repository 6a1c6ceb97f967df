//! dssm-certs: the certificate lifecycle of F5 dSSM (Redis DB + Sentinel) and its TMM clients.
//!
//! The pure core (`pki`, `check`'s report) is separate from the shell that reads and writes
//! files and talks to the cluster.

pub mod agent;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod contract;
pub mod exit;
pub mod fuzz;
pub mod generate;
pub mod manifest;
pub mod metrics;
pub mod pki;
pub mod plan;
pub mod probe;
pub mod reconcile;
pub mod redis;
pub mod restart;
pub mod targets;
pub mod values;

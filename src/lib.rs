//! dssm-certs: the certificate lifecycle of F5 dSSM (Redis DB + Sentinel) and its TMM clients.
//!
//! The pure core (`materials`, `pki`, `checks`, `plan`) is separate from the shell that reads and writes
//! files and talks to the cluster.

pub mod agent;
pub mod checks;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod contract;
pub mod doctor;
pub mod exit;
pub mod first_publication;
pub mod fuzz;
pub mod generate;
pub mod inspect;
pub mod limits;
pub mod manifest;
pub mod materials;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod plan;
pub mod probe;
pub mod reconcile;
pub mod redis;
pub mod restart;
pub mod restart_state;
pub mod stop;
pub mod values;
pub mod writes;

// Paths kept for the tests, benches and other branches written against the old layout.
pub use inspect as check;
pub use model::targets;
pub use reconcile::rotation;
pub use restart::dssm as rolling;

//! The pure model: what an observation of the cluster finds, described without the cluster.
//! `cluster/` fills these types; everything above reads them. Imports nothing but the pure core.

pub mod observation;
pub mod pods;
pub mod restarts;
pub mod rotation;
pub mod targets;
pub mod tmm_patches;

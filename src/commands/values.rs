//! `values`: the TMM Helm values snippet that mounts the two Secrets.

use super::{own_namespace, CommandError};
use crate::cli::ValuesArgs;
use crate::{exit, values};

pub fn run(a: ValuesArgs) -> Result<i32, CommandError> {
    let ns = a.dssm_namespace.or_else(own_namespace).ok_or_else(|| {
        CommandError::Failed(
            "--dssm-namespace is required outside a pod (no service account namespace file)".into(),
        )
    })?;
    let targets = crate::model::targets::resolve(
        &a.tmm.tmm,
        a.tmm.tmm_namespace.as_deref(),
        &a.tmm.tmm_deployment,
        &ns,
    );
    print!("{}", values::tmm_values_for(&ns, &targets));
    Ok(exit::OK)
}

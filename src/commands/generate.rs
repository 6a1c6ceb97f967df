//! `generate`: the five files into a folder, with no cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{log, CommandError};
use crate::cli::GenerateArgs;
use crate::generate::{self, GenerateError};
use crate::{contract, exit};

pub fn run(a: GenerateArgs) -> Result<i32, CommandError> {
    generate::refuse_overwrite(&a.out, a.force)?;
    generate::check_writable(&a.out)?;
    let dns_names = if a.material.dns.is_empty() {
        contract::default_dns_names(a.dssm_namespace.as_deref().or(a.namespace.as_deref()))
    } else {
        a.material.dns.clone()
    };
    let opts = generate::GenerateOptions {
        days: a.material.days,
        ca_days: a.material.ca_days,
        key_algorithm: a.material.key_algorithm,
        ca_subject: a.material.ca_subject,
        subject: a.material.subject,
        dns_names,
        existing_ca: match a.ca_cert.zip(a.ca_key) {
            Some((cert, key)) => Some(generate::ExistingCa::from_files(&cert, &key)?),
            None => None,
        },
        dhparam: a.dhparam,
        namespace: a.namespace.clone(),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let started = std::time::Instant::now();
    // SIGTERM/SIGINT stop the DH search and any write not yet begun; no temporary file is left
    // behind (the default action would kill us mid-write).
    let cancel = Arc::new(AtomicBool::new(false));
    stop_on_signal(cancel.clone());
    let interrupted = || {
        cancel
            .load(Ordering::SeqCst)
            .then(|| GenerateError::Interrupted { dir: a.out.clone() })
    };
    let materials = match generate::make_materials(&opts, time::OffsetDateTime::now_utc(), &cancel)
    {
        Err(e) => return Err(interrupted().unwrap_or(e).into()),
        Ok(m) => m,
    };
    if let Some(e) = interrupted() {
        return Err(e.into());
    }
    let dssm_namespace = a.dssm_namespace.as_deref().or(a.namespace.as_deref());
    let files = generate::output_files(&materials, a.namespace.as_deref(), dssm_namespace);
    generate::write_files(&a.out, &files, a.force, &cancel)?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "generated"
    );
    for f in &files {
        println!("{}", a.out.join(f.name).display());
    }
    if let Some(note) = &materials.leaf_note {
        log::notice(&format!("note: {note}"));
    }
    Ok(exit::OK)
}

/// Sets `flag` on SIGTERM or SIGINT, from a thread of its own (generate is synchronous).
fn stop_on_signal(flag: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            let _ = ready_tx.send(());
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    });
    // The handlers are installed before any temporary file can exist.
    let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(2));
}

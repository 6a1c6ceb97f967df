//! `generate`: steps 3 to 8 of the seeds' procedure in one command, written safely to a folder.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use time::OffsetDateTime;

use crate::contract;
use crate::manifest;
use crate::pki::{
    self, CaSigner, DhError, DhParams, IssueError, KeyAlgorithm, KeyError, LeafRequest, PrivateKey,
    SecretBytes, Subject,
};

/// Where the DH parameters come from (`--dhparam generate|ffdhe2048|FILE`, or deployed ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhSource {
    Generate,
    Ffdhe2048,
    File(PathBuf),
    /// PEM already at hand (the deployed params, reused on renewal), and where it came from.
    Pem(Vec<u8>, String),
}

impl std::str::FromStr for DhSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "generate" => DhSource::Generate,
            "ffdhe2048" => DhSource::Ffdhe2048,
            path => DhSource::File(PathBuf::from(path)),
        })
    }
}

/// An existing CA to sign the new leaf with (`--ca-cert`/`--ca-key`, or the CA key Secret).
#[derive(Clone)]
pub struct ExistingCa {
    pub cert: Vec<u8>,
    pub key: SecretBytes,
    /// Where they came from, for messages.
    pub cert_name: String,
    pub key_name: String,
}

impl std::fmt::Debug for ExistingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExistingCa({}, {})", self.cert_name, self.key_name)
    }
}

impl ExistingCa {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, GenerateError> {
        Ok(ExistingCa {
            cert: read(cert)?,
            key: SecretBytes::new(read(key)?),
            cert_name: cert.display().to_string(),
            key_name: key.display().to_string(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub days: u32,
    pub ca_days: u32,
    pub key_algorithm: KeyAlgorithm,
    pub ca_subject: Subject,
    pub subject: Subject,
    pub dns_names: Vec<String>,
    pub existing_ca: Option<ExistingCa>,
    pub dhparam: DhSource,
    /// `metadata.namespace` of the manifests.
    pub namespace: Option<String>,
    /// Parallel DH searches.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to overwrite existing files in {dir}: {files}; pass --force to replace them"
    )]
    WouldOverwrite { dir: PathBuf, files: String },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("--out {dir}: cannot write there ({source}); nothing was generated")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted by a signal: nothing was written to {dir}")]
    Interrupted { dir: PathBuf },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Dh(#[from] DhError),
}

/// The five files of the manual procedure. Keys are PEM bytes kept out of `Debug`.
#[derive(Debug, Clone)]
pub struct Materials {
    pub ca_cert: Vec<u8>,
    pub ca_key: SecretBytes,
    pub leaf_cert: Vec<u8>,
    pub leaf_key: SecretBytes,
    pub dhparams: DhParams,
    /// Set when the leaf's lifetime was cut to its CA's end (see `LeafValidity::note`).
    pub leaf_note: Option<String>,
}

/// One output file: its name, its bytes and its mode.
pub struct OutputFile {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl std::fmt::Debug for OutputFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OutputFile({}, {} bytes, {:o})",
            self.name,
            self.bytes.len(),
            self.mode
        )
    }
}

pub const OUTPUT_NAMES: [&str; 7] = [
    contract::CA_KEY,
    contract::CA_CERT,
    contract::LEAF_KEY,
    contract::LEAF_CERT,
    contract::DH_PARAMS,
    contract::CERTS_MANIFEST,
    contract::KEYS_MANIFEST,
];

fn read(path: &Path) -> Result<Vec<u8>, GenerateError> {
    fs::read(path).map_err(|source| GenerateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes the materials. DH parameters are searched on other threads while the keys are made.
pub fn make_materials(
    opts: &GenerateOptions,
    now: OffsetDateTime,
    cancel: &AtomicBool,
) -> Result<Materials, GenerateError> {
    // Everything that can be refused is refused before the slow work starts.
    let existing = match &opts.existing_ca {
        Some(ca) => {
            let key = PrivateKey::from_pem(ca.key.expose(), &ca.key_name)?;
            Some((ca.cert.clone(), ca.key.clone(), key))
        }
        None => None,
    };
    let cert_name = opts
        .existing_ca
        .as_ref()
        .map(|c| c.cert_name.clone())
        .unwrap_or_default();
    let key_name = opts
        .existing_ca
        .as_ref()
        .map(|c| c.key_name.clone())
        .unwrap_or_default();
    if let Some((cert, _, key)) = &existing {
        pki::check_ca_can_sign(
            &CaSigner {
                cert_pem: cert,
                key,
                cert_name: &cert_name,
                key_name: &key_name,
            },
            opts.days,
            now,
        )?;
    }
    let fixed_dh = match &opts.dhparam {
        DhSource::Generate => None,
        DhSource::Ffdhe2048 => Some(DhParams::ffdhe2048()),
        DhSource::Pem(pem, name) => Some(DhParams::validate(pem, name)?),
        DhSource::File(path) => Some(DhParams::validate(
            &read(path)?,
            &path.display().to_string(),
        )?),
    };

    std::thread::scope(|scope| {
        let dh_search = fixed_dh.is_none().then(|| {
            scope.spawn(|| DhParams::generate(pki::dhparams::MIN_BITS, opts.threads, cancel))
        });

        let pki_result = (|| -> Result<_, GenerateError> {
            // The two keys are independent: make them side by side (RSA 4096 takes seconds).
            let (ca_key, leaf_key) = std::thread::scope(|keys| {
                let ca_key = existing
                    .is_none()
                    .then(|| keys.spawn(|| PrivateKey::generate(opts.key_algorithm)));
                let leaf_key = PrivateKey::generate(opts.key_algorithm);
                let ca_key = ca_key.map(|h| h.join().expect("key generation panicked"));
                (ca_key, leaf_key)
            });
            let leaf_key = leaf_key?;
            let (ca_cert, ca_key_pem, ca_key) = match (existing, ca_key) {
                (Some(found), _) => found,
                (None, Some(key)) => {
                    let key = key?;
                    let cert = pki::issue_ca(&opts.ca_subject, opts.ca_days, &key, now)?;
                    (cert.into_bytes(), SecretBytes::new(key.to_pkcs8_pem()), key)
                }
                (None, None) => unreachable!("a CA key is made when none is given"),
            };
            let leaf = pki::issue_leaf(
                &LeafRequest {
                    subject: &opts.subject,
                    days: opts.days,
                    dns_names: &opts.dns_names,
                },
                &leaf_key,
                &CaSigner {
                    cert_pem: &ca_cert,
                    key: &ca_key,
                    cert_name: if cert_name.is_empty() {
                        contract::CA_CERT
                    } else {
                        &cert_name
                    },
                    key_name: if key_name.is_empty() {
                        contract::CA_KEY
                    } else {
                        &key_name
                    },
                },
                now,
            )?;
            Ok((ca_cert, ca_key_pem, leaf, leaf_key))
        })();
        if pki_result.is_err() {
            // No point finishing a minute of DH search for materials we will not write.
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let dhparams = match dh_search {
            Some(handle) => handle.join().expect("the DH search thread panicked"),
            None => Ok(fixed_dh.clone().expect("fixed DH params")),
        };
        let (ca_cert, ca_key, leaf, leaf_key) = pki_result?;
        Ok(Materials {
            ca_cert,
            ca_key,
            leaf_note: leaf.validity.note(),
            leaf_cert: leaf.pem.into_bytes(),
            leaf_key: SecretBytes::new(leaf_key.to_pkcs8_pem()),
            dhparams: dhparams?,
        })
    })
}

/// The seven output files: the five materials and the two Secret manifests.
pub fn output_files(m: &Materials, namespace: Option<&str>) -> Vec<OutputFile> {
    let certs = manifest::secret_yaml(
        contract::CERTS_SECRET,
        namespace,
        &[
            (contract::CA_CERT, &m.ca_cert),
            (contract::LEAF_CERT, &m.leaf_cert),
            (contract::DH_PARAMS, m.dhparams.pem()),
        ],
    );
    let keys = manifest::secret_yaml(
        contract::KEYS_SECRET,
        namespace,
        &[(contract::LEAF_KEY, m.leaf_key.expose())],
    );
    vec![
        OutputFile {
            name: contract::CA_KEY,
            bytes: m.ca_key.expose().to_vec(),
            mode: 0o600,
        },
        OutputFile {
            name: contract::CA_CERT,
            bytes: m.ca_cert.clone(),
            mode: 0o644,
        },
        OutputFile {
            name: contract::LEAF_KEY,
            bytes: m.leaf_key.expose().to_vec(),
            mode: 0o600,
        },
        OutputFile {
            name: contract::LEAF_CERT,
            bytes: m.leaf_cert.clone(),
            mode: 0o644,
        },
        OutputFile {
            name: contract::DH_PARAMS,
            bytes: m.dhparams.pem().to_vec(),
            mode: 0o644,
        },
        OutputFile {
            name: contract::CERTS_MANIFEST,
            bytes: certs.into_bytes(),
            mode: 0o644,
        },
        // The keys manifest carries the private key: as secret as the key file.
        OutputFile {
            name: contract::KEYS_MANIFEST,
            bytes: keys.into_bytes(),
            mode: 0o600,
        },
    ]
}

/// Refuses early, before any slow work, when `dir` already holds an output file.
pub fn refuse_overwrite(dir: &Path, force: bool) -> Result<(), GenerateError> {
    if dir.exists() && !dir.is_dir() {
        return Err(GenerateError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    if force {
        return Ok(());
    }
    let existing: Vec<&str> = OUTPUT_NAMES
        .iter()
        .copied()
        .filter(|n| dir.join(n).symlink_metadata().is_ok())
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(GenerateError::WouldOverwrite {
            dir: dir.to_path_buf(),
            files: existing.join(", "),
        })
    }
}

/// Finds an `--out` we cannot write before any slow work: the folder itself, or the nearest
/// existing parent it would be created in, must take a new file.
pub fn check_writable(dir: &Path) -> Result<(), GenerateError> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    let probe = at.join(format!(".dssm-certs-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|source| GenerateError::NotWritable {
            dir: dir.to_path_buf(),
            source,
        })
}

/// Writes all files or none: each goes to a temporary file with its final mode first (a key is
/// never readable by others, not even for a moment), then all are moved into place. Without
/// `force` a file that appeared meanwhile is not replaced and what was placed is taken back; with
/// `force` the files replaced are kept aside (hard links) until every new one is in place, and
/// put back if one fails. `stop` (SIGTERM/SIGINT) is honoured until the first file is placed; the
/// temporaries never outlive the call.
pub fn write_files(
    dir: &Path,
    files: &[OutputFile],
    force: bool,
    stop: &AtomicBool,
) -> Result<(), GenerateError> {
    refuse_overwrite(dir, force)?;
    check_writable(dir)?;
    let created_dir = !dir.exists();
    if created_dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| GenerateError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let pid = std::process::id();
    let tmp_name = |name: &str| dir.join(format!(".{name}.tmp-{pid}"));
    let old_name = |name: &str| dir.join(format!(".{name}.old-{pid}"));
    let remove_temps = || {
        for f in files {
            let _ = fs::remove_file(tmp_name(f.name));
        }
    };
    let give_up = |e: GenerateError| {
        remove_temps();
        if created_dir {
            let _ = fs::remove_dir(dir);
        }
        Err(e)
    };
    for f in files {
        let path = tmp_name(f.name);
        let result = (|| {
            let _ = fs::remove_file(&path);
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .open(&path)?;
            out.write_all(&f.bytes)?;
            out.sync_all()
        })();
        if let Err(source) = result {
            return give_up(GenerateError::Write {
                path: dir.join(f.name),
                source,
            });
        }
    }
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        return give_up(GenerateError::Interrupted {
            dir: dir.to_path_buf(),
        });
    }
    // Past this point a signal waits: placing seven files takes microseconds.
    let mut kept = Vec::new();
    if force {
        for f in files {
            let dest = dir.join(f.name);
            if dest.symlink_metadata().is_ok() {
                let old = old_name(f.name);
                let _ = fs::remove_file(&old);
                if let Err(source) = fs::hard_link(&dest, &old) {
                    for (_, o) in &kept {
                        let _ = fs::remove_file(o);
                    }
                    return give_up(GenerateError::Write { path: dest, source });
                }
                kept.push((dest, old));
            }
        }
    }
    let mut placed = Vec::new();
    for f in files {
        let (tmp, dest) = (tmp_name(f.name), dir.join(f.name));
        let result = if force {
            fs::rename(&tmp, &dest)
        } else {
            // link(2) fails when the destination exists: no race can make us overwrite.
            fs::hard_link(&tmp, &dest).and_then(|()| fs::remove_file(&tmp))
        };
        if let Err(source) = result {
            for p in &placed {
                let _ = fs::remove_file(p);
            }
            for (dest, old) in &kept {
                let _ = fs::rename(old, dest);
            }
            return give_up(GenerateError::Write { path: dest, source });
        }
        placed.push(dest);
    }
    for (_, old) in &kept {
        let _ = fs::remove_file(old);
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

//! `generate`: steps 3 to 8 of the manual procedure in one command, written safely to a folder.

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
    #[error("--dhparam {path}: cannot read: {source}. --dhparam takes `generate`, `ffdhe2048` (the RFC 7919 group), or a FILE of PEM DH parameters (`openssl dhparam 2048`)")]
    DhparamFile {
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

pub const OUTPUT_NAMES: [&str; 8] = [
    contract::CA_KEY,
    contract::CA_CERT,
    contract::LEAF_KEY,
    contract::LEAF_CERT,
    contract::DH_PARAMS,
    contract::CERTS_MANIFEST,
    contract::KEYS_MANIFEST,
    contract::CA_KEY_MANIFEST,
];

/// A `--dhparam` file that cannot be read: maybe a group name we do not take (`ffdhe4096`).
fn dhparam_hint(e: GenerateError) -> GenerateError {
    match e {
        GenerateError::Read { path, source } => GenerateError::DhparamFile { path, source },
        e => e,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, GenerateError> {
    crate::limits::read_bounded(path).map_err(|source| GenerateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A CA given on the command line, parsed and checked, with the names its files go by.
struct GivenCa {
    cert: Vec<u8>,
    key_pem: SecretBytes,
    key: PrivateKey,
    cert_name: String,
    key_name: String,
}

/// Everything that can be refused, refused before the slow work starts: the given CA (can it
/// sign a leaf of `--days`?) and fixed DH parameters.
fn refuse_bad_inputs(
    opts: &GenerateOptions,
    now: OffsetDateTime,
) -> Result<(Option<GivenCa>, Option<DhParams>), GenerateError> {
    let given = match &opts.existing_ca {
        Some(ca) => {
            let given = GivenCa {
                key: PrivateKey::from_pem(ca.key.expose(), &ca.key_name)?,
                cert: ca.cert.clone(),
                key_pem: ca.key.clone(),
                cert_name: ca.cert_name.clone(),
                key_name: ca.key_name.clone(),
            };
            pki::check_ca_can_sign(
                &CaSigner {
                    cert_pem: &given.cert,
                    key: &given.key,
                    cert_name: &given.cert_name,
                    key_name: &given.key_name,
                },
                opts.days,
                now,
            )?;
            Some(given)
        }
        None => None,
    };
    let fixed_dh = match &opts.dhparam {
        DhSource::Generate => None,
        DhSource::Ffdhe2048 => Some(DhParams::ffdhe2048()),
        DhSource::Pem(pem, name) => Some(DhParams::validate(pem, name)?),
        DhSource::File(path) => Some(DhParams::validate(
            &read(path).map_err(dhparam_hint)?,
            &path.display().to_string(),
        )?),
    };
    Ok((given, fixed_dh))
}

/// The CA (given, or new) and the leaf it signs; the two new keys are made side by side (RSA
/// 4096 takes seconds).
fn issue_pki(
    opts: &GenerateOptions,
    given: Option<GivenCa>,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, SecretBytes, pki::IssuedLeaf, PrivateKey), GenerateError> {
    let (ca_key, leaf_key) = std::thread::scope(|keys| {
        let ca_key = given
            .is_none()
            .then(|| keys.spawn(|| PrivateKey::generate(opts.key_algorithm)));
        let leaf_key = PrivateKey::generate(opts.key_algorithm);
        let ca_key = ca_key.map(|h| h.join().expect("key generation panicked"));
        (ca_key, leaf_key)
    });
    let leaf_key = leaf_key?;
    let ca = match (given, ca_key) {
        (Some(given), _) => given,
        (None, Some(key)) => {
            let key = key?;
            GivenCa {
                cert: pki::issue_ca(&opts.ca_subject, opts.ca_days, &key, now)?.into_bytes(),
                key_pem: SecretBytes::new(key.to_pkcs8_pem()),
                key,
                cert_name: contract::CA_CERT.into(),
                key_name: contract::CA_KEY.into(),
            }
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
            cert_pem: &ca.cert,
            key: &ca.key,
            cert_name: &ca.cert_name,
            key_name: &ca.key_name,
        },
        now,
    )?;
    Ok((ca.cert, ca.key_pem, leaf, leaf_key))
}

/// Makes the materials. DH parameters are searched on other threads while the keys are made.
pub fn make_materials(
    opts: &GenerateOptions,
    now: OffsetDateTime,
    cancel: &AtomicBool,
) -> Result<Materials, GenerateError> {
    let (given, fixed_dh) = refuse_bad_inputs(opts, now)?;
    std::thread::scope(|scope| {
        let dh_search = fixed_dh.is_none().then(|| {
            scope.spawn(|| DhParams::generate(pki::dhparams::MIN_BITS, opts.threads, cancel))
        });
        let pki_result = issue_pki(opts, given, now);
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

/// The eight output files: the five materials, the two Secret manifests (`namespace` in them
/// when given, else none: one file applies into both namespaces), and the CA key Secret's
/// manifest (in `dssm_namespace` when known).
pub fn output_files(
    m: &Materials,
    namespace: Option<&str>,
    dssm_namespace: Option<&str>,
) -> Vec<OutputFile> {
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
    let ca_key = manifest::ca_key_secret_yaml(dssm_namespace, &m.ca_cert, m.ca_key.expose());
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
        // The CA key, for the dSSM namespace's CA key Secret: never mounted, never in TMM's.
        OutputFile {
            name: contract::CA_KEY_MANIFEST,
            bytes: ca_key.into_bytes(),
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
    let staging = Staging::create(dir)?;
    if let Err(e) = staging.write_temps(files) {
        return staging.give_up(files, e);
    }
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        let e = GenerateError::Interrupted {
            dir: dir.to_path_buf(),
        };
        return staging.give_up(files, e);
    }
    // Past this point a signal waits: placing eight files takes microseconds.
    let kept = if force {
        match staging.keep_old(files) {
            Ok(kept) => kept,
            Err(e) => return staging.give_up(files, e),
        }
    } else {
        vec![]
    };
    if let Err(e) = staging.place(files, force, &kept) {
        return staging.give_up(files, e);
    }
    for (_, old) in &kept {
        let _ = fs::remove_file(old);
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The output folder while files are written: temporaries beside their final names, so that
/// everything is placed, or nothing.
struct Staging<'a> {
    dir: &'a Path,
    created_dir: bool,
    pid: u32,
}

impl<'a> Staging<'a> {
    fn create(dir: &'a Path) -> Result<Self, GenerateError> {
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
        Ok(Staging {
            dir,
            created_dir,
            pid: std::process::id(),
        })
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.tmp-{}", self.pid))
    }

    fn old(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.old-{}", self.pid))
    }

    /// Each file written and synced under its temporary name, created with its mode.
    fn write_temps(&self, files: &[OutputFile]) -> Result<(), GenerateError> {
        for f in files {
            let path = self.tmp(f.name);
            let _ = fs::remove_file(&path);
            let result = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .open(&path)
                .and_then(|mut out| {
                    out.write_all(&f.bytes)?;
                    out.sync_all()
                });
            result.map_err(|source| GenerateError::Write {
                path: self.dir.join(f.name),
                source,
            })?;
        }
        Ok(())
    }

    /// `--force`: a hard link to each file it replaces, to put back if placing fails.
    fn keep_old(&self, files: &[OutputFile]) -> Result<Vec<(PathBuf, PathBuf)>, GenerateError> {
        let mut kept = Vec::new();
        for f in files {
            let dest = self.dir.join(f.name);
            if dest.symlink_metadata().is_err() {
                continue;
            }
            let old = self.old(f.name);
            let _ = fs::remove_file(&old);
            if let Err(source) = fs::hard_link(&dest, &old) {
                for (_, o) in &kept {
                    let _ = fs::remove_file(o);
                }
                return Err(GenerateError::Write { path: dest, source });
            }
            kept.push((dest, old));
        }
        Ok(kept)
    }

    /// Every temporary to its final name; on a failure, what was placed is removed and what
    /// was replaced is put back.
    fn place(
        &self,
        files: &[OutputFile],
        force: bool,
        kept: &[(PathBuf, PathBuf)],
    ) -> Result<(), GenerateError> {
        let mut placed = Vec::new();
        for f in files {
            let (tmp, dest) = (self.tmp(f.name), self.dir.join(f.name));
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
                for (dest, old) in kept {
                    let _ = fs::rename(old, dest);
                }
                return Err(GenerateError::Write { path: dest, source });
            }
            placed.push(dest);
        }
        Ok(())
    }

    /// Nothing left behind: the temporaries, and the folder if we made it.
    fn give_up(&self, files: &[OutputFile], e: GenerateError) -> Result<(), GenerateError> {
        for f in files {
            let _ = fs::remove_file(self.tmp(f.name));
        }
        if self.created_dir {
            let _ = fs::remove_dir(self.dir);
        }
        Err(e)
    }
}

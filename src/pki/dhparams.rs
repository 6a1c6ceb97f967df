//! DH parameters for Redis' `tls-dh-params-file`: fresh ones like `openssl dhparam 2048`
//! (searched on every core, first winner stops the others), the RFC 7919 ffdhe2048 group, or an
//! operator's file checked with DH_check.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use foreign_types::ForeignType;
use openssl::dh::Dh;
use openssl::pkey::Params;

/// The smallest modulus we accept, and the size the seeds generate.
pub const MIN_BITS: u32 = 2048;
/// The largest modulus we accept: 4096 bits is plenty for TLS key exchange (RFC 7919 stops its
/// recommendations there), DH_check's primality tests grow steeply with the size, and a huge
/// modulus in a Secret must not stall every inspection.
pub const MAX_BITS: u32 = 4096;
/// An 8192-bit PKCS#3 PEM is about 1.5 KB; anything much larger is not DH parameters.
const MAX_PEM_BYTES: usize = 16 * 1024;
/// DH_check verdicts kept (by SHA-256 of the parameters): the agent judges the same params on
/// every event.
const CHECK_CACHE_ENTRIES: usize = 64;

/// RFC 7919 ffdhe2048, byte-identical to
/// `openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`.
pub const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

#[derive(Debug, thiserror::Error)]
pub enum DhError {
    #[error("{what}: not PEM DH parameters (expected `-----BEGIN DH PARAMETERS-----`)")]
    Unreadable { what: String },
    #[error("{what}: the first PEM block is a {label}, not DH parameters (expected `-----BEGIN DH PARAMETERS-----`, as `openssl dhparam 2048` writes)")]
    WrongLabel { what: String, label: String },
    #[error("{what}: X9.42 DH parameters (`BEGIN X9.42 DH PARAMETERS`) are refused: Redis cannot load them and would not start. Use PKCS#3 parameters (`BEGIN DH PARAMETERS`), as `openssl dhparam 2048` writes")]
    X942 { what: String },
    #[error("{what}: an encrypted PEM block (`Proc-Type: 4,ENCRYPTED`) is not DH parameters")]
    Encrypted { what: String },
    #[error("{what}: the DH modulus has {bits} bits; at least {MIN_BITS} are required")]
    TooSmall { what: String, bits: u32 },
    #[error("{what}: the DH modulus has {bits} bits; at most {MAX_BITS} are accepted")]
    TooLarge { what: String, bits: u32 },
    #[error("{what}: {bytes} bytes is too large for DH parameters (at most {MAX_PEM_BYTES})")]
    TooLong { what: String, bytes: usize },
    #[error("{what}: DH_check rejects the parameters: {problems}")]
    Invalid { what: String, problems: String },
    #[error("DH parameter generation failed: {0}")]
    Generate(String),
    #[error("DH parameter generation was cancelled")]
    Cancelled,
}

/// Validated DH parameters, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhParams {
    pem: Vec<u8>,
    bits: u32,
    generator: u32,
}

impl DhParams {
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }
    pub fn bits(&self) -> u32 {
        self.bits
    }
    pub fn generator(&self) -> u32 {
        self.generator
    }

    pub fn ffdhe2048() -> Self {
        Self::validate(FFDHE2048_PEM.as_bytes(), "ffdhe2048").expect("RFC 7919 group is valid")
    }

    /// Reads and checks PEM parameters: PKCS#3 only (no `q`), 2048 to 4096 bits, a safe prime, a
    /// suitable generator. What is kept is OpenSSL's canonical PKCS#3 re-encoding, not the input
    /// bytes. DH_check takes from milliseconds to seconds (its verdicts are cached by the
    /// parameters' SHA-256): async callers run this with `spawn_blocking`.
    pub fn validate(pem: &[u8], what: &str) -> Result<Self, DhError> {
        let what = || what.to_string();
        if pem.len() > MAX_PEM_BYTES {
            return Err(DhError::TooLong {
                what: what(),
                bytes: pem.len(),
            });
        }
        // An encrypted PEM header would make OpenSSL ask for a passphrase on the terminal.
        if super::keys::refuse_encrypted(pem).is_err() {
            return Err(DhError::Encrypted { what: what() });
        }
        // OpenSSL's PEM_read_bio_DHparams takes X9.42 too; Redis does not. Judge by the first
        // PEM label (a BEGIN line as OpenSSL reads one: at a line's start), and hand OpenSSL
        // only PKCS#3.
        match first_pem_label(pem) {
            Some(b"DH PARAMETERS") => {}
            Some(b"X9.42 DH PARAMETERS") => return Err(DhError::X942 { what: what() }),
            Some(label) => {
                let label = String::from_utf8_lossy(label).chars().take(40).collect();
                return Err(DhError::WrongLabel {
                    what: what(),
                    label,
                });
            }
            None => return Err(DhError::Unreadable { what: what() }),
        }
        let dh = Dh::params_from_pem(pem).map_err(|_| DhError::Unreadable { what: what() })?;
        // Whatever OpenSSL read must have no subgroup order of its own: X9.42 carries q, while
        // for a PKCS#3 safe-prime group OpenSSL only infers q = (p-1)/2.
        if !q_is_implied(&dh) {
            return Err(DhError::X942 { what: what() });
        }
        let bits = dh.prime_p().num_bits() as u32;
        if bits < MIN_BITS {
            return Err(DhError::TooSmall { what: what(), bits });
        }
        if bits > MAX_BITS {
            return Err(DhError::TooLarge { what: what(), bits });
        }
        let what = what();
        let canonical = dh
            .params_to_pem()
            .map_err(|_| DhError::Unreadable { what: what.clone() })?;
        let problems = cached_dh_check(&dh, &canonical);
        if !problems.is_empty() {
            return Err(DhError::Invalid {
                what: what.to_string(),
                problems: problems.join(", "),
            });
        }
        let generator = dh
            .generator()
            .to_dec_str()
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        Ok(DhParams {
            pem: canonical,
            bits,
            generator,
        })
    }

    /// Fresh parameters with generator 2, like `openssl dhparam <bits>`. Runs `threads`
    /// independent searches; the first to find a safe prime wins and the others stop within
    /// milliseconds. `cancel` stops all of them.
    pub fn generate(bits: u32, threads: usize, cancel: &AtomicBool) -> Result<Self, DhError> {
        let threads = threads.max(1);
        let done = AtomicBool::new(false);
        let winner = std::thread::scope(|scope| {
            let searches: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| search(bits, &done, cancel)))
                .collect();
            let mut winner = None;
            let mut failure = None;
            for s in searches {
                match s.join().expect("a DH search thread panicked") {
                    Ok(Some(pem)) if winner.is_none() => winner = Some(pem),
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            }
            winner.ok_or(failure.unwrap_or(DhError::Cancelled))
        })?;
        Self::validate(&winner, "generated DH parameters")
    }
}

/// The label of the first `-----BEGIN <label>-----` line, found as OpenSSL's PEM reader finds
/// one: only at the start of a line.
fn first_pem_label(pem: &[u8]) -> Option<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let line = pem.split(|&b| b == b'\n').find(|l| l.starts_with(BEGIN))?;
    let rest = &line[BEGIN.len()..];
    let end = rest.windows(5).position(|w| w == b"-----")?;
    Some(&rest[..end])
}

/// No q, or the q OpenSSL fills in for a known safe-prime group: (p-1)/2.
fn q_is_implied(dh: &Dh<Params>) -> bool {
    let Some(q) = dh.prime_q() else {
        return true;
    };
    use openssl::bn::BigNum;
    let implied = (|| {
        let mut p_minus_1 = BigNum::new()?;
        let one = BigNum::from_u32(1)?;
        p_minus_1.checked_sub(dh.prime_p(), &one)?;
        let mut half = BigNum::new()?;
        half.rshift1(&p_minus_1)?;
        Ok::<_, openssl::error::ErrorStack>(half)
    })();
    implied.is_ok_and(|h| *h == *q)
}

/// DH_check, its verdict cached by the SHA-256 of the canonical PEM.
fn cached_dh_check(dh: &Dh<Params>, canonical: &[u8]) -> Vec<&'static str> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Cache = Mutex<HashMap<[u8; 32], Vec<&'static str>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let key = openssl::sha::sha256(canonical);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return v;
    }
    let verdict = dh_check(dh);
    if let Ok(mut c) = cache.lock() {
        if c.len() >= CHECK_CACHE_ENTRIES {
            c.clear();
        }
        c.insert(key, verdict.clone());
    }
    verdict
}

/// How many times DH_check ran in this process (the cache's test reads it).
static DH_CHECK_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn dh_check(dh: &Dh<Params>) -> Vec<&'static str> {
    DH_CHECK_RUNS.fetch_add(1, Ordering::Relaxed);
    let mut codes: c_int = 0;
    // SAFETY: dh is a valid DH object for the duration of the call.
    let ok = unsafe { openssl_sys::DH_check(dh.as_ptr(), &mut codes) };
    let _ = openssl::error::ErrorStack::get(); // drain the thread's error queue
    if ok != 1 {
        return vec!["DH_check could not run"];
    }
    // Flag values from openssl/dh.h.
    let flags: [(c_int, &str); 7] = [
        (0x01, "p is not prime"),
        (0x02, "p is not a safe prime"),
        (0x04, "unable to check the generator"),
        (0x08, "the generator is not suitable"),
        (0x10, "q is not prime"),
        (0x20, "q is invalid"),
        (0x40, "j is invalid"),
    ];
    flags
        .iter()
        .filter(|(bit, _)| codes & bit != 0)
        .map(|(_, text)| *text)
        .collect()
}

// openssl-sys declares BN_GENCB but not the functions that make one.
extern "C" {
    fn BN_GENCB_new() -> *mut openssl_sys::BN_GENCB;
    fn BN_GENCB_free(cb: *mut openssl_sys::BN_GENCB);
    fn BN_GENCB_set(
        cb: *mut openssl_sys::BN_GENCB,
        callback: extern "C" fn(c_int, c_int, *mut openssl_sys::BN_GENCB) -> c_int,
        arg: *mut c_void,
    );
    fn BN_GENCB_get_arg(cb: *mut openssl_sys::BN_GENCB) -> *mut c_void;
}

struct StopFlags<'a> {
    done: &'a AtomicBool,
    cancel: &'a AtomicBool,
}

/// OpenSSL calls this throughout the prime search; returning 0 aborts it.
extern "C" fn keep_going(_p: c_int, _n: c_int, cb: *mut openssl_sys::BN_GENCB) -> c_int {
    // SAFETY: the argument is the StopFlags that `search` keeps alive for the whole call.
    let flags = unsafe { &*(BN_GENCB_get_arg(cb) as *const StopFlags<'_>) };
    let stop = flags.done.load(Ordering::Relaxed) || flags.cancel.load(Ordering::Relaxed);
    c_int::from(!stop)
}

/// One search. Ok(None): another search won or we were cancelled.
fn search(bits: u32, done: &AtomicBool, cancel: &AtomicBool) -> Result<Option<Vec<u8>>, DhError> {
    let flags = StopFlags { done, cancel };
    // SAFETY: every pointer is checked, freed exactly once, and `flags` outlives the call.
    unsafe {
        let raw = openssl_sys::DH_new();
        if raw.is_null() {
            return Err(DhError::Generate("DH_new failed".into()));
        }
        let dh: Dh<Params> = Dh::from_ptr(raw);
        let cb = BN_GENCB_new();
        if cb.is_null() {
            return Err(DhError::Generate("BN_GENCB_new failed".into()));
        }
        BN_GENCB_set(
            cb,
            keep_going,
            &flags as *const StopFlags<'_> as *mut c_void,
        );
        let ok = openssl_sys::DH_generate_parameters_ex(dh.as_ptr(), bits as c_int, 2, cb);
        BN_GENCB_free(cb);
        let errors = openssl::error::ErrorStack::get();
        if ok == 1 {
            if done.swap(true, Ordering::SeqCst) {
                return Ok(None); // someone else finished first
            }
            return dh
                .params_to_pem()
                .map(Some)
                .map_err(|e| DhError::Generate(e.to_string()));
        }
        if done.load(Ordering::SeqCst) || cancel.load(Ordering::SeqCst) {
            Ok(None)
        } else {
            Err(DhError::Generate(errors.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffdhe2048_is_a_valid_2048_bit_group_with_generator_2() {
        let p = DhParams::ffdhe2048();
        assert_eq!((p.bits(), p.generator()), (2048, 2));
    }

    #[test]
    fn a_cancelled_search_stops_and_says_so() {
        let cancel = AtomicBool::new(true);
        // A search that ignored the callback would finish and return parameters.
        let err = DhParams::generate(2048, 2, &cancel).unwrap_err();
        assert!(matches!(err, DhError::Cancelled), "{err}");
    }

    #[test]
    fn garbage_is_unreadable_and_names_the_input() {
        let err = DhParams::validate(b"not pem", "ns/secret[dhparam2048.pem]").unwrap_err();
        assert!(matches!(err, DhError::Unreadable { .. }));
        assert!(err.to_string().contains("ns/secret[dhparam2048.pem]"));
    }

    #[test]
    fn a_modulus_that_is_not_a_safe_prime_is_invalid() {
        use openssl::bn::BigNum;
        // ffdhe2048's p + 2 is odd, 2048 bits, and not prime.
        let good = Dh::params_from_pem(FFDHE2048_PEM.as_bytes()).unwrap();
        let mut p = BigNum::new().unwrap();
        p.checked_add(good.prime_p(), &BigNum::from_u32(2).unwrap())
            .unwrap();
        let bad = Dh::from_pqg(p, None, BigNum::from_u32(2).unwrap()).unwrap();
        let pem = bad.params_to_pem().unwrap();
        let err = DhParams::validate(&pem, "bad.pem").unwrap_err();
        assert!(matches!(err, DhError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("not prime"), "{err}");
    }

    #[test]
    fn a_modulus_over_4096_bits_is_refused_before_dh_check() {
        use openssl::bn::{BigNum, MsbOption};
        // 6000 random bits, odd: DH_check would spend its time proving it composite.
        let mut p = BigNum::new().unwrap();
        p.rand(6000, MsbOption::ONE, true).unwrap();
        let huge = Dh::from_pqg(p, None, BigNum::from_u32(2).unwrap()).unwrap();
        let pem = huge.params_to_pem().unwrap();
        let err = DhParams::validate(&pem, "huge.pem").unwrap_err();
        assert!(matches!(err, DhError::TooLarge { bits: 6000, .. }), "{err}");
        assert!(err.to_string().contains("huge.pem") && err.to_string().contains("4096"));
    }

    /// X9.42 parameters as `openssl genpkey -genparam -algorithm DHX -pkeyopt dh_rfc5114:3`
    /// writes them (RFC 5114's 2048-bit group with its 256-bit q).
    const X942_PEM: &str = "-----BEGIN X9.42 DH PARAMETERS-----
MIICLAKCAQEAh6jmHbS2Zjz/u9GcZRlZmYzu9ghmDdDyXSzu1ENeOwDgDfjx1hlX
1Pr330VhsqowFsPZETQJb6o79Cltgw6afCCeDGSXUXq9WoqdMGvPZ+2R+eZyW0dY
wCLgse9Cdb97bFv8EdRfkIi5QfVOseWbuLw5oL8SMH9cT9twxYGyP3a2Osrhyqa3
kC1SUmc1SIoO8TxtmlG/pKs62DR3llJNjvahZ7WkGCXZZ+FE5RQFZCUcysuD5rSG
9rPKP3lxUGAmwLhX9omWKFbe1AEKvQvmIcOjlgpU5xDDdfJjddcBQQOktUMwwZiv
EmEW0iduEXFfaTh3+tfvCcrbCUrpHhoVlwKCAQA/syybcxNNCy53UGZg7b1ITKex
jyHvIFQH9Hk6GguhJRDbwVB3vkY//0/tSqwLtVW+OmwbDGtHsbw3c79+jG9ikBIo
+MKMuxilWuMTQQAKZQGW+THHelfy3fRj5ensFEt3feYqqrioYorDdtKC1u04ZOZ5
gkKOvIMdFDSPby+Rk7UEWvJ2cWTh38lnwfs/LlWkvRv/6DucgNBSuYXRguoK2yo7
cxPT/hTISEseBSWIubfSu9LfAWGZ7NBuFVfNCRWzNTu7ZODsN3/QKDcN+StSx4kU
KM3GfrYYS1I9HbJGwy9jB4SQ8A741kfRSNR5VFFeIyfP75jFgmZLTA9sxBZZAiEA
jPg2QqcJoJe0R5l2QBKdopmxpH0es3ULowiw/mT1+9M=
-----END X9.42 DH PARAMETERS-----
";

    fn x942_pem() -> Vec<u8> {
        X942_PEM.as_bytes().to_vec()
    }

    /// The trust-boundary issue: the label was searched anywhere, while OpenSSL reads a BEGIN
    /// line only at a line's start: a stray `x-----BEGIN DH PARAMETERS-----` line before an
    /// X9.42 block passed, and that block was written into the Secret.
    #[test]
    fn a_stray_begin_inside_a_line_does_not_hide_an_x942_block() {
        let pem = [&b"x-----BEGIN DH PARAMETERS-----\n"[..], &x942_pem()].concat();
        let err = DhParams::validate(&pem, "x.pem").unwrap_err();
        assert!(matches!(err, DhError::X942 { .. }), "{err}");
    }

    /// Whatever the label says, parameters OpenSSL reads with a q of their own are X9.42; the
    /// q OpenSSL infers for a safe-prime group (ffdhe2048) is not.
    #[test]
    fn parameters_with_a_subgroup_order_are_refused_and_a_safe_prime_group_is_not() {
        use openssl::bn::BigNum;
        let p = BigNum::get_rfc3526_prime_2048().unwrap();
        let dh = Dh::from_pqg(
            p,
            Some(BigNum::from_u32(65537).unwrap()),
            BigNum::from_u32(2).unwrap(),
        )
        .unwrap();
        assert!(!q_is_implied(&dh));
        let ffdhe = Dh::params_from_pem(FFDHE2048_PEM.as_bytes()).unwrap();
        assert!(q_is_implied(&ffdhe), "OpenSSL's inferred q for ffdhe2048");
        assert!(DhParams::validate(FFDHE2048_PEM.as_bytes(), "ffdhe").is_ok());
    }

    /// What is kept is OpenSSL's canonical PKCS#3 encoding, not the input's bytes (text around
    /// the block, other blocks after it), and the DH_check verdict is cached.
    #[test]
    fn the_canonical_encoding_is_kept_and_dh_check_runs_once_per_parameters() {
        let noisy = format!("comment line\n{FFDHE2048_PEM}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let p = DhParams::validate(noisy.as_bytes(), "noisy.pem").unwrap();
        assert_eq!(p.pem(), FFDHE2048_PEM.as_bytes());
        let before = DH_CHECK_RUNS.load(Ordering::Relaxed);
        for _ in 0..3 {
            DhParams::validate(noisy.as_bytes(), "noisy.pem").unwrap();
        }
        // Other tests may run DH_check on other params meanwhile; ours never again.
        assert!(DH_CHECK_RUNS.load(Ordering::Relaxed) - before < 3);
    }

    /// A certificate where DH parameters belong is broken materials (critical), not "cannot
    /// tell".
    #[test]
    fn a_certificate_in_the_dh_file_is_named_as_such() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = DhParams::validate(pem, "dh.pem").unwrap_err();
        assert!(matches!(err, DhError::WrongLabel { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("is a CERTIFICATE, not DH parameters"),
            "{err}"
        );
    }

    #[test]
    fn input_far_larger_than_any_dh_parameters_is_refused_unparsed() {
        let mut pem = FFDHE2048_PEM.as_bytes().to_vec();
        pem.resize(1 << 20, b'\n');
        let err = DhParams::validate(&pem, "big.pem").unwrap_err();
        assert!(matches!(err, DhError::TooLong { .. }), "{err}");
    }

    /// With an encrypted header, OpenSSL's DH reader (no callback) would prompt on a terminal.
    fn encrypted_dh_pem() -> String {
        FFDHE2048_PEM.replacen(
            "-----\n",
            "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
            1,
        )
    }

    #[test]
    fn dh_parameters_with_an_encrypted_pem_header_are_refused_before_openssl_reads_them() {
        let err = DhParams::validate(encrypted_dh_pem().as_bytes(), "enc.pem").unwrap_err();
        assert!(matches!(err, DhError::Encrypted { .. }), "{err}");
    }

    #[test]
    fn x942_is_judged_by_its_pem_label() {
        let pem = FFDHE2048_PEM.replace("DH PARAMETERS", "X9.42 DH PARAMETERS");
        let err = DhParams::validate(pem.as_bytes(), "x.pem").unwrap_err();
        assert!(matches!(err, DhError::X942 { .. }), "{err}");
    }
}

//! Private keys: generation (openssl, because ring cannot generate RSA keys), reading every PEM
//! form operators have on disk (PKCS#8, PKCS#1 `RSA PRIVATE KEY`, SEC1 `EC PRIVATE KEY`), and the
//! bridge to rcgen for signing.

use std::fmt;

use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::rsa::Rsa;
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::Zeroizing;

/// The key algorithms `--key-algorithm` offers. RSA 4096 is the seeds' `openssl genrsa 4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    Rsa2048,
    Rsa3072,
    #[default]
    Rsa4096,
    EcdsaP256,
    EcdsaP384,
}

impl KeyAlgorithm {
    pub fn describe(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa2048 => "RSA 2048",
            KeyAlgorithm::Rsa3072 => "RSA 3072",
            KeyAlgorithm::Rsa4096 => "RSA 4096",
            KeyAlgorithm::EcdsaP256 => "ECDSA P-256",
            KeyAlgorithm::EcdsaP384 => "ECDSA P-384",
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(
            self,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096
        )
    }

    /// What a certificate signed by a key of this algorithm uses: SHA-384 for RSA as the seeds'
    /// `-sha384`, the curve's own hash for ECDSA.
    fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                &rcgen::PKCS_RSA_SHA384
            }
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: not a PEM private key (expected PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or `EC PRIVATE KEY`)")]
    Unreadable { what: String },
    #[error("{what}: unsupported key ({detail}); dssm-certs handles RSA 2048-8192 and ECDSA P-256/P-384")]
    Unsupported { what: String, detail: String },
    #[error("generating a {algorithm} key failed: {source}")]
    Generate {
        algorithm: &'static str,
        source: openssl::error::ErrorStack,
    },
    #[error("{what}: the key cannot be used for signing: {detail}")]
    Signer { what: String, detail: String },
    #[error("{what}: the private key is encrypted ({form}); Redis and TMM read it without a passphrase, so dssm-certs needs it unencrypted (decrypt it with `openssl pkey -in KEY -out KEY.plain`)")]
    Encrypted { what: String, form: &'static str },
}

/// Refuses encrypted PEM (PKCS#8 `ENCRYPTED PRIVATE KEY`, or a PKCS#1/SEC1 block with
/// `Proc-Type: 4,ENCRYPTED`): such input would otherwise reach OpenSSL's passphrase prompt.
pub(crate) fn refuse_encrypted(pem: &[u8]) -> Result<(), &'static str> {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    if has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        Err("PKCS#8 `BEGIN ENCRYPTED PRIVATE KEY`")
    } else if has(b"Proc-Type: 4,ENCRYPTED") || has(b"DEK-Info:") {
        Err("PEM header `Proc-Type: 4,ENCRYPTED`")
    } else {
        Ok(())
    }
}

/// OpenSSL asks for a passphrase on the terminal when no callback is given. This one supplies an
/// empty passphrase instead, so nothing can ever prompt, whatever the input.
pub(crate) fn no_passphrase(_buf: &mut [u8]) -> Result<usize, openssl::error::ErrorStack> {
    Ok(0)
}

/// A private key. Holds PKCS#8 DER; `Debug` never shows it.
#[derive(Clone)]
pub struct PrivateKey {
    pkey: PKey<Private>,
    algorithm: KeyAlgorithm,
    rsa_bits: u32,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.describe())
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl PrivateKey {
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let err = |source| KeyError::Generate {
            algorithm: algorithm.describe(),
            source,
        };
        let pkey = match algorithm {
            KeyAlgorithm::Rsa2048 => PKey::from_rsa(Rsa::generate(2048).map_err(err)?),
            KeyAlgorithm::Rsa3072 => PKey::from_rsa(Rsa::generate(3072).map_err(err)?),
            KeyAlgorithm::Rsa4096 => PKey::from_rsa(Rsa::generate(4096).map_err(err)?),
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                let nid = if algorithm == KeyAlgorithm::EcdsaP256 {
                    Nid::X9_62_PRIME256V1
                } else {
                    Nid::SECP384R1
                };
                let group = EcGroup::from_curve_name(nid).map_err(err)?;
                PKey::from_ec_key(EcKey::generate(&group).map_err(err)?)
            }
        }
        .map_err(err)?;
        Self::from_pkey(pkey, "generated key")
    }

    /// Reads a PEM private key. `what` names the file or Secret key in error messages.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, KeyError> {
        refuse_encrypted(pem).map_err(|form| KeyError::Encrypted {
            what: what.to_string(),
            form,
        })?;
        // openssl reads PKCS#8, PKCS#1 and SEC1; its error text never contains key bytes, and we
        // drop it anyway.
        let pkey = PKey::private_key_from_pem_callback(pem, no_passphrase).map_err(|_| {
            KeyError::Unreadable {
                what: what.to_string(),
            }
        })?;
        Self::from_pkey(pkey, what)
    }

    fn from_pkey(pkey: PKey<Private>, what: &str) -> Result<Self, KeyError> {
        let unsupported = |detail: String| KeyError::Unsupported {
            what: what.to_string(),
            detail,
        };
        let (algorithm, rsa_bits) = match pkey.id() {
            Id::RSA => {
                let bits = pkey.bits();
                let algorithm = match bits {
                    2048 => KeyAlgorithm::Rsa2048,
                    3072 => KeyAlgorithm::Rsa3072,
                    // ring signs with 2048..=8192-bit keys; any size in between is an RSA key we
                    // can use, reported as "RSA <bits>".
                    4096 => KeyAlgorithm::Rsa4096,
                    b if (2048..=8192).contains(&b) => KeyAlgorithm::Rsa4096,
                    b => return Err(unsupported(format!("RSA {b} bits"))),
                };
                (algorithm, bits)
            }
            Id::EC => {
                let ec = pkey
                    .ec_key()
                    .map_err(|_| unsupported("unreadable EC key".into()))?;
                match ec.group().curve_name() {
                    Some(Nid::X9_62_PRIME256V1) => (KeyAlgorithm::EcdsaP256, 0),
                    Some(Nid::SECP384R1) => (KeyAlgorithm::EcdsaP384, 0),
                    other => return Err(unsupported(format!("EC curve {other:?}"))),
                }
            }
            other => return Err(unsupported(format!("key type {other:?}"))),
        };
        Ok(PrivateKey {
            pkey,
            algorithm,
            rsa_bits,
        })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// "RSA 4096", "ECDSA P-256", ...
    pub fn describe(&self) -> String {
        if self.algorithm.is_rsa() {
            format!("RSA {}", self.rsa_bits)
        } else {
            self.algorithm.describe().to_string()
        }
    }

    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`), what OpenSSL 3's `genrsa` writes.
    pub fn to_pkcs8_pem(&self) -> Vec<u8> {
        self.pkey
            .private_key_to_pem_pkcs8()
            .expect("a key we hold always serializes")
    }

    /// PKCS#8 DER, wiped from memory when dropped.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            self.pkey
                .private_key_to_pkcs8()
                .expect("a key we hold always serializes"),
        )
    }

    /// DER SubjectPublicKeyInfo of the public half, to compare with a certificate's.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pkey
            .public_key_to_der()
            .expect("a key we hold always has a public half")
    }

    /// The rcgen signer for this key, signing with SHA-384 for RSA (rcgen's `from_pem` would
    /// silently pick SHA-256).
    pub(crate) fn signer(&self, what: &str) -> Result<KeyPair, KeyError> {
        let der = self.to_pkcs8_der();
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der.as_slice()),
            self.algorithm.signature_algorithm(),
        )
        .map_err(|e| KeyError::Signer {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }
}

/// Bytes of private key material (PEM). `Debug` never shows them; they are wiped when dropped.
#[derive(Clone, PartialEq, Eq, zeroize::ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([{} bytes elided])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_material() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let pem = key.to_pkcs8_pem();
        let body: String = String::from_utf8_lossy(&pem)
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        for shown in [
            format!("{key:?}"),
            format!("{:?}", SecretBytes::new(pem.clone())),
        ] {
            assert!(
                !shown.contains(&body[..20]) && !shown.contains("PRIVATE"),
                "{shown}"
            );
        }
    }

    #[test]
    fn every_pem_form_of_a_key_reads_back_as_the_same_key() {
        let key = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
        let rsa = key.pkey.rsa().unwrap();
        let pkcs1 = rsa.private_key_to_pem().unwrap();
        assert!(String::from_utf8_lossy(&pkcs1).contains("BEGIN RSA PRIVATE KEY"));
        for pem in [key.to_pkcs8_pem(), pkcs1] {
            let back = PrivateKey::from_pem(&pem, "k").unwrap();
            assert_eq!(back.public_key_der(), key.public_key_der());
            assert_eq!(back.describe(), "RSA 2048");
        }
        let ec = PrivateKey::generate(KeyAlgorithm::EcdsaP384).unwrap();
        let sec1 = ec.pkey.ec_key().unwrap().private_key_to_pem().unwrap();
        assert!(String::from_utf8_lossy(&sec1).contains("BEGIN EC PRIVATE KEY"));
        let back = PrivateKey::from_pem(&sec1, "k").unwrap();
        assert_eq!(back.algorithm(), KeyAlgorithm::EcdsaP384);
        back.signer("k")
            .expect("a SEC1 key converted to PKCS#8 signs");
    }

    #[test]
    fn unreadable_and_unsupported_keys_name_their_source() {
        let err = PrivateKey::from_pem(b"nope", "spk-utilities/dssm-keys-secret[dssm-key.key]")
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("spk-utilities/dssm-keys-secret[dssm-key.key]"));
        let small = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
        let pem = small.private_key_to_pem_pkcs8().unwrap();
        let err = PrivateKey::from_pem(&pem, "small.key").unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("small.key") && err.to_string().contains("1024"));
    }
}

//! Identities: a self-signed certificate and its private key, made with rcgen, stored as
//! `<dir>/<role>.crt` and `<dir>/<role>.key`, and known to peers by [`Fingerprint`]: the
//! SHA-256 of the certificate's SubjectPublicKeyInfo, printed as 64 hex digits (the same
//! value as `openssl pkey -pubout -outform DER | sha256sum`). No CA is involved: both sides
//! pin each other's fingerprint.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// An identity could not be created, read or used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// An identity already exists where `keygen` would write one.
    #[error(
        "{0} already exists: refusing to overwrite an identity (use `fingerprint` to show it)"
    )]
    Exists(PathBuf),
    /// No identity at the given place.
    #[error("no identity at {0} (create one with `keygen`)")]
    Missing(PathBuf),
    /// The private key is readable by group or others.
    #[error("private key {path} has mode {mode:04o}: it must not be readable by group or others (run `chmod 600 {path}`)")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are not a valid certificate or key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Key generation failed.
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a public key (SubjectPublicKeyInfo DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(spki_der).into())
    }

    /// Fingerprint of the public key in a DER certificate.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        Ok(Fingerprint::of_spki(&ee.subject_public_key_info()))
    }

    /// Parses 64 hex digits; `:` separators and case are ignored.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|&c| c != ':').collect();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a fingerprint (64 hex digits, as printed by `keygen` or `fingerprint`)"
            ));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Fingerprint(out))
    }

    /// First 8 hex digits, for log lines.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::parse(s)
    }
}

/// A loaded identity: certificate chain (one self-signed certificate) and private key.
#[derive(Debug)]
pub struct Identity {
    /// The certificate.
    pub cert: CertificateDer<'static>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// Fingerprint of the certificate's public key.
    pub fingerprint: Fingerprint,
}

/// A receiver listening on several sockets (systemd passed more than one) needs the
/// identity once per endpoint.
impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

/// Paths of the certificate and key for `role` (`zq-send`, `zq-recv`) in `dir`.
pub fn paths(dir: &Path, role: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{role}.crt")),
        dir.join(format!("{role}.key")),
    )
}

impl Identity {
    /// Creates a new identity for `role` in `dir` (created with mode 0700 if missing).
    /// Refuses to overwrite an existing one. The key file is created with mode 0600.
    pub fn generate(dir: &Path, role: &str) -> Result<Fingerprint, IdentityError> {
        let (crt_path, key_path) = paths(dir, role);
        for p in [&crt_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::Exists(p.clone()));
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![format!("{role}.zq")])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, role);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;

        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io_err(&key_path))?;
        f.write_all(key.serialize_pem().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err(&key_path))?;
        fs::write(&crt_path, cert.pem()).map_err(io_err(&crt_path))?;
        Ok(Fingerprint::of_spki(&key.public_key_der()))
    }

    /// Loads the identity of `role` from `dir`, refusing a key readable by group or others.
    pub fn load(dir: &Path, role: &str) -> Result<Self, IdentityError> {
        let (crt_path, key_path) = paths(dir, role);
        if !key_path.exists() {
            return Err(IdentityError::Missing(key_path));
        }
        let mode = fs::metadata(&key_path)
            .map_err(io_err(&key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let cert = Self::load_cert(&crt_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| IdentityError::Invalid {
            path: key_path.clone(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let fingerprint =
            Fingerprint::of_certificate(&cert).map_err(|reason| IdentityError::Invalid {
                path: crt_path.clone(),
                reason,
            })?;
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }

    /// Reads only the certificate of `role` in `dir` and returns its fingerprint (needs no
    /// access to the private key).
    pub fn fingerprint_of(dir: &Path, role: &str) -> Result<Fingerprint, IdentityError> {
        let (crt_path, _) = paths(dir, role);
        let cert = Self::load_cert(&crt_path)?;
        Fingerprint::of_certificate(&cert).map_err(|reason| IdentityError::Invalid {
            path: crt_path,
            reason,
        })
    }

    fn load_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
        if !path.exists() {
            return Err(IdentityError::Missing(path.to_path_buf()));
        }
        CertificateDer::from_pem_file(path).map_err(|e| IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_fingerprint_agree() {
        let dir = tempfile::tempdir().unwrap();
        let fp = Identity::generate(dir.path(), "zq-recv").unwrap();
        let id = Identity::load(dir.path(), "zq-recv").unwrap();
        assert_eq!(id.fingerprint, fp);
        assert_eq!(Identity::fingerprint_of(dir.path(), "zq-recv").unwrap(), fp);
        let (_, key) = paths(dir.path(), "zq-recv");
        assert_eq!(
            fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Two roles can share one directory.
        let fp2 = Identity::generate(dir.path(), "zq-send").unwrap();
        assert_ne!(fp, fp2);
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate(dir.path(), "zq-send").unwrap();
        assert!(matches!(
            Identity::generate(dir.path(), "zq-send"),
            Err(IdentityError::Exists(_))
        ));
    }

    #[test]
    fn refuses_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate(dir.path(), "zq-send").unwrap();
        let (_, key) = paths(dir.path(), "zq-send");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Identity::load(dir.path(), "zq-send").unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn missing_identity_names_keygen() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(dir.path(), "zq-send").unwrap_err();
        assert!(e.to_string().contains("keygen"), "{e}");
    }

    #[test]
    fn fingerprint_parse() {
        let fp = Fingerprint([0xab; 32]);
        assert_eq!(Fingerprint::parse(&fp.to_string()).unwrap(), fp);
        let colons = fp
            .to_string()
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(Fingerprint::parse(&colons).unwrap(), fp);
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"g".repeat(64)).is_err());
    }
}

//! Throwaway certificates for the migration stream's TLS ([`crate::tls`]): a CA and two leaf
//! certificates it signs, one for the destination (TLS server) and one for the source (TLS
//! client). For `dmalog demo`, the tests and `dmalog migrate gen-certs`; the CA's key is not
//! kept, so nothing more can be signed with it later.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What went wrong making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused (for example, a server name that is not a DNS name or an IP address).
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {}: {cause}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A CA that signs leaves; only its certificate outlives it.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM: what both hosts trust.
    pub cert_pem: String,
}

impl Authority {
    /// A new CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Authority {
            params,
            key,
            cert_pem,
        })
    }

    fn leaf(
        &self,
        common_name: &str,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Leaf, PkiError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A destination (TLS server) certificate valid for each of `names` (DNS names or IP
    /// addresses).
    pub fn server(&self, names: &[String]) -> Result<Leaf, PkiError> {
        self.leaf(
            "dmalog destination",
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A source (TLS client) certificate.
    pub fn client(&self, common_name: &str) -> Result<Leaf, PkiError> {
        self.leaf(common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The files [`write_set`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA certificate (both hosts' `--tls-ca`).
    pub ca: PathBuf,
    /// The destination's certificate.
    pub server_cert: PathBuf,
    /// The destination's key.
    pub server_key: PathBuf,
    /// The source's certificate.
    pub client_cert: PathBuf,
    /// The source's key.
    pub client_key: PathBuf,
}

/// Writes `contents` to a new file `path` with `mode` (an existing file is not replaced:
/// keys are not overwritten by mistake).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|cause| PkiError::Write {
            path: path.to_owned(),
            cause,
        })
}

/// Makes a CA, a destination certificate for `server_names` and a source certificate, and
/// writes them into `dir` (which must exist) as ca.pem, server.pem, server-key.pem,
/// client.pem and client-key.pem; keys mode 0600.
pub fn write_set(dir: &Path, server_names: &[String]) -> Result<PkiFiles, PkiError> {
    let ca = Authority::new("dmalog migration CA")?;
    let server = ca.server(server_names)?;
    let client = ca.client("dmalog source")?;
    let files = PkiFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    write_new(&files.ca, &ca.cert_pem, 0o644)?;
    write_new(&files.server_cert, &server.cert_pem, 0o644)?;
    write_new(&files.server_key, &server.key_pem, 0o600)?;
    write_new(&files.client_cert, &client.cert_pem, 0o644)?;
    write_new(&files.client_key, &client.key_pem, 0o600)?;
    Ok(files)
}

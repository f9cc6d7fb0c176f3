//! A development certificate authority for standalone ztunnels with no control plane.
//!
//! It signs CSRs exactly as the mesh CA does (CSR in, PEM chain out), so the certificate manager
//! cannot tell the difference. Its root key sits in a local directory: fine for trying the mesh
//! on one machine, not for production.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::certs::{CertSource, SignFuture};
use crate::identity::SpiffeId;
use crate::tls::TrustRoots;

const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are back-dated a little so small clock differences between nodes do not matter.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("reading development CA from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing development CA to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("development CA in {path} is unusable: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("CSR rejected: {0}")]
    Csr(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A development CA: one self-signed root that signs workload certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// What follows the leaf in every chain handed out: intermediates, then the root.
    chain: Vec<String>,
    root_pem: String,
    roots: TrustRoots,
}

/// Files of an operator-provided CA (the layout Istio calls "plugged-in certs").
pub const PLUGGED_CA_CERT: &str = "ca-cert.pem";
pub const PLUGGED_CA_KEY: &str = "ca-key.pem";
pub const PLUGGED_ROOT_CERT: &str = "root-cert.pem";
pub const PLUGGED_CERT_CHAIN: &str = "cert-chain.pem";

impl DevCa {
    /// A fresh CA held only in memory (tests).
    pub fn generate() -> Result<Self, DevCaError> {
        let key = KeyPair::generate()?;
        let params = root_params()?;
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.pem(), key, Path::new("<memory>"))
    }

    /// Loads the CA from `dir`, creating it first if the directory does not exist. Creation is
    /// atomic, so ztunnels started together on one machine all end up with the same root.
    pub fn load_or_create(dir: &Path) -> Result<Self, DevCaError> {
        if !dir.join(ROOT_CERT_FILE).exists() {
            Self::create(dir)?;
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| DevCaError::Read { path, source })
        };
        let cert_pem = read(ROOT_CERT_FILE)?;
        let key_pem = read(ROOT_KEY_FILE)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| DevCaError::Invalid {
            path: dir.join(ROOT_KEY_FILE),
            reason: e.to_string(),
        })?;
        Self::from_parts(cert_pem, key, dir)
    }

    /// Loads an operator-provided signing CA from `dir`: `ca-cert.pem` and `ca-key.pem` (the
    /// signing certificate, often an intermediate), `root-cert.pem` (the mesh root) and,
    /// optionally, `cert-chain.pem` (from the signing certificate up to the root). Without a
    /// chain file the chain is the signing certificate followed by the root.
    pub fn load_plugged(dir: &Path) -> Result<Self, DevCaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| DevCaError::Read { path, source })
        };
        let invalid = |name: &str, reason: String| DevCaError::Invalid {
            path: dir.join(name),
            reason,
        };
        let ca_pem = read(PLUGGED_CA_CERT)?;
        let key = KeyPair::from_pem(&read(PLUGGED_CA_KEY)?)
            .map_err(|e| invalid(PLUGGED_CA_KEY, e.to_string()))?;
        let root_pem = read(PLUGGED_ROOT_CERT)?;
        let roots = TrustRoots::from_pem(&root_pem)
            .map_err(|e| invalid(PLUGGED_ROOT_CERT, e.to_string()))?;
        let chain_pem = match std::fs::read_to_string(dir.join(PLUGGED_CERT_CHAIN)) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("{ca_pem}{root_pem}"),
            Err(source) => {
                return Err(DevCaError::Read {
                    path: dir.join(PLUGGED_CERT_CHAIN),
                    source,
                });
            }
        };
        let chain = split_pem(&chain_pem);
        if chain.is_empty() {
            return Err(invalid(PLUGGED_CERT_CHAIN, "holds no certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| invalid(PLUGGED_CA_CERT, e.to_string()))?;
        Ok(Self {
            issuer,
            chain,
            root_pem,
            roots,
        })
    }

    fn create(dir: &Path) -> Result<(), DevCaError> {
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DevCaError::Write { path, source }
        };
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("ca"),
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
        let key = KeyPair::generate()?;
        let cert = root_params()?.self_signed(&key)?;
        std::fs::write(tmp.join(ROOT_CERT_FILE), cert.pem()).map_err(write_err(&tmp))?;
        write_private(&tmp.join(ROOT_KEY_FILE), &key.serialize_pem()).map_err(write_err(&tmp))?;
        // rename(2) of a directory fails if the target exists and is not empty: the first
        // process to get here wins and everyone else loads its root.
        if std::fs::rename(&tmp, dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join(ROOT_CERT_FILE).exists() {
                return Err(DevCaError::Invalid {
                    path: dir.to_owned(),
                    reason: format!("directory exists but holds no {ROOT_CERT_FILE}"),
                });
            }
        }
        Ok(())
    }

    fn from_parts(root_pem: String, key: KeyPair, path: &Path) -> Result<Self, DevCaError> {
        let invalid = |reason: String| DevCaError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let roots = TrustRoots::from_pem(&root_pem).map_err(|e| invalid(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            issuer,
            chain: vec![root_pem.clone()],
            root_pem,
            roots,
        })
    }

    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    /// Signs `csr_pem` for `identity`. The CSR must ask for exactly that identity.
    pub fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, DevCaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| DevCaError::Csr(e.to_string()))?;
        let want = identity.to_string();
        match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] if uri.as_str() == want => {}
            other => {
                return Err(DevCaError::Csr(format!(
                    "the CSR must carry exactly one URI SAN {want}, it carries {other:?}"
                )));
            }
        }
        let now = SystemTime::now();
        let p = &mut csr.params;
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + ttl).into();
        p.is_ca = IsCa::ExplicitNoCa;
        p.distinguished_name = DistinguishedName::new();
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(fastrand::u64(1..).into());
        p.use_authority_key_identifier_extension = true;
        let cert = csr.signed_by(&self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.pem());
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// Issues a TLS server certificate for `dns_names` (the control plane's own serving
    /// certificate). Returns the PEM chain and the PEM private key.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ttl: Duration,
    ) -> Result<(Vec<String>, String), DevCaError> {
        let key = KeyPair::generate()?;
        let mut p =
            CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let now = SystemTime::now();
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + ttl).into();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(fastrand::u64(1..).into());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }

    /// The root certificate(s), PEM, as clients should trust them.
    pub fn roots_pem(&self) -> String {
        self.root_pem.clone()
    }
}

impl CertSource for DevCa {
    fn sign(&self, identity: &SpiffeId, csr_pem: String, ttl: Duration) -> SignFuture {
        let result = DevCa::sign(self, identity, &csr_pem, ttl).map_err(|e| e.to_string());
        Box::pin(async move { result })
    }
}

impl CertSource for Arc<DevCa> {
    fn sign(&self, identity: &SpiffeId, csr_pem: String, ttl: Duration) -> SignFuture {
        CertSource::sign(self.as_ref(), identity, csr_pem, ttl)
    }
}

fn root_params() -> Result<CertificateParams, DevCaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ambient mesh development CA");
    // A unique name per root, so a peer from another root fails as "unknown issuer".
    dn.push(
        DnType::CommonName,
        format!("dev-root-{:016x}", fastrand::u64(..)),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(fastrand::u64(1..).into());
    Ok(params)
}

/// Splits a PEM bundle into one PEM string per certificate.
fn split_pem(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            break;
        };
        let stop = start + end + END.len();
        out.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    out
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{WorkloadCert, identity_from_cert, parse_pem_certs};

    /// An operator's CA: a root, and an intermediate that signs. Certificates come back as
    /// leaf, intermediate, root, and two of them complete an mTLS handshake trusting the root
    /// alone.
    #[tokio::test]
    async fn an_operator_provided_intermediate_signs_and_chains_to_its_root() {
        let dir = std::env::temp_dir().join(format!("plugged-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let root_key = KeyPair::generate().unwrap();
        let root = root_params().unwrap().self_signed(&root_key).unwrap();
        let root_issuer = Issuer::from_ca_cert_pem(&root.pem(), root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = root_params().unwrap();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
        std::fs::write(dir.join(PLUGGED_CA_CERT), int.pem()).unwrap();
        std::fs::write(dir.join(PLUGGED_CA_KEY), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.join(PLUGGED_ROOT_CERT), root.pem()).unwrap();
        std::fs::write(
            dir.join(PLUGGED_CERT_CHAIN),
            format!("{}{}", int.pem(), root.pem()),
        )
        .unwrap();

        let ca = DevCa::load_plugged(&dir).unwrap();
        assert_eq!(ca.roots_pem(), root.pem());
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let (key, csr) = crate::certs::new_key_and_csr(&id).unwrap();
        let chain = ca.sign(&id, &csr, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(chain[1].trim(), int.pem().trim());
        assert_eq!(chain[2].trim(), root.pem().trim());
        let leaf = parse_pem_certs(&chain[0]).unwrap();
        assert_eq!(identity_from_cert(&leaf[0]).unwrap(), id);
        let roots = TrustRoots::from_pem(&root.pem()).unwrap();
        let workload = |id: &SpiffeId, key, chain: &[String]| {
            let mut certs = parse_pem_certs(&chain[0]).unwrap();
            certs.extend(parse_pem_certs(&chain[1]).unwrap());
            WorkloadCert::new(id.clone(), key, certs, roots.clone()).unwrap()
        };
        let server = workload(&id, key, &chain);
        let client_id = SpiffeId::new("cluster.local", "ns", "client").unwrap();
        let (ckey, ccsr) = crate::certs::new_key_and_csr(&client_id).unwrap();
        let client = workload(
            &client_id,
            ckey,
            &ca.sign(&client_id, &ccsr, Duration::from_secs(3600))
                .unwrap(),
        );
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let connector =
            tokio_rustls::TlsConnector::from(client.client_config(vec![id.clone()]).unwrap());
        let (s, c) = tokio::join!(
            acceptor.accept(a),
            connector.connect(crate::tls::placeholder_server_name(), b)
        );
        s.expect("the server accepts the client's chain");
        c.expect("the client accepts the server's chain");

        // Without a chain file, the chain is the signing certificate then the root.
        std::fs::remove_file(dir.join(PLUGGED_CERT_CHAIN)).unwrap();
        assert_eq!(DevCa::load_plugged(&dir).unwrap().chain.len(), 2);
        // A missing key is an error naming the file.
        std::fs::remove_file(dir.join(PLUGGED_CA_KEY)).unwrap();
        let e = DevCa::load_plugged(&dir).err().unwrap().to_string();
        assert!(e.contains(PLUGGED_CA_KEY), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! mTLS for HBONE: TLS 1.3 only, ALPN `h2`, client certificates required, peers checked
//! against the mesh roots and against the SPIFFE identity the destination is expected to run as.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};

use crate::crypto;
use crate::identity::SpiffeId;

/// ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// HBONE sends no SNI; rustls still wants a name to hand to the verifier, which ignores it.
const PLACEHOLDER_SERVER_NAME: &str = "hbone.mesh.invalid";

/// Why a certificate or TLS config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in the PEM chain")]
    EmptyChain,
    #[error("invalid PEM certificate chain: {0}")]
    Pem(String),
    #[error("invalid private key: {0}")]
    Key(String),
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("certificate carries no URI SAN; mesh certificates carry exactly one spiffe:// URI")]
    NoUriSan,
    #[error("certificate carries {0} URI SANs; mesh certificates carry exactly one")]
    ManyUriSans(usize),
    #[error("certificate URI SAN is not a workload identity: {0}")]
    BadIdentity(#[from] crate::identity::IdentityError),
    #[error("certificate is for {got}, but {wanted} was requested")]
    WrongIdentity { wanted: SpiffeId, got: SpiffeId },
    #[error("root certificate rejected: {0}")]
    Root(String),
    #[error("building TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// Raised inside the TLS handshake when the peer's certificate is valid but names an identity
/// other than the one the destination is expected to run as.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub expected: Vec<SpiffeId>,
    pub got: SpiffeId,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer presented identity {} but expected ", self.got)?;
        for (i, id) in self.expected.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

impl std::error::Error for IdentityMismatch {}

/// The trust roots of the mesh.
#[derive(Clone)]
pub struct TrustRoots {
    anchors: Arc<[TrustAnchor<'static>]>,
    ders: Arc<[CertificateDer<'static>]>,
}

impl TrustRoots {
    pub fn from_ders(ders: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        if ders.is_empty() {
            return Err(TlsError::Root("no root certificates given".into()));
        }
        let anchors = ders
            .iter()
            .map(|d| {
                webpki::anchor_from_trusted_cert(d)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Root(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors: anchors.into(),
            ders: ders.into(),
        })
    }

    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        Self::from_ders(parse_pem_certs(pem)?)
    }

    pub fn ders(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.anchors.to_vec(),
        }
    }
}

impl fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustRoots({} roots)", self.anchors.len())
    }
}

/// A workload's certificate, key and trust roots, ready to serve or originate HBONE.
pub struct WorkloadCert {
    identity: SpiffeId,
    key: Arc<CertifiedKey>,
    roots: TrustRoots,
    not_before: SystemTime,
    not_after: SystemTime,
    server_config: OnceLock<Arc<ServerConfig>>,
}

impl WorkloadCert {
    /// Assembles a certificate from a CA response: `chain` is leaf first, roots last (the last
    /// certificate is taken as the trust root). Checks that the leaf carries `identity`.
    /// Only for a CA trusted to name the mesh roots (the development CA); a remote CA's chain
    /// goes through [`WorkloadCert::new`] with the configured roots, so a CA response cannot
    /// change what the proxy trusts.
    pub fn from_chain(
        identity: SpiffeId,
        key: PrivateKeyDer<'static>,
        chain_pem: &[String],
    ) -> Result<Self, TlsError> {
        let mut certs = Vec::new();
        for pem in chain_pem {
            certs.extend(parse_pem_certs(pem)?);
        }
        let Some(root) = certs.pop() else {
            return Err(TlsError::EmptyChain);
        };
        if certs.is_empty() {
            return Err(TlsError::Pem(
                "the chain holds only one certificate; expected the leaf followed by its root"
                    .into(),
            ));
        }
        let roots = TrustRoots::from_ders(vec![root])?;
        Self::new(identity, key, certs, roots)
    }

    /// `chain` is the leaf followed by any intermediates (not the root).
    pub fn new(
        identity: SpiffeId,
        key: PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        roots: TrustRoots,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let got = identity_from_cert(leaf)?;
        if got != identity {
            return Err(TlsError::WrongIdentity {
                wanted: identity,
                got,
            });
        }
        let (not_before, not_after) = validity(leaf)?;
        let signing_key = crypto::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        Ok(Self {
            identity,
            key: Arc::new(CertifiedKey::new(chain, signing_key)),
            roots,
            not_before,
            not_after,
            server_config: OnceLock::new(),
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// When to fetch a replacement: half-way through the certificate's life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    /// Leaf certificate in DER.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.key.cert[0]
    }

    /// Server side of HBONE for this workload: requires a client certificate chaining to the
    /// mesh roots from the same trust domain. Built once per certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self.server_config.get() {
            return Ok(c.clone());
        }
        let provider = crypto::provider();
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots.root_store()),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Root(e.to_string()))?;
        let verifier = Arc::new(SameTrustDomain {
            inner,
            trust_domain: self.identity.trust_domain().to_owned(),
        });
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(FixedCert(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        let cfg = Arc::new(cfg);
        Ok(self.server_config.get_or_init(|| cfg).clone())
    }

    /// Client side of HBONE from this workload to a peer that must present one of `expected`.
    pub fn client_config(&self, expected: Vec<SpiffeId>) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = crypto::provider();
        let verifier = Arc::new(ExpectedIdentity {
            roots: self.roots.anchors.clone(),
            expected,
            provider: provider.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(FixedCert(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.resumption = Resumption::disabled();
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Describes a failed TLS handshake in words an operator can act on: the identity mismatch or
/// certificate problem rather than rustls' debug formatting.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match inner {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            format!("invalid peer certificate: {other}")
        }
        rustls::Error::InvalidCertificate(ce) => {
            format!("invalid peer certificate: {ce:?}")
        }
        other => other.to_string(),
    }
}

/// The name handed to rustls for a client connection (no SNI is sent).
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::try_from(PLACEHOLDER_SERVER_NAME).expect("the placeholder is a valid DNS name")
}

/// The SPIFFE identity a certificate carries in its single URI SAN.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?
        .ok_or(TlsError::NoUriSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next().ok_or(TlsError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(TlsError::ManyUriSans(extra + 1));
    }
    Ok(first.parse()?)
}

/// The identity of the peer on an established TLS connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, TlsError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(TlsError::EmptyChain)?;
    identity_from_cert(leaf)
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::X509(e.to_string()))?;
    let to_time = |t: ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let v = cert.validity();
    Ok((to_time(v.not_before), to_time(v.not_after)))
}

pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    Ok(certs)
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Client-side check of the server: chain to the mesh roots, then the expected identity.
#[derive(Debug)]
struct ExpectedIdentity {
    roots: Arc<[TrustAnchor<'static>]>,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectedIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let got = identity_from_cert(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        if self.expected.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.clone(),
                    got,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not spoken on HBONE".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server-side check of the client: the standard chain check, plus a SPIFFE identity in the
/// server's own trust domain. Which identities may connect is left to authorization.
#[derive(Debug)]
struct SameTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_from_cert(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::CertExpired { .. } => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

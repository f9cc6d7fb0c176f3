//! Workload certificates from istiod-lite: `IstioCertificateService/CreateCertificate` with a
//! CSR for the identity of a pod on this node (`ImpersonatedIdentity`) and ztunnel's token.

use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::certs::{CertSource, SignFuture};
use mesh_core::tls::TrustRoots;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::config::{Config, ControlPlaneAddr};
use crate::grpc::{self, GrpcError, Token};

/// The metadata key naming the identity a node proxy asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Why the CA gave no usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("istiod-lite refused to sign for {identity}: {message}")]
    Refused { identity: SpiffeId, message: String },
    #[error(
        "istiod-lite did not accept our credentials when asked to sign for {identity}: {message} (is the token file current?)"
    )]
    Unauthenticated { identity: SpiffeId, message: String },
    #[error("cannot reach the CA at {addr}: {message}")]
    Unreachable {
        addr: ControlPlaneAddr,
        message: String,
    },
    #[error("the CA at {addr} failed to sign for {identity}: {code:?}: {message}")]
    Failed {
        addr: ControlPlaneAddr,
        identity: SpiffeId,
        code: tonic::Code,
        message: String,
    },
    #[error("the CA returned an unusable certificate chain for {identity}: {reason}")]
    BadChain { identity: SpiffeId, reason: String },
    #[error("the CA returned a certificate for {got}, but {wanted} was requested")]
    WrongIdentity { wanted: SpiffeId, got: String },
    #[error(transparent)]
    Grpc(#[from] GrpcError),
}

/// A [`CertSource`] backed by istiod-lite's CA.
#[derive(Clone)]
pub struct CaClient {
    addr: ControlPlaneAddr,
    channel: Channel,
    token: Token,
    cluster_id: Option<AsciiMetadataValue>,
    /// The mesh roots from `--xds-root-cert`: what certificates trust, whatever the CA sends.
    roots: Option<TrustRoots>,
}

impl CaClient {
    /// A client for the CA at `addr`, with the roots, token and socket mark of `cfg`.
    pub fn new(cfg: &Config, addr: &ControlPlaneAddr) -> Result<Self, GrpcError> {
        Self::with_parts(
            addr,
            cfg.xds_root_cert.as_deref(),
            cfg.token_file.clone(),
            &cfg.cluster_id,
            cfg.socket_mark,
        )
    }

    /// A client for the CA at `addr` trusting the PEM roots at `root_cert` (for `https://`),
    /// sending the token in `token_file` and `cluster_id`, its sockets marked with `mark`.
    pub fn with_parts(
        addr: &ControlPlaneAddr,
        root_cert: Option<&std::path::Path>,
        token_file: Option<std::path::PathBuf>,
        cluster_id: &str,
        mark: Option<u32>,
    ) -> Result<Self, GrpcError> {
        let channel = grpc::channel_from_config(addr, root_cert, mark)?;
        let roots = match root_cert {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|source| GrpcError::ReadRoots {
                    path: path.to_owned(),
                    source,
                })?;
                Some(TrustRoots::from_pem(&pem).map_err(|e| GrpcError::BadRoots {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?)
            }
        };
        Ok(Self {
            addr: addr.clone(),
            channel,
            token: Token::new(token_file),
            cluster_id: AsciiMetadataValue::try_from(cluster_id).ok(),
            roots,
        })
    }

    /// Asks the CA to sign `csr_pem` for `identity`; returns the PEM chain, leaf first, after
    /// checking the leaf carries `identity`.
    pub async fn create_certificate(
        &self,
        identity: &SpiffeId,
        csr_pem: String,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        use prost_types::value::Kind;
        let metadata = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        };
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        self.token.add_to(request.metadata_mut())?;
        if let Some(c) = &self.cluster_id {
            request.metadata_mut().insert("clusterid", c.clone());
        }
        let mut client = IstioCertificateServiceClient::new(self.channel.clone());
        let chain = client
            .create_certificate(request)
            .await
            .map_err(|s| self.map_status(identity, s))?
            .into_inner()
            .cert_chain;
        check_leaf(identity, &chain)?;
        Ok(chain)
    }

    fn map_status(&self, identity: &SpiffeId, s: tonic::Status) -> CaError {
        let message = grpc::status_detail(&s);
        let identity = identity.clone();
        match s.code() {
            tonic::Code::PermissionDenied => CaError::Refused { identity, message },
            tonic::Code::Unauthenticated => CaError::Unauthenticated { identity, message },
            tonic::Code::Unavailable => CaError::Unreachable {
                addr: self.addr.clone(),
                message,
            },
            code => CaError::Failed {
                addr: self.addr.clone(),
                identity,
                code,
                message,
            },
        }
    }
}

impl CertSource for CaClient {
    fn trust_roots(&self) -> Option<TrustRoots> {
        self.roots.clone()
    }

    fn sign(&self, identity: &SpiffeId, csr_pem: String, ttl: Duration) -> SignFuture {
        let this = self.clone();
        let identity = identity.clone();
        Box::pin(async move {
            this.create_certificate(&identity, csr_pem, ttl)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The chain must hold a leaf for `identity` and something to anchor it.
fn check_leaf(identity: &SpiffeId, chain: &[String]) -> Result<(), CaError> {
    let bad = |reason: String| CaError::BadChain {
        identity: identity.clone(),
        reason,
    };
    let mut certs = Vec::new();
    for pem in chain {
        certs.extend(mesh_core::tls::parse_pem_certs(pem).map_err(|e| bad(e.to_string()))?);
    }
    let Some(leaf) = certs.first() else {
        return Err(bad("the chain is empty".into()));
    };
    if certs.len() < 2 {
        return Err(bad(
            "the chain holds only the leaf; expected the leaf followed by the mesh root".into(),
        ));
    }
    let got = mesh_core::tls::identity_from_cert(leaf).map_err(|e| bad(e.to_string()))?;
    if &got != identity {
        return Err(CaError::WrongIdentity {
            wanted: identity.clone(),
            got: got.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::certs::new_key_and_csr;
    use mesh_core::devca::DevCa;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn the_leaf_must_carry_the_identity_asked_for() {
        let ca = DevCa::generate().unwrap();
        let (_, csr) = new_key_and_csr(&id("a")).unwrap();
        let chain = ca.sign(&id("a"), &csr, Duration::from_secs(60)).unwrap();
        check_leaf(&id("a"), &chain).unwrap();
        let e = check_leaf(&id("b"), &chain).unwrap_err().to_string();
        assert_eq!(
            e,
            "the CA returned a certificate for spiffe://cluster.local/ns/default/sa/a, but spiffe://cluster.local/ns/default/sa/b was requested"
        );
        let e = check_leaf(&id("a"), &chain[..1]).unwrap_err().to_string();
        assert!(e.contains("only the leaf"), "{e}");
        let e = check_leaf(&id("a"), &[]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}

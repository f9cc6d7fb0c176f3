//! The mesh CA: `IstioCertificateService/CreateCertificate`. Keys never come here: the
//! requester sends a CSR and gets a chain back.
//!
//! Every request is authenticated (node bootstrap token, or a Kubernetes service-account
//! token) and authorized: a node proxy may obtain certificates only for identities of pods
//! scheduled on its own node; a pod only for its own identity.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::devca::DevCa;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{self, Authenticator, Requester};
use crate::metrics::{CaRefusal, CaRefusalLabels, Metrics};
use crate::model::Object;
use crate::store::Store;

/// Lifetime of a certificate when the request does not say.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest lifetime granted, whatever is asked.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest: anything less would have proxies rotating constantly.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Metadata key a node proxy sets when asking on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Service accounts allowed to ask for other pods' identities on their own node (node proxies
/// deployed on Kubernetes), as `namespace/name`.
pub const DEFAULT_NODE_PROXY_ACCOUNTS: [&str; 1] = ["istio-system/ztunnel"];

pub struct CaService {
    ca: Arc<DevCa>,
    store: Store,
    authenticator: Arc<dyn Authenticator>,
    metrics: Arc<Metrics>,
    trust_domain: String,
    node_proxy_accounts: Vec<String>,
}

impl CaService {
    pub fn new(
        ca: Arc<DevCa>,
        store: Store,
        authenticator: Arc<dyn Authenticator>,
        metrics: Arc<Metrics>,
        trust_domain: String,
    ) -> Self {
        Self {
            ca,
            store,
            authenticator,
            metrics,
            trust_domain,
            node_proxy_accounts: DEFAULT_NODE_PROXY_ACCOUNTS.map(str::to_owned).to_vec(),
        }
    }

    fn refuse(&self, reason: CaRefusal, status: Status) -> Status {
        self.metrics
            .ca_refusals
            .get_or_create(&CaRefusalLabels { reason })
            .inc();
        status
    }

    /// Whether `who` may hold `id`; the error says why not.
    fn authorize(&self, who: &Requester, id: &SpiffeId) -> Result<(), String> {
        if id.trust_domain() != self.trust_domain {
            return Err(format!(
                "{id} is not in this mesh's trust domain {}",
                self.trust_domain
            ));
        }
        let node = match who {
            Requester::Node(node) => node.clone(),
            Requester::Pod {
                namespace,
                name,
                service_account,
            } => {
                if namespace == id.namespace() && service_account == id.service_account() {
                    return Ok(()); // Its own identity.
                }
                if !self
                    .node_proxy_accounts
                    .contains(&format!("{namespace}/{service_account}"))
                {
                    return Err(format!("{who} may only obtain its own identity"));
                }
                self.node_of(namespace, name)
                    .ok_or_else(|| format!("{who} is not known to be running on any node"))?
            }
            Requester::ServiceAccount {
                namespace,
                service_account,
            } => {
                if namespace == id.namespace() && service_account == id.service_account() {
                    return Ok(());
                }
                return Err(format!("{who} may only obtain its own identity"));
            }
        };
        if self.identity_runs_on(id, &node) {
            Ok(())
        } else {
            Err(format!(
                "no pod running as {id} is scheduled on node {node}"
            ))
        }
    }

    fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
        let key = crate::model::ObjectKey {
            kind: crate::model::Kind::Pod,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.store
            .read(|state| match state.objects.get(&key).map(|o| &**o) {
                Some(Object::Pod(p)) => Some(p.spec.node_name.clone()),
                _ => None,
            })
            .filter(|n| !n.is_empty())
    }

    fn identity_runs_on(&self, id: &SpiffeId, node: &str) -> bool {
        self.store.read(|state| {
            // Pods sort by namespace within their kind: scan only the identity's namespace.
            let from = crate::model::ObjectKey {
                kind: crate::model::Kind::Pod,
                namespace: id.namespace().to_owned(),
                name: String::new(),
            };
            state
                .objects
                .range(from..)
                .take_while(|(k, _)| {
                    k.kind == crate::model::Kind::Pod && k.namespace == id.namespace()
                })
                .any(|(_, o)| match &**o {
                    Object::Pod(p) => {
                        p.spec.node_name == node
                            && p.service_account() == id.service_account()
                            && !matches!(p.status.phase.as_str(), "Succeeded" | "Failed")
                    }
                    _ => false,
                })
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = auth::bearer(request.metadata()).map_err(|e| {
            self.refuse(
                CaRefusal::unauthenticated,
                Status::unauthenticated(e.to_string()),
            )
        })?;
        let who = self.authenticator.authenticate(token).await.map_err(|e| {
            let status = match e {
                auth::AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            };
            self.refuse(CaRefusal::unauthenticated, status)
        })?;
        if let Some(p) = request.extensions().get::<crate::server::PeerInfo>() {
            p.mark_authenticated();
        }
        let req = request.into_inner();
        let bad = |msg: String| self.refuse(CaRefusal::bad_request, Status::invalid_argument(msg));

        let csr_id = csr_identity(&req.csr).map_err(bad)?;
        if let Some(asked) = impersonated(&req) {
            let asked: SpiffeId = asked
                .parse()
                .map_err(|e| bad(format!("{IMPERSONATED_IDENTITY}: {e}")))?;
            if asked != csr_id {
                return Err(bad(format!(
                    "the CSR is for {csr_id} but {IMPERSONATED_IDENTITY} names {asked}"
                )));
            }
        }
        if let Err(why) = self.authorize(&who, &csr_id) {
            warn!(requester = %who, identity = %csr_id, reason = %why, "certificate refused");
            return Err(self.refuse(CaRefusal::not_authorized, Status::permission_denied(why)));
        }
        let ttl = match req.validity_duration {
            s if s <= 0 => DEFAULT_TTL,
            s => Duration::from_secs(s as u64).clamp(MIN_TTL, MAX_TTL),
        };
        let chain = self.ca.sign(&csr_id, &req.csr, ttl).map_err(|e| {
            self.refuse(
                CaRefusal::sign_failed,
                Status::invalid_argument(format!("signing failed: {e}")),
            )
        })?;
        self.metrics.certs_issued.inc();
        info!(requester = %who, identity = %csr_id, ttl_s = ttl.as_secs(), "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The one SPIFFE identity a CSR asks for.
fn csr_identity(pem: &str) -> Result<SpiffeId, String> {
    if pem.len() > 64 * 1024 {
        return Err("the CSR is larger than 64 KiB".into());
    }
    let csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| format!("the CSR cannot be read: {e}"))?;
    match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => uri
            .as_str()
            .parse()
            .map_err(|e| format!("the CSR's URI SAN is not a mesh identity: {e}")),
        other => Err(format!(
            "the CSR must carry exactly one URI SAN (spiffe://…), it carries {}",
            other.len()
        )),
    }
}

fn impersonated(req: &IstioCertificateRequest) -> Option<String> {
    use prost_types::value::Kind;
    let v = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

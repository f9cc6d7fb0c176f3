//! The CA client against a scripted `IstioCertificateService`: the request it sends (CSR,
//! lifetime, impersonated identity, token), the chain check, error messages, and TLS.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::certs::{CertManager, new_key_and_csr};
use mesh_core::devca::DevCa;
use mesh_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};
use ztunnel::Config;
use ztunnel::ca_client::CaClient;
use ztunnel::config::ControlPlaneAddr;

#[derive(Clone, Copy)]
enum Mode {
    Sign,
    Deny,
    SignForSomeoneElse,
}

/// What the CA saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    clusterid: Option<String>,
    impersonated: Option<String>,
    validity: i64,
}

struct ScriptedCa {
    ca: DevCa,
    mode: Mutex<Mode>,
    seen: Mutex<Vec<Seen>>,
}

#[tonic::async_trait]
impl IstioCertificateService for ScriptedCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |k: &str| {
            request
                .metadata()
                .get(k)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let authorization = header("authorization");
        let clusterid = header("clusterid");
        let req = request.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        self.seen.lock().unwrap().push(Seen {
            authorization,
            clusterid,
            impersonated: impersonated.clone(),
            validity: req.validity_duration,
        });
        let id: SpiffeId = impersonated
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Deny => Err(Status::permission_denied(format!(
                "no pod with identity {id} runs on node node-a"
            ))),
            Mode::Sign | Mode::SignForSomeoneElse => {
                let ttl = Duration::from_secs(req.validity_duration as u64);
                let chain = if matches!(mode, Mode::Sign) {
                    self.ca.sign(&id, &req.csr, ttl).unwrap()
                } else {
                    let other = SpiffeId::new("cluster.local", "default", "other").unwrap();
                    let (_, csr) = new_key_and_csr(&other).unwrap();
                    self.ca.sign(&other, &csr, ttl).unwrap()
                };
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
        }
    }
}

async fn serve_ca() -> (SocketAddr, Arc<ScriptedCa>) {
    let ca = Arc::new(ScriptedCa {
        ca: DevCa::generate().unwrap(),
        mode: Mutex::new(Mode::Sign),
        seen: Mutex::new(vec![]),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = IstioCertificateServiceServer::from_arc(ca.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, ca)
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zt-ca-client-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(addr: &str, dir: &std::path::Path) -> Config {
    let addr: ControlPlaneAddr = addr.parse().unwrap();
    let mut cfg = Config::with_xds("node-a", addr);
    cfg.token_file = Some(dir.join("token"));
    cfg.socket_mark = None;
    cfg
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

#[tokio::test]
async fn signs_for_the_impersonated_identity_with_the_token() {
    let (addr, ca) = serve_ca().await;
    let dir = scratch();
    std::fs::write(dir.join("token"), "jwt-1\n").unwrap();
    let cfg = config(&format!("http://{addr}"), &dir);
    let client = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
    let mgr = CertManager::new(Arc::new(client), Duration::from_secs(3600));
    let cert = mgr.fetch(&id("echo")).await.unwrap();
    assert_eq!(cert.identity(), &id("echo"));
    let seen = ca.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.authorization.as_deref(), Some("Bearer jwt-1"));
    assert_eq!(seen.clusterid.as_deref(), Some("Kubernetes"));
    assert_eq!(
        seen.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/echo")
    );
    assert_eq!(seen.validity, 3600);

    // The token is read per request: a rotated one is sent, a removed one is not.
    std::fs::write(dir.join("token"), "jwt-2").unwrap();
    mgr.fetch(&id("two")).await.unwrap();
    std::fs::remove_file(dir.join("token")).unwrap();
    mgr.fetch(&id("three")).await.unwrap();
    let seen = ca.seen.lock().unwrap().clone();
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer jwt-2"));
    assert_eq!(seen[2].authorization, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn refusals_and_wrong_certificates_are_explained() {
    let (addr, ca) = serve_ca().await;
    let dir = scratch();
    let cfg = config(&format!("http://{addr}"), &dir);
    let client = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
    let (_, csr) = new_key_and_csr(&id("echo")).unwrap();
    let ttl = Duration::from_secs(60);

    *ca.mode.lock().unwrap() = Mode::Deny;
    let e = client
        .create_certificate(&id("echo"), csr.clone(), ttl)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "istiod-lite refused to sign for spiffe://cluster.local/ns/default/sa/echo: no pod with identity spiffe://cluster.local/ns/default/sa/echo runs on node node-a"
    );

    *ca.mode.lock().unwrap() = Mode::SignForSomeoneElse;
    let e = client
        .create_certificate(&id("echo"), csr.clone(), ttl)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "the CA returned a certificate for spiffe://cluster.local/ns/default/sa/other, but spiffe://cluster.local/ns/default/sa/echo was requested"
    );

    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let cfg = config(&format!("http://{closed_addr}"), &dir);
    let client = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
    let e = client
        .create_certificate(&id("echo"), csr, ttl)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot reach the CA at http://{closed_addr}")),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// istiod-lite's serving certificate: DNS SAN istiod.istio-system.svc, from its own root.
fn istiod_cert() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = CertifiedIssuer::self_signed(root, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])
        .unwrap()
        .signed_by(&key, &root)
        .unwrap();
    (
        root.pem(),
        leaf.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Terminates TLS (ALPN h2) in front of a plaintext server.
async fn tls_front(
    backend: SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> SocketAddr {
    let mut cfg = rustls::ServerConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut up = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_verifies_istiod_against_the_configured_roots() {
    let (backend, _ca) = serve_ca().await;
    let (root_pem, cert, key) = istiod_cert();
    let front = tls_front(backend, cert, key).await;
    let dir = scratch();
    std::fs::write(dir.join("roots.pem"), &root_pem).unwrap();
    let mut cfg = config(&format!("https://127.0.0.1:{}", front.port()), &dir);
    cfg.xds_root_cert = Some(dir.join("roots.pem"));
    let client = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
    let (_, csr) = new_key_and_csr(&id("echo")).unwrap();
    client
        .create_certificate(&id("echo"), csr.clone(), Duration::from_secs(60))
        .await
        .unwrap();

    // Roots istiod-lite's certificate does not chain to: refused, and said why.
    let (other_root, _, _) = istiod_cert();
    std::fs::write(dir.join("other.pem"), &other_root).unwrap();
    cfg.xds_root_cert = Some(dir.join("other.pem"));
    let client = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
    let e = client
        .create_certificate(&id("echo"), csr, Duration::from_secs(60))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot reach the CA"), "{e}");
    assert!(e.contains("istiod.istio-system.svc"), "{e}");
    assert!(e.contains("invalid peer certificate"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

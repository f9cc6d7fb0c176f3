//! The gRPC listeners: xDS and the CA on one HTTP/2 server, plaintext on 15010 (local use) and
//! TLS on 15012. Requests are routed by path to the generated tonic services; tonic's own
//! transport is not used, so the listeners, TLS and limits are ours.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::devca::DevCa;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::codegen::Service;
use tracing::{debug, info, warn};

use crate::ca::CaService;
use crate::xds::AdsService;

/// Where a request came from; put in each request's extensions for the services.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// Arrived over TLS (15012): callers must authenticate.
    pub secure: bool,
    /// Set by a service once a caller on this connection authenticated.
    pub authenticated: Arc<std::sync::atomic::AtomicBool>,
}

impl PeerInfo {
    pub fn mark_authenticated(&self) {
        self.authenticated
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TLS connection that has not authenticated a caller by then is closed, so idle
/// connections cannot hold the listener's slots.
pub const AUTHENTICATION_DEADLINE: Duration = Duration::from_secs(30);

/// Names on istiod-lite's serving certificate: the Kubernetes service name proxies dial.
pub const SERVING_NAMES: [&str; 3] = [
    "istiod.istio-system.svc",
    "istiod-lite.istio-system.svc",
    "localhost",
];
/// Serving certificate lifetime; it is re-issued at half of it.
const SERVING_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest xDS request accepted.
pub const MAX_REQUEST_BYTES: usize = 96 << 20;
/// Concurrent connections per listener; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Concurrent connections from one address, so one peer cannot take every slot.
const MAX_CONNECTIONS_PER_IP: usize = 256;
/// Concurrent streams per connection: a proxy needs one xDS stream and a few CA calls.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// The gRPC services, cheap to clone per request.
#[derive(Clone)]
pub struct Services {
    pub ads: AggregatedDiscoveryServiceServer<AdsService>,
    pub ca: Option<IstioCertificateServiceServer<CaService>>,
}

impl Services {
    pub fn new(ads: AdsService, ca: Option<CaService>) -> Self {
        Self {
            // Large pushes are split by the server. A reconnecting proxy's first request lists
            // every resource it holds (about 70 bytes each): room for a million.
            ads: AggregatedDiscoveryServiceServer::new(ads)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(64 << 20),
            ca: ca.map(IstioCertificateServiceServer::new),
        }
    }
}

/// Accepts connections until the task is dropped; dropping it closes every connection.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    services: Services,
    auth_deadline: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut conns = JoinSet::new();
    let per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Default::default();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            debug!(%addr, "connection limit reached; closing");
            continue;
        }
        let Some(slot) = IpSlot::take(&per_ip, addr.ip()) else {
            debug!(%addr, "per-address connection limit reached; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let services = services.clone();
        let acceptor = acceptor.clone();
        conns.spawn(async move {
            let _slot = slot;
            let peer = PeerInfo {
                addr,
                secure: acceptor.is_some(),
                authenticated: Default::default(),
            };
            match acceptor {
                None => serve_conn(TokioIo::new(tcp), peer, services, auth_deadline).await,
                Some(a) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        serve_conn(TokioIo::new(tls), peer, services, auth_deadline).await
                    }
                    Ok(Err(e)) => debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%addr, "TLS handshake timed out"),
                },
            }
        });
    }
}

async fn serve_conn<I>(io: I, peer: PeerInfo, services: Services, auth_deadline: Duration)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let must_authenticate = peer.secure;
    let authenticated = peer.authenticated.clone();
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let services = services.clone();
        async move {
            let path = req.uri().path();
            if path.starts_with("/envoy.service.discovery.v3.AggregatedDiscoveryService/") {
                let mut ads = services.ads;
                ads.call(req).await
            } else if path.starts_with("/istio.v1.auth.IstioCertificateService/")
                && let Some(mut ca) = services.ca
            {
                ca.call(req).await
            } else {
                Ok(tonic::Status::unimplemented(format!("no service at {path}")).into_http())
            }
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = &mut conn => r,
        _ = tokio::time::sleep(auth_deadline), if must_authenticate => {
            if authenticated.load(std::sync::atomic::Ordering::Relaxed) {
                conn.await
            } else {
                // Dropped, not drained: it may not even have sent the HTTP/2 preface.
                debug!(peer = %addr, "no authenticated caller within the deadline; closing");
                return;
            }
        }
    };
    if let Err(e) = result {
        debug!(peer = %addr, error = %e, "gRPC connection ended");
    }
}

/// One connection's place in the per-address count; released when dropped.
struct IpSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut c = counts.lock().expect("connection count lock poisoned");
        let n = c.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("connection count lock poisoned");
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// A serving certificate that is re-issued before it expires.
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ServingCert {
    pub fn issue(ca: &DevCa) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(ca)?),
        }))
    }

    /// Re-issues at half-life, forever.
    pub async fn rotate(self: Arc<Self>, ca: Arc<DevCa>) {
        loop {
            tokio::time::sleep(SERVING_TTL / 2).await;
            match certified_key(&ca) {
                Ok(k) => {
                    *self.current.write().expect("serving cert lock poisoned") = k;
                    info!("serving certificate re-issued");
                }
                Err(e) => {
                    warn!(error = %e, "re-issuing the serving certificate failed; retrying in a minute")
                }
            }
        }
    }

    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<ServerConfig>> {
        let mut cfg = ServerConfig::builder_with_provider(mesh_core::crypto::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .expect("serving cert lock poisoned")
                .clone(),
        )
    }
}

fn certified_key(ca: &DevCa) -> anyhow::Result<Arc<CertifiedKey>> {
    let (chain, key_pem) = ca.issue_server(&SERVING_NAMES, SERVING_TTL)?;
    let root = ca.roots_pem();
    let mut certs = Vec::new();
    // The root stays out of what is sent: clients already hold it.
    for (i, pem) in chain.iter().enumerate() {
        if i > 0 && pem.trim() == root.trim() {
            continue;
        }
        certs.extend(mesh_core::tls::parse_pem_certs(pem)?);
    }
    use rustls_pki_types::pem::PemObject;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("serving key: {e}"))?;
    let signing = mesh_core::crypto::provider()
        .key_provider
        .load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

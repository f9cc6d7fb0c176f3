//! gRPC channels to istiod-lite: TCP from a marked socket, TLS verified against the configured
//! roots (for `https://`), HTTP/2 keepalives, and the bearer token on every request.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_core::hbone::Dialer;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::Service;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::{ControlPlaneAddr, XDS_SERVER_NAME};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a channel to istiod-lite cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("reading the istiod-lite roots from {path}: {source}")]
    ReadRoots { path: PathBuf, source: io::Error },
    #[error("the istiod-lite roots in {path} are unusable: {reason}")]
    BadRoots { path: PathBuf, reason: String },
    #[error("{addr} uses TLS but no roots were given to verify it (--xds-root-cert)")]
    NoRoots { addr: ControlPlaneAddr },
    #[error("reading the token from {path}: {source}")]
    ReadToken { path: PathBuf, source: io::Error },
    #[error("the token in {path} cannot be sent as a header (it must be printable ASCII)")]
    BadToken { path: PathBuf },
}

/// The bearer token, re-read for every request so a rotated token is picked up.
#[derive(Debug, Clone, Default)]
pub struct Token {
    path: Option<PathBuf>,
}

impl Token {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    /// Adds `authorization: Bearer <token>` to `md`; nothing if no file is configured or the
    /// file does not exist.
    pub fn add_to(&self, md: &mut MetadataMap) -> Result<(), GrpcError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let token = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(GrpcError::ReadToken {
                    path: path.clone(),
                    source,
                });
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Ok(());
        }
        let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| GrpcError::BadToken { path: path.clone() })?;
        md.insert("authorization", value);
        Ok(())
    }
}

/// A status's message followed by whatever its sources add (the socket or TLS error behind
/// an `Unavailable`), without tonic's generic wrappers.
pub fn status_detail(status: &tonic::Status) -> String {
    let mut detail = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if text != "transport error" && !detail.contains(&text) {
            detail = format!("{detail}: {text}");
        }
        source = e.source();
    }
    detail
}

/// A TLS client config trusting the roots in `path`, offering ALPN `h2`.
pub fn tls_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, GrpcError> {
    let pem = std::fs::read_to_string(path).map_err(|source| GrpcError::ReadRoots {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| GrpcError::BadRoots {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in mesh_core::tls::parse_pem_certs(&pem).map_err(|e| bad(e.to_string()))? {
        roots.add(der).map_err(|e| bad(e.to_string()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A channel to `addr` that connects on first use and reconnects as needed. `tls` is required
/// for an `https://` address.
pub fn channel(
    addr: &ControlPlaneAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    mark: Option<u32>,
) -> Result<Channel, GrpcError> {
    let tls = match (addr.is_tls(), tls) {
        (true, Some(t)) => Some(t),
        (true, None) => return Err(GrpcError::NoRoots { addr: addr.clone() }),
        (false, _) => None,
    };
    let endpoint = Endpoint::from(addr.uri().clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connector = Connector {
        dialer: Dialer {
            mark,
            sockets: None,
        },
        tls,
    };
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Builds the TLS config (if `addr` needs one) and the channel.
pub fn channel_from_config(
    addr: &ControlPlaneAddr,
    roots: Option<&Path>,
    mark: Option<u32>,
) -> Result<Channel, GrpcError> {
    let tls = match (addr.is_tls(), roots) {
        (true, Some(path)) => Some(tls_config(path)?),
        _ => None,
    };
    channel(addr, tls, mark)
}

/// Opens TCP (with SO_MARK, so in-pod capture leaves ztunnel's own traffic alone) and TLS.
#[derive(Clone)]
struct Connector {
    dialer: Dialer,
    tls: Option<Arc<rustls::ClientConfig>>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TokioIo<Box<dyn Io>>>> + Send>>;

impl Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = this.connect_tcp(&host, port).await?;
            let Some(tls) = this.tls else {
                return Ok(TokioIo::new(Box::new(tcp) as Box<dyn Io>));
            };
            let name = ServerName::try_from(XDS_SERVER_NAME).expect("the server name is valid");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "TLS with istiod-lite (verified as {XDS_SERVER_NAME}): {}",
                            mesh_core::tls::describe_handshake_error(&e)
                        ),
                    )
                })?;
            Ok(TokioIo::new(Box::new(stream) as Box<dyn Io>))
        })
    }
}

impl Connector {
    async fn connect_tcp(&self, host: &str, port: u16) -> io::Result<tokio::net::TcpStream> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        );
        for a in addrs {
            match self.dialer.connect(a, None).await {
                Ok(s) => return Ok(s),
                Err(e) => last = io::Error::new(e.kind(), format!("connecting to {a}: {e}")),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_read_per_request_and_optional() {
        let dir = std::env::temp_dir().join(format!("zt-token-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let t = Token::new(Some(path.clone()));
        let mut md = MetadataMap::new();
        t.add_to(&mut md).unwrap();
        assert!(md.get("authorization").is_none(), "absent file: no header");
        std::fs::write(&path, "abc\n").unwrap();
        t.add_to(&mut md).unwrap();
        assert_eq!(md.get("authorization").unwrap(), "Bearer abc");
        std::fs::write(&path, "def").unwrap();
        t.add_to(&mut md).unwrap();
        assert_eq!(md.get("authorization").unwrap(), "Bearer def");
        std::fs::write(&path, "bad\u{1}token").unwrap();
        let e = t.add_to(&mut md).unwrap_err();
        assert!(e.to_string().contains("printable ASCII"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_roots_name_the_file() {
        let e = tls_config(Path::new("/nonexistent/roots.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/roots.pem"), "{e}");
    }
}

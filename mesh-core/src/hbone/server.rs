//! The HBONE server side: mutual TLS, then HTTP/2, then one handler call per CONNECT stream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{H2Stream, PING_INTERVAL, PING_TIMEOUT, REASON_HEADER, h2_server_builder, keepalive};
use crate::identity::SpiffeId;
use crate::tls;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client that has not finished TLS and HTTP/2 set-up by then is dropped.
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
        }
    }
}

/// A CONNECT request as the handler sees it.
pub struct Connect {
    pub request: Request<()>,
    /// The verified SPIFFE identity of the client.
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    /// The address the TLS connection arrived on.
    pub local_addr: SocketAddr,
    respond: h2::server::SendResponse<Bytes>,
    recv: h2::RecvStream,
}

impl Connect {
    /// Accepts the tunnel (200) and hands back the stream to copy over.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("a status-only response is valid");
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream {
            send,
            recv: self.recv,
        })
    }

    /// Refuses the tunnel with `status` and a short reason for the client's logs.
    pub fn refuse(mut self, status: StatusCode, reason: &str) {
        let mut response = Response::builder().status(status);
        if let Ok(v) = http::HeaderValue::from_str(reason) {
            response = response.header(REASON_HEADER, v);
        }
        let response = response.body(()).expect("a status-only response is valid");
        if let Err(e) = self.respond.send_response(response, true) {
            debug!(error = %e, "could not send refusal");
        }
    }
}

/// Why an inbound HBONE connection was dropped before any stream.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS and HTTP/2 set-up did not finish within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {}", tls::describe_handshake_error(.0))]
    Tls(std::io::Error),
    #[error("client certificate: {0}")]
    Identity(#[from] tls::TlsError),
    #[error("client did not negotiate ALPN h2")]
    NoH2,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

/// Serves one inbound HBONE connection: TLS with `tls_config`, then HTTP/2, calling `handler`
/// on its own task for each stream. When `drain` resolves the client is sent GOAWAY: streams
/// in flight finish, new ones go elsewhere. Returns when the connection ends.
pub async fn serve_connection<H, F>(
    tcp: TcpStream,
    tls_config: Arc<rustls::ServerConfig>,
    cfg: &ServerConfig,
    drain: impl Future<Output = ()>,
    handler: H,
) -> Result<(), AcceptError>
where
    H: Fn(Connect) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let peer_addr = tcp.peer_addr().map_err(AcceptError::Tls)?;
    let local_addr = tcp.local_addr().map_err(AcceptError::Tls)?;
    let _ = tcp.set_nodelay(true);
    let setup = async {
        let tls = tokio_rustls::TlsAcceptor::from(tls_config)
            .accept(tcp)
            .await
            .map_err(AcceptError::Tls)?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(AcceptError::NoH2);
        }
        let peer_identity = tls::peer_identity(session.peer_certificates())?;
        let conn = h2_server_builder().handshake::<_, Bytes>(tls).await?;
        Ok((peer_identity, conn))
    };
    let (peer_identity, mut conn) = tokio::time::timeout(cfg.handshake_timeout, setup)
        .await
        .map_err(|_| AcceptError::Timeout(cfg.handshake_timeout))??;
    debug!(%peer_addr, peer = %peer_identity, "HBONE connection accepted");
    let ping = conn.ping_pong();
    let (interval, timeout) = (cfg.ping_interval, cfg.ping_timeout);
    let unanswered = async {
        match ping {
            Some(pp) => keepalive(pp, interval, timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(unanswered);
    tokio::pin!(drain);
    let mut draining = false;
    // Stream handlers live no longer than the connection that drives their I/O: dropping the
    // set when this returns aborts any left.
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let (parts, recv) = request.into_parts();
                    let connect = Connect {
                        request: Request::from_parts(parts, ()),
                        peer_identity: peer_identity.clone(),
                        peer_addr,
                        local_addr,
                        respond,
                        recv,
                    };
                    handlers.spawn(handler(connect));
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            _ = &mut drain, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            true = &mut unanswered => {
                warn!(%peer_addr, peer = %peer_identity, "HBONE client unresponsive to PING, closing");
                return Ok(());
            }
        }
    }
}

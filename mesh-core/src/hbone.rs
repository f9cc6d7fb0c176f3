//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams inside mutual TLS.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

mod copy;
mod pool;
mod server;
mod stream_io;

pub use copy::{ByteCounters, copy_bidirectional};
pub use pool::{Dialer, Pool, PoolConfig, PoolKey, PoolStats, PooledStream, SocketMaker};
pub use server::{AcceptError, Connect, ServerConfig, serve_connection};
pub use stream_io::StreamIo;

/// Inbound HBONE port.
pub const HBONE_PORT: u16 = 15008;
/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams a client opens on one connection before opening another.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Streams a server accepts on one connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Largest request header block accepted (a CONNECT needs a few hundred bytes).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// One side of a CONNECT stream.
pub struct H2Stream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
}

/// Why an HBONE stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {addr}: {error}")]
    Connect {
        addr: std::net::SocketAddr,
        error: Arc<io::Error>,
    },
    #[error(
        "connecting to {0} timed out; is a firewall or NetworkPolicy blocking HBONE port 15008?"
    )]
    ConnectTimeout(std::net::SocketAddr),
    #[error("TLS handshake with {addr} failed: {error}")]
    Tls {
        addr: std::net::SocketAddr,
        error: String,
    },
    #[error("TLS handshake with {0} timed out")]
    TlsTimeout(std::net::SocketAddr),
    #[error("{addr} did not negotiate HTTP/2 (ALPN h2); is it an HBONE server?")]
    NoH2 { addr: std::net::SocketAddr },
    #[error("HTTP/2 with {addr}: {error}")]
    H2 {
        addr: std::net::SocketAddr,
        error: Arc<h2::Error>,
    },
    #[error("{0} did not answer the CONNECT in time")]
    StreamTimeout(std::net::SocketAddr),
    #[error("{0}")]
    Cert(#[from] crate::certs::CertError),
    #[error("{0}")]
    TlsConfig(String),
    #[error("peer refused the tunnel with status {status}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Refused {
        status: StatusCode,
        reason: Option<String>,
    },
}

/// Header a refusing HBONE server uses to say why, in a few words.
pub const REASON_HEADER: &str = "x-mesh-reason";

pub(crate) fn h2_client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    b
}

fn h2_server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    b
}

/// Is this stream error just the peer ending the stream?
fn is_graceful_reset(e: &h2::Error) -> bool {
    matches!(
        e.reason(),
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL)
    )
}

/// Sends pings every [`PING_INTERVAL`]; returns when one goes unanswered for [`PING_TIMEOUT`]
/// (the connection is dead) or the connection is gone.
async fn keepalive(mut pp: h2::PingPong, interval: Duration, timeout: Duration) -> bool {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return false,
            Err(_) => return true,
        }
    }
}

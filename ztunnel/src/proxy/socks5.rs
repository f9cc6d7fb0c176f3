//! SOCKS5 (RFC 1928, CONNECT only, no authentication) for local use and tests: the client
//! names its destination instead of being redirected.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::ProxyState;
use super::outbound::{self, OutboundError};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
/// A client has this long to say where it wants to go.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("reading SOCKS5 request: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("client offers no 'no authentication' method")]
    NoMethod,
    #[error("command {0} is not supported (only CONNECT)")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("host {0:?} is not a mesh service or an IP address")]
    UnknownHost(String),
    #[error("SOCKS5 handshake did not finish within {0:?}")]
    Timeout(Duration),
}

pub async fn serve(state: Arc<ProxyState>, mut client: TcpStream, peer: SocketAddr) {
    let dst = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&state, &mut client)).await {
        Ok(Ok(dst)) => dst,
        Ok(Err(e)) => {
            let reply = match &e {
                HandshakeError::Command(_) => Some(Reply::CommandNotSupported),
                HandshakeError::AddressType(_) => Some(Reply::AddressTypeNotSupported),
                HandshakeError::UnknownHost(_) => Some(Reply::HostUnreachable),
                _ => None,
            };
            if let Some(r) = reply {
                let _ = send_reply(&mut client, r).await;
            }
            warn!(%peer, error = %e, component = "socks5", "request refused");
            return;
        }
        Err(_) => {
            warn!(%peer, error = %HandshakeError::Timeout(HANDSHAKE_TIMEOUT), component = "socks5", "request refused");
            return;
        }
    };
    debug!(%peer, %dst, component = "socks5", "connect requested");
    match outbound::connect(&state, peer, dst).await {
        Ok(upstream) => {
            if send_reply(&mut client, Reply::Succeeded).await.is_ok() {
                upstream.relay(client).await;
            }
        }
        Err(e) => {
            let reply = match &e {
                OutboundError::UnknownSource(_) | OutboundError::Loop(_) => Reply::NotAllowed,
                OutboundError::Resolve(_) => Reply::HostUnreachable,
                OutboundError::Hbone { .. }
                | OutboundError::WaypointHbone { .. }
                | OutboundError::Connect { .. } => Reply::ConnectionRefused,
                OutboundError::Cert(_) => Reply::GeneralFailure,
            };
            let _ = send_reply(&mut client, reply).await;
        }
    }
}

async fn handshake(
    state: &ProxyState,
    client: &mut TcpStream,
) -> Result<SocketAddr, HandshakeError> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(HandshakeError::Version(head[0]));
    }
    let mut methods = [0u8; 255];
    let methods = &mut methods[..head[1] as usize];
    client.read_exact(methods).await?;
    if !methods.contains(&NO_AUTH) {
        client.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(HandshakeError::NoMethod);
    }
    client.write_all(&[VERSION, NO_AUTH]).await?;

    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(HandshakeError::Version(req[0]));
    }
    if req[1] != CMD_CONNECT {
        return Err(HandshakeError::Command(req[1]));
    }
    let ip = match req[3] {
        ATYP_V4 => {
            let mut b = [0u8; 4];
            client.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        ATYP_V6 => {
            let mut b = [0u8; 16];
            client.read_exact(&mut b).await?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        ATYP_DOMAIN => {
            let len = client.read_u8().await? as usize;
            let mut name = [0u8; 255];
            client.read_exact(&mut name[..len]).await?;
            let name = String::from_utf8_lossy(&name[..len]).into_owned();
            resolve_name(state, &name).ok_or(HandshakeError::UnknownHost(name))?
        }
        other => return Err(HandshakeError::AddressType(other)),
    };
    let port = client.read_u16().await?;
    Ok(SocketAddr::new(ip, port))
}

/// Mesh service hostnames resolve to their VIP; nothing else is looked up.
fn resolve_name(state: &ProxyState, name: &str) -> Option<IpAddr> {
    if let Ok(ip) = name.parse() {
        return Some(ip);
    }
    let snap = state.store.snapshot();
    snap.service_by_host(name.trim_end_matches('.'))
        .and_then(|s| s.addresses.first().copied())
}

async fn send_reply(client: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    // Bound address is not meaningful through the mesh; report 0.0.0.0:0.
    client
        .write_all(&[VERSION, reply as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
}

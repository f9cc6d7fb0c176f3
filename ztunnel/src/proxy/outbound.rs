//! Outbound: a local workload's connection, captured (15001) or asked for (SOCKS5), carried to
//! its destination over HBONE, or as plain TCP to destinations outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request};
use mesh_core::hbone::{self, HboneError, PoolKey, PooledStream};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{ProxyState, orig_dst, reset};
use crate::metrics::{ConnectionRecord, Direction, Peer, RefusalReason, Reporter};
use crate::state::{Destination, Protocol, ResolveError, Workload};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "source {0} is not a workload on this node; only local workloads may send through ztunnel"
    )]
    UnknownSource(SocketAddr),
    #[error("destination {0} is one of ztunnel's own listeners (loop)")]
    Loop(SocketAddr),
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    Cert(#[from] mesh_core::certs::CertError),
    #[error("HBONE to {dst}: {error}")]
    Hbone { dst: SocketAddr, error: HboneError },
    #[error("HBONE to waypoint pod {pod} at {addr} for {target}: {error}")]
    WaypointHbone {
        pod: String,
        addr: SocketAddr,
        target: SocketAddr,
        error: HboneError,
    },
    #[error("connecting to {dst}: {error}")]
    Connect {
        dst: SocketAddr,
        error: std::io::Error,
    },
}

impl OutboundError {
    fn reason(&self) -> RefusalReason {
        match self {
            Self::UnknownSource(_) => RefusalReason::unknown_source,
            Self::Loop(_) => RefusalReason::loop_detected,
            Self::Resolve(ResolveError::NoHealthyEndpoints(_)) => {
                RefusalReason::no_healthy_endpoint
            }
            Self::Resolve(ResolveError::UnknownPort { .. }) => RefusalReason::unknown_service_port,
            Self::Resolve(ResolveError::UnknownWaypoint(_)) => RefusalReason::unknown_waypoint,
            Self::Resolve(ResolveError::NoHealthyWaypoint(_)) => RefusalReason::no_healthy_waypoint,
            Self::Cert(_) => RefusalReason::certificate_unavailable,
            Self::Hbone {
                error: HboneError::Refused { .. },
                ..
            }
            | Self::WaypointHbone {
                error: HboneError::Refused { .. },
                ..
            } => RefusalReason::tunnel_refused,
            Self::Hbone { .. } | Self::WaypointHbone { .. } | Self::Connect { .. } => {
                RefusalReason::upstream_connect_failed
            }
        }
    }
}

/// An established path to the destination, ready to relay.
pub struct Upstream {
    link: Link,
    record: ConnectionRecord,
}

enum Link {
    Hbone(PooledStream),
    Plain(TcpStream),
}

impl Upstream {
    /// Copies both ways until both sides are done; records and logs the outcome.
    pub async fn relay(self, client: TcpStream) {
        let Upstream { link, mut record } = self;
        let bytes = record.bytes.clone();
        let result = match link {
            Link::Hbone(pooled) => hbone::copy_bidirectional(client, pooled.stream, &bytes)
                .await
                .map_err(|e| e.to_string()),
            Link::Plain(upstream) => copy_plain(client, upstream, &bytes).await,
        };
        if let Err(e) = result {
            record.fail(e);
        }
    }
}

/// Serves one connection redirected to the outbound listener.
pub async fn serve_redirected(state: Arc<ProxyState>, client: TcpStream, peer: SocketAddr) {
    let Some(dst) = orig_dst::redirected_dst(&client, peer, "outbound") else {
        return reset(client);
    };
    match connect(&state, peer, dst).await {
        Ok(upstream) => upstream.relay(client).await,
        Err(_) => reset(client),
    }
}

/// Resolves `dst` for the workload at `src` and opens the path to it. Failures are logged and
/// counted here.
pub async fn connect(
    state: &Arc<ProxyState>,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Upstream, OutboundError> {
    let result = try_connect(state, src, dst).await;
    if let Err(e) = &result {
        state.metrics.refused(Direction::outbound, e.reason());
        warn!(src.addr = %src, dst.addr = %dst, error = %e, component = "outbound", "connection refused");
    }
    result
}

async fn try_connect(
    state: &Arc<ProxyState>,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Upstream, OutboundError> {
    if state.own_addrs.iter().any(|a| is_same_listener(*a, dst)) {
        return Err(OutboundError::Loop(dst));
    }
    let snap = state.store.snapshot();
    let source = snap
        .workload_by_ip(src.ip())
        .filter(|w| w.node == state.cfg.node_name)
        .cloned()
        .ok_or(OutboundError::UnknownSource(src))?;
    let destination = snap.resolve_from(Some(&source), dst)?;
    drop(snap);
    let src_peer = Peer {
        addr: Some(src),
        workload: Some(source.clone()),
        identity: Some(source.identity.to_string()),
    };
    let mut through_waypoint = None;
    let (link, dst_peer, service, mtls) = match destination {
        Destination::Workload {
            workload,
            addr,
            service,
        } if workload.protocol == Protocol::Hbone => {
            let hbone = SocketAddr::new(addr.ip(), state.cfg.hbone_port);
            let service_host = service.as_ref().map(|s| s.hostname.clone());
            debug!(src = %source.identity, dst = %workload.identity, %addr, "opening HBONE stream");
            let pooled = open_hbone(state, &source, src, &workload, hbone, addr, &service_host)
                .await
                .map_err(|error| match error {
                    HboneError::Cert(c) => OutboundError::Cert(c),
                    error => OutboundError::Hbone { dst: addr, error },
                })?;
            let peer = Peer {
                addr: Some(addr),
                identity: Some(workload.identity.to_string()),
                workload: Some(workload),
            };
            (Link::Hbone(pooled), peer, service_host, true)
        }
        // The waypoint pod is reached over HBONE on its own port whatever protocol it is
        // listed with (waypoints are not captured), and proves the waypoint's identity; the
        // CONNECT asks it for the original destination.
        Destination::Waypoint {
            waypoint,
            addr,
            target,
            service,
            workload: _,
        } => {
            let service_host = service.as_ref().map(|s| s.hostname.clone());
            debug!(src = %source.identity, waypoint = %waypoint.identity, %addr, %target, "opening HBONE stream to the waypoint");
            let pooled = open_hbone(state, &source, src, &waypoint, addr, target, &service_host)
                .await
                .map_err(|error| match error {
                    HboneError::Cert(c) => OutboundError::Cert(c),
                    error => OutboundError::WaypointHbone {
                        pod: format!("{}/{}", waypoint.namespace, waypoint.name),
                        addr,
                        target,
                        error,
                    },
                })?;
            through_waypoint = Some(target);
            let peer = Peer {
                addr: Some(addr),
                identity: Some(waypoint.identity.to_string()),
                workload: Some(waypoint),
            };
            (Link::Hbone(pooled), peer, service_host, true)
        }
        // A workload outside the mesh: plain TCP, still attributed to it.
        Destination::Workload {
            workload,
            addr,
            service,
        } => {
            let upstream = dial(state, addr, src).await?;
            let peer = Peer {
                addr: Some(addr),
                identity: None,
                workload: Some(workload),
            };
            (
                Link::Plain(upstream),
                peer,
                service.map(|s| s.hostname.clone()),
                false,
            )
        }
        Destination::Passthrough(addr) => {
            let upstream = dial(state, addr, src).await?;
            let peer = Peer {
                addr: Some(addr),
                ..Peer::default()
            };
            (Link::Plain(upstream), peer, None, false)
        }
    };
    let mut record = ConnectionRecord::open(
        &state.metrics,
        Reporter::source,
        Direction::outbound,
        src_peer,
        dst_peer,
        service,
        mtls,
    );
    if let Some(target) = through_waypoint {
        record = record.hbone_target(target);
    }
    Ok(Upstream { link, record })
}

/// A CONNECT stream for `target` from the local workload `source` (at `src`), over a pooled
/// HBONE connection to `addr`, whose server must prove it is `server`.
async fn open_hbone(
    state: &ProxyState,
    source: &Workload,
    src: SocketAddr,
    server: &Workload,
    addr: SocketAddr,
    target: SocketAddr,
    service_host: &Option<String>,
) -> Result<PooledStream, HboneError> {
    let key = PoolKey {
        src: source.identity.clone(),
        dst: vec![server.identity.clone()],
        addr,
        src_ip: Some(src.ip()),
    };
    let request = connect_request(target, src, service_host.as_deref());
    state.pool.connect(&key, request).await
}

/// A plain connection on behalf of the local workload at `src` (from its own network
/// namespace under in-pod capture).
async fn dial(
    state: &ProxyState,
    dst: SocketAddr,
    src: SocketAddr,
) -> Result<TcpStream, OutboundError> {
    let connect = state.dialer.connect_for(dst, None, Some(src.ip()));
    match tokio::time::timeout(state.cfg.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(error)) => Err(OutboundError::Connect { dst, error }),
        Err(_) => Err(OutboundError::Connect {
            dst,
            error: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

/// The CONNECT request for one proxied connection.
fn connect_request(target: SocketAddr, client: SocketAddr, host: Option<&str>) -> Request<()> {
    let mut forwarded = format!("for=\"{client}\"");
    if let Some(h) = host {
        forwarded.push_str(";host=");
        forwarded.push_str(h);
    }
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", forwarded)
        .header("traceparent", traceparent())
        .body(())
        .expect("an ip:port authority and ASCII headers form a valid request")
}

/// A fresh W3C trace context: version 00, random trace and span ids, sampled.
fn traceparent() -> String {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// Plain TCP relay with the same half-close semantics as the HBONE copy; bytes are counted as
/// they move, so a connection that ends in a reset still reports what it carried.
pub(crate) async fn copy_plain(
    a: TcpStream,
    b: TcpStream,
    bytes: &mesh_core::hbone::ByteCounters,
) -> Result<(), String> {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let up = pump(ar, bw, &bytes.sent);
    let down = pump(br, aw, &bytes.received);
    tokio::try_join!(up, down)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One direction of a plain relay: read, write, count, until EOF; then pass the FIN on.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; PLAIN_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Buffer per direction of a plain relay.
const PLAIN_BUFFER: usize = 16 * 1024;

fn is_same_listener(listener: SocketAddr, dst: SocketAddr) -> bool {
    listener.port() == dst.port()
        && (listener.ip() == dst.ip() || (listener.ip().is_unspecified() && dst.ip().is_loopback()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_carries_authority_and_metadata() {
        let r = connect_request(
            "198.18.0.2:8080".parse().unwrap(),
            "198.18.0.1:4000".parse().unwrap(),
            Some("echo.default.svc.cluster.local"),
        );
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().to_string(), "198.18.0.2:8080");
        assert_eq!(
            r.headers()["forwarded"],
            "for=\"198.18.0.1:4000\";host=echo.default.svc.cluster.local"
        );
        let tp = r.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-") && tp.ends_with("-01"));
    }

    #[test]
    fn loop_detection_matches_own_listeners() {
        let l: SocketAddr = "0.0.0.0:15001".parse().unwrap();
        assert!(is_same_listener(l, "127.0.0.1:15001".parse().unwrap()));
        assert!(!is_same_listener(l, "127.0.0.1:15002".parse().unwrap()));
        assert!(!is_same_listener(l, "198.18.0.9:15001".parse().unwrap()));
    }
}

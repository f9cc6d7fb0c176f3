//! Inbound HBONE: one listener on the HBONE port of every local mesh workload's address,
//! terminating mTLS as that workload and forwarding each CONNECT stream to it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use mesh_core::hbone::{self, Connect};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::{ActiveGuard, ProxyState, accept_loop};
use crate::metrics::{ConnectionRecord, Direction, Peer, RefusalReason, Reporter};
use crate::rbac::{self, Verdict};
use crate::state::Protocol;

/// The set of per-workload HBONE listeners, kept in line with the local workloads.
pub struct InboundListeners {
    state: Arc<ProxyState>,
    running: Mutex<HashMap<IpAddr, Running>>,
    /// Addresses whose bind failure was already logged: retries stay quiet until it changes.
    reported: Mutex<std::collections::HashSet<SocketAddr>>,
}

struct Running {
    addr: SocketAddr,
    task: AbortHandle,
}

/// A listener that should exist but could not be opened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BindFailure {
    pub addr: SocketAddr,
    pub workload: String,
    pub error: String,
}

impl InboundListeners {
    pub fn new(state: Arc<ProxyState>) -> Self {
        Self {
            state,
            running: Mutex::new(HashMap::new()),
            reported: Mutex::new(Default::default()),
        }
    }

    /// Opens listeners for new local workloads and closes those of departed ones. Connections
    /// already accepted are left to finish. Returns the listeners that could not be opened.
    pub fn reconcile(&self) -> Vec<BindFailure> {
        if self.state.cfg.inpod_socket.is_some() {
            // Under in-pod capture each pod's HBONE listener lives in its own namespace.
            return Vec::new();
        }
        let snap = self.state.store.snapshot();
        let mut wanted: HashMap<IpAddr, String> = HashMap::new();
        for w in snap.local_workloads(&self.state.cfg.node_name) {
            if w.protocol == Protocol::Hbone {
                for ip in &w.addresses {
                    wanted.insert(*ip, format!("{}/{}", w.namespace, w.name));
                }
            }
        }
        let mut running = self.running.lock().expect("listener map lock poisoned");
        running.retain(|ip, r| {
            let keep = wanted.contains_key(ip);
            if !keep {
                info!(addr = %r.addr, component = "inbound", "listener closed");
                r.task.abort();
            }
            keep
        });
        let mut failures = Vec::new();
        for (ip, workload) in wanted {
            if running.contains_key(&ip) {
                continue;
            }
            let addr = SocketAddr::new(ip, self.state.cfg.hbone_port);
            match bind(addr) {
                Ok(listener) => {
                    self.reported
                        .lock()
                        .expect("report set lock poisoned")
                        .remove(&addr);
                    let task =
                        tokio::spawn(accept_loop(listener, "inbound", self.state.clone(), serve));
                    running.insert(
                        ip,
                        Running {
                            addr,
                            task: task.abort_handle(),
                        },
                    );
                }
                Err(e) => {
                    let first = self
                        .reported
                        .lock()
                        .expect("report set lock poisoned")
                        .insert(addr);
                    if first {
                        warn!(%addr, workload, error = %e, component = "inbound", "cannot listen for HBONE; retrying every few seconds");
                    } else {
                        debug!(%addr, workload, error = %e, component = "inbound", "cannot listen for HBONE");
                    }
                    failures.push(BindFailure {
                        addr,
                        workload,
                        error: e.to_string(),
                    });
                }
            }
        }
        failures
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        let running = self.running.lock().expect("listener map lock poisoned");
        let mut v: Vec<_> = running.values().map(|r| r.addr).collect();
        v.sort();
        v
    }
}

impl Drop for InboundListeners {
    fn drop(&mut self) {
        if let Ok(running) = self.running.get_mut() {
            for r in running.values() {
                r.task.abort();
            }
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

pub(crate) async fn serve(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let workload = {
        let snap = state.store.snapshot();
        snap.workload_by_ip(local.ip()).cloned()
    };
    let Some(workload) = workload.filter(|w| w.node == state.cfg.node_name) else {
        state
            .metrics
            .refused(Direction::inbound, RefusalReason::no_local_workload);
        warn!(%peer, %local, component = "inbound", "no local workload at this address any more");
        return;
    };
    // Counted against the handshake time, so unauthenticated connections cannot queue up
    // behind a slow CA.
    let fetch = state.certs.fetch(&workload.identity);
    let cert = match tokio::time::timeout(state.cfg.handshake_timeout, fetch).await {
        Ok(Ok(c)) => c,
        Err(_) => {
            state
                .metrics
                .refused(Direction::inbound, RefusalReason::certificate_unavailable);
            warn!(%peer, identity = %workload.identity, component = "inbound", "no certificate in time to serve HBONE");
            return;
        }
        Ok(Err(e)) => {
            state
                .metrics
                .refused(Direction::inbound, RefusalReason::certificate_unavailable);
            warn!(%peer, error = %e, component = "inbound", "cannot serve HBONE");
            return;
        }
    };
    let tls = match cert.server_config() {
        Ok(t) => t,
        Err(e) => {
            warn!(%peer, error = %e, component = "inbound", "cannot serve HBONE");
            return;
        }
    };
    let server_cfg = hbone::ServerConfig {
        handshake_timeout: state.cfg.handshake_timeout,
        ..Default::default()
    };
    let handler_state = state.clone();
    let drain_state = state.clone();
    let drain = async move { drain_state.draining().await };
    let result = hbone::serve_connection(tcp, tls, &server_cfg, drain, move |connect| {
        handle_stream(handler_state.clone(), connect)
    })
    .await;
    if let Err(e) = result {
        match e {
            hbone::AcceptError::H2(ref h2e) if h2e.is_io() || h2e.is_go_away() => {
                debug!(%peer, error = %e, component = "inbound", "HBONE connection ended");
            }
            hbone::AcceptError::H2(_) => {
                debug!(%peer, error = %e, component = "inbound", "HBONE connection ended");
            }
            _ => {
                state
                    .metrics
                    .refused(Direction::inbound, RefusalReason::handshake_failed);
                warn!(%peer, error = %e, component = "inbound", "HBONE connection refused");
            }
        }
    }
}

async fn handle_stream(state: Arc<ProxyState>, connect: Connect) {
    let _active = ActiveGuard::new(&state);
    let peer_id = connect.peer_identity.to_string();
    let refuse = |connect: Connect, status: StatusCode, reason: RefusalReason, msg: String| {
        state.metrics.refused(Direction::inbound, reason);
        warn!(
            src.addr = %connect.peer_addr,
            src.identity = %peer_id,
            authority = %connect.request.uri(),
            %status,
            error = %msg,
            component = "inbound",
            "CONNECT refused"
        );
        connect.refuse(status, &msg);
    };
    if connect.request.method() != Method::CONNECT {
        let m = format!("method {} is not CONNECT", connect.request.method());
        return refuse(
            connect,
            StatusCode::BAD_REQUEST,
            RefusalReason::bad_request,
            m,
        );
    }
    let target: SocketAddr = match connect
        .request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
    {
        Some(t) => t,
        None => {
            let m = format!(
                "authority {:?} is not ip:port",
                connect.request.uri().to_string()
            );
            return refuse(
                connect,
                StatusCode::BAD_REQUEST,
                RefusalReason::bad_request,
                m,
            );
        }
    };
    let snap = state.store.snapshot();
    let Some(dst) = snap
        .workload_by_ip(target.ip())
        .filter(|w| w.node == state.cfg.node_name && w.protocol == Protocol::Hbone)
        .cloned()
    else {
        let m = format!("no workload at {} on this node", target.ip());
        return refuse(
            connect,
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::no_local_workload,
            m,
        );
    };
    if target.ip() != connect.local_addr.ip() {
        let m = format!(
            "authority {} does not match the address {} the connection arrived on",
            target,
            connect.local_addr.ip()
        );
        return refuse(
            connect,
            StatusCode::BAD_REQUEST,
            RefusalReason::bad_request,
            m,
        );
    }
    // Attribute the source workload only when its address and proven identity agree.
    let src_workload = snap
        .workload_by_ip(connect.peer_addr.ip())
        .filter(|w| w.identity == connect.peer_identity)
        .cloned();
    // The service named by the client, only if it really fronts this workload: the header is
    // peer input and becomes a metric label.
    let service = forwarded_host(&connect.request)
        .and_then(|h| snap.service_by_host(&h))
        .filter(|s| s.endpoints.contains(&dst.uid))
        .map(|s| s.hostname.clone());
    let decided_on = rbac::Connection {
        src_identity: Some(connect.peer_identity.clone()),
        src_ip: connect.peer_addr.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    // The waypoint rule first: a workload with a waypoint is reached through it or not at all.
    let (verdict, refusal) = match rbac::waypoint::check(&snap, &dst, &decided_on) {
        Verdict::Allow => (
            rbac::evaluate(&snap, &dst, &decided_on),
            RefusalReason::policy_denied,
        ),
        deny => (deny, RefusalReason::waypoint_bypassed),
    };
    let dst_uid = dst.uid.clone();
    drop(snap);
    let src = Peer {
        addr: Some(connect.peer_addr),
        workload: src_workload,
        identity: Some(peer_id.clone()),
    };
    let dst = Peer {
        addr: Some(target),
        identity: Some(dst.identity.to_string()),
        workload: Some(dst),
    };
    let open_record = |src: Peer, dst: Peer, service: Option<String>| {
        ConnectionRecord::open(
            &state.metrics,
            Reporter::destination,
            Direction::inbound,
            src,
            dst,
            service,
            true,
        )
        .client_on_tunnel_side()
    };
    if let Verdict::Deny { policy, reason } = verdict {
        let mut record = open_record(src, dst, service);
        record.deny(&policy, &reason);
        return refuse(connect, StatusCode::UNAUTHORIZED, refusal, reason);
    }

    // Made in the workload's own namespace under in-pod capture.
    let upstream = state.dialer.connect_for(target, None, Some(target.ip()));
    let upstream = match tokio::time::timeout(state.cfg.connect_timeout, upstream).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let m = format!("connecting to {target}: {e}");
            return refuse(
                connect,
                StatusCode::SERVICE_UNAVAILABLE,
                RefusalReason::upstream_connect_failed,
                m,
            );
        }
        Err(_) => {
            let m = format!("connecting to {target} timed out");
            return refuse(
                connect,
                StatusCode::SERVICE_UNAVAILABLE,
                RefusalReason::upstream_connect_failed,
                m,
            );
        }
    };
    let mut record = open_record(src, dst, service);
    let stream = match connect.accept() {
        Ok(s) => s,
        Err(e) => return record.fail(format!("answering CONNECT: {e}")),
    };
    let bytes = record.bytes.clone();
    let registration = state.authorized.register(&dst_uid, decided_on);
    let copy = hbone::copy_bidirectional(upstream, stream, &bytes);
    super::copy_while_allowed(copy, registration, &mut record).await;
}

/// The service hostname from `forwarded: ...;host=<name>`, if the client sent one.
fn forwarded_host(req: &http::Request<()>) -> Option<String> {
    let v = req.headers().get("forwarded")?.to_str().ok()?;
    v.split(';')
        .find_map(|part| part.trim().strip_prefix("host="))
        .map(|h| h.trim_matches('"').to_owned())
}

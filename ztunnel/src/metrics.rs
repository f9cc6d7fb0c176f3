//! Prometheus metrics with Istio's names and labels, and the per-connection access log.
//!
//! Byte counters: `istio_tcp_sent_bytes_total` counts bytes from the client toward the server,
//! `istio_tcp_received_bytes_total` bytes from the server back to the client.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::hbone::ByteCounters;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::state::Workload;

pub mod live;
use live::{Denial, Live, LiveConnection};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: String,
    pub connection_security_policy: SecurityPolicy,
}

/// Why a connection was refused or failed; bounded, so it can be a label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusalReason {
    unknown_source,
    loop_detected,
    no_healthy_endpoint,
    unknown_service_port,
    upstream_connect_failed,
    tunnel_refused,
    bad_request,
    no_local_workload,
    certificate_unavailable,
    handshake_failed,
    /// An authorization policy denied the connection.
    policy_denied,
    /// The destination's waypoint is not in the config.
    unknown_waypoint,
    /// The destination's waypoint has no ready pod.
    no_healthy_waypoint,
    /// The destination workload has a waypoint and the connection did not come from it.
    waypoint_bypassed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::inbound => "inbound",
            Direction::outbound => "outbound",
        }
    }
}

/// Why an xDS stream to istiod-lite ended (or never started); bounded, so it can be a label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum XdsTermination {
    /// istiod-lite could not be reached.
    connect_failed,
    /// istiod-lite answered the stream with an error (bad token, not authorized, ...).
    refused,
    /// The stream broke after it was established.
    stream_error,
    /// istiod-lite ended the stream.
    stream_closed,
    /// The bearer token could not be read or sent.
    token_unreadable,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTerminationLabels {
    pub reason: XdsTermination,
}

#[derive(Clone)]
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    pub config_reload_errors: Counter,
    /// xDS responses answered with a NACK.
    pub xds_nacks: Counter,
    /// Attempts to reopen the xDS stream after one ended or failed to open.
    pub xds_reconnects: Counter,
    /// 1 while an xDS stream to istiod-lite is established.
    pub xds_connected: Gauge,
    xds_terminations: Family<XdsTerminationLabels, Counter>,
    registry: Arc<Registry>,
    live: Arc<Live>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        let refused = Family::<RefusalLabels, Counter>::default();
        let config_reload_errors = Counter::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from client to server over TCP connections",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes sent from server back to client over TCP connections",
            received.clone(),
        );
        registry.register(
            "ztunnel_connections_refused",
            "Connections ztunnel refused or could not complete, by reason",
            refused.clone(),
        );
        registry.register(
            "ztunnel_config_reload_errors",
            "Mesh config reloads rejected (the last good config stays in force)",
            config_reload_errors.clone(),
        );
        let xds_nacks = Counter::default();
        let xds_reconnects = Counter::default();
        let xds_connected = Gauge::default();
        let xds_terminations = Family::<XdsTerminationLabels, Counter>::default();
        registry.register(
            "ztunnel_xds_nacks_sent",
            "xDS responses rejected in whole or part (NACKed); the valid resources were applied",
            xds_nacks.clone(),
        );
        registry.register(
            "ztunnel_xds_reconnects",
            "Attempts to reopen the xDS stream to istiod-lite after one ended or could not be opened",
            xds_reconnects.clone(),
        );
        registry.register(
            "ztunnel_xds_connected",
            "1 while an xDS stream to istiod-lite is established",
            xds_connected.clone(),
        );
        registry.register(
            "ztunnel_xds_connection_terminations",
            "xDS streams that ended or could not be opened, by reason",
            xds_terminations.clone(),
        );
        Self {
            opened,
            closed,
            sent,
            received,
            refused,
            config_reload_errors,
            xds_nacks,
            xds_reconnects,
            xds_connected,
            xds_terminations,
            registry: Arc::new(registry),
            live: Arc::default(),
        }
    }

    /// The connections being proxied right now (for `/config_dump`).
    pub fn live_connections(&self) -> serde_json::Value {
        self.live.connections()
    }

    /// The last connections refused by an authorization policy, oldest first.
    pub fn recent_denials(&self) -> Vec<Denial> {
        self.live.denials()
    }

    pub fn xds_terminated(&self, reason: XdsTermination) {
        self.xds_terminations
            .get_or_create(&XdsTerminationLabels { reason })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn refused(&self, direction: Direction, reason: RefusalReason) {
        self.refused
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Both ends of a proxied connection as the access log and metrics name them.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub workload: Option<Arc<Workload>>,
    /// The identity proven over mTLS (inbound) or the one expected (outbound).
    pub identity: Option<String>,
}

/// Lives as long as a proxied connection; on drop it counts the connection closed, adds its
/// bytes and writes one access-log event, so every early return is recorded.
pub struct ConnectionRecord {
    metrics: Metrics,
    labels: TcpLabels,
    direction: Direction,
    src: Peer,
    dst: Peer,
    service: Option<String>,
    start: Instant,
    pub bytes: Arc<ByteCounters>,
    /// The byte counters were filled with the client on the tunnel side (inbound HBONE), so
    /// their "sent" is server → client.
    tunnel_is_client: bool,
    error: Option<String>,
    /// `namespace/name` of the authorization policy that denied the connection, or
    /// `waypoint namespace/name` when the waypoint rule did.
    policy: Option<String>,
    /// The CONNECT authority, when it is not the destination itself (through a waypoint).
    hbone_target: Option<SocketAddr>,
    live_id: u64,
}

impl ConnectionRecord {
    pub fn open(
        metrics: &Metrics,
        reporter: Reporter,
        direction: Direction,
        src: Peer,
        dst: Peer,
        service: Option<String>,
        mtls: bool,
    ) -> Self {
        let name = |p: &Peer| {
            p.workload
                .as_ref()
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(|| "unknown".into())
        };
        let ns = |p: &Peer| {
            p.workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .unwrap_or_else(|| "unknown".into())
        };
        let principal = |p: &Peer| p.identity.clone().unwrap_or_else(|| "unknown".into());
        let labels = TcpLabels {
            reporter,
            source_workload: name(&src),
            source_workload_namespace: ns(&src),
            source_principal: principal(&src),
            destination_workload: name(&dst),
            destination_workload_namespace: ns(&dst),
            destination_principal: principal(&dst),
            destination_service: service.clone().unwrap_or_else(|| "unknown".into()),
            request_protocol: "tcp".into(),
            connection_security_policy: if mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
        };
        metrics.opened.get_or_create(&labels).inc();
        let (local, peer) = match direction {
            Direction::inbound => (&dst, &src),
            Direction::outbound => (&src, &dst),
        };
        let live_id = metrics.live.open(LiveConnection {
            direction: direction.as_str(),
            workload: local.workload.clone(),
            source: src.addr,
            destination: dst.addr,
            mtls,
            peer_identity: peer.identity.clone(),
            started: Instant::now(),
        });
        Self {
            metrics: metrics.clone(),
            labels,
            direction,
            src,
            dst,
            service,
            start: Instant::now(),
            bytes: Arc::new(ByteCounters::default()),
            tunnel_is_client: false,
            error: None,
            policy: None,
            hbone_target: None,
            live_id,
        }
    }

    /// Marks the counters as filled by a copy whose tunnel side faces the client.
    pub fn client_on_tunnel_side(mut self) -> Self {
        self.tunnel_is_client = true;
        self
    }

    /// Notes that the tunnel asked the destination (a waypoint) for `target`.
    pub fn hbone_target(mut self, target: SocketAddr) -> Self {
        self.hbone_target = Some(target);
        self
    }

    pub fn fail(&mut self, error: impl std::fmt::Display) {
        self.error = Some(error.to_string());
    }

    /// Records that `policy` (`namespace/name`, or `waypoint namespace/name` for the waypoint
    /// rule) denied the connection, for `reason`.
    pub fn deny(&mut self, policy: &str, reason: &str) {
        self.policy = Some(policy.to_owned());
        self.fail(reason);
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.metrics.live.close(self.live_id);
        let (mut sent, mut received) = (self.bytes.sent(), self.bytes.received());
        if self.tunnel_is_client {
            std::mem::swap(&mut sent, &mut received);
        }
        self.metrics.closed.get_or_create(&self.labels).inc();
        self.metrics.sent.get_or_create(&self.labels).inc_by(sent);
        self.metrics
            .received
            .get_or_create(&self.labels)
            .inc_by(received);
        let fmt_addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let fmt_wl = |p: &Peer| {
            p.workload
                .as_ref()
                .map(|w| {
                    let mut s = String::with_capacity(w.namespace.len() + w.name.len() + 1);
                    let _ = write!(s, "{}/{}", w.namespace, w.name);
                    s
                })
                .unwrap_or_default()
        };
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let direction = self.direction.as_str();
        if let (Some(reason), Some(policy)) = (&self.error, &self.policy) {
            self.metrics.live.denied(Denial {
                at: live::unix_now(),
                direction,
                workload: Some(fmt_wl(&self.dst)).filter(|s| !s.is_empty()),
                source: self.src.addr,
                source_workload: Some(fmt_wl(&self.src)).filter(|s| !s.is_empty()),
                source_identity: self.src.identity.clone(),
                destination: self.dst.addr,
                policy: policy.clone(),
                reason: reason.clone(),
            });
        }
        macro_rules! access {
            ($lvl:ident, $($extra:tt)*) => {
                $lvl!(
                    target: "access",
                    direction,
                    src.addr = %fmt_addr(self.src.addr),
                    src.workload = %fmt_wl(&self.src),
                    src.identity = self.src.identity.as_deref().unwrap_or(""),
                    dst.addr = %fmt_addr(self.dst.addr),
                    dst.hbone_addr = %fmt_addr(self.hbone_target),
                    dst.workload = %fmt_wl(&self.dst),
                    dst.identity = self.dst.identity.as_deref().unwrap_or(""),
                    dst.service = self.service.as_deref().unwrap_or(""),
                    bytes_sent = sent,
                    bytes_recv = received,
                    duration_ms,
                    $($extra)*
                )
            };
        }
        match (&self.error, &self.policy) {
            (None, _) => access!(info, "connection complete"),
            (Some(e), None) => access!(warn, error = %e, "connection failed"),
            (Some(e), Some(p)) => access!(warn, error = %e, policy = %p, "connection denied"),
        }
    }
}

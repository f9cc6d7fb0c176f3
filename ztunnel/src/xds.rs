//! The delta xDS client: one `DeltaAggregatedResources` stream to istiod-lite subscribing to
//! workloads/services and authorization policies, applied to the store as they arrive. The
//! client is generic over what it subscribes to ([`ResourceSet`]): the waypoint follows
//! istiod-lite with the same code and its own types.
//!
//! Every response is answered: an ACK, or a NACK naming each rejected resource (the valid ones
//! are applied all the same). The stream is reopened forever with jittered exponential
//! back-off; on reopening, the client lists what it holds (`initial_resource_versions`) so the
//! server sends only the difference. While disconnected the last config stays in force.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::config::{Config, ControlPlaneAddr, ZTUNNEL_NAMESPACE};
use crate::grpc::{self, Token};
use crate::metrics::{Metrics, XdsTermination};
use crate::state::Store;
pub use resources::Applied;

pub mod convert;
pub mod resources;

pub use resources::{Resources, TYPE_URLS};

/// First reconnect delay; doubled (with jitter) after each failure up to [`MAX_BACKOFF`], and
/// back to this after a stream that delivered config.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The largest xDS response accepted.
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// The xDS node ztunnel presents: `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
/// with metadata NAME, NAMESPACE and NODE_NAME.
pub fn node(node_name: &str) -> Node {
    proxy_node("ztunnel", node_name, ZTUNNEL_NAMESPACE, node_name)
}

/// The xDS node of a proxy of `kind` (`ztunnel`, or `router` for a waypoint) named `name` in
/// `namespace` on `node_name`, in Istio's form.
pub fn proxy_node(kind: &str, name: &str, namespace: &str, node_name: &str) -> Node {
    use prost_types::value::Kind;
    let string = |s: &str| prost_types::Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let ns = namespace;
    Node {
        id: format!("{kind}~0.0.0.0~{name}.{ns}~{ns}.svc.cluster.local"),
        cluster: String::new(),
        metadata: Some(prost_types::Struct {
            fields: [
                ("NAME".to_owned(), string(name)),
                ("NAMESPACE".to_owned(), string(ns)),
                ("NODE_NAME".to_owned(), string(node_name)),
            ]
            .into(),
        }),
    }
}

/// What a client subscribes to, and the state machine that applies what arrives.
pub trait ResourceSet: Send + 'static {
    /// The types subscribed to, in the order they are asked for.
    const TYPE_URLS: &'static [&'static str];
    /// The first request for `type_url` on a stream, listing what is held already.
    fn initial_request(&self, type_url: &str, node: &Node) -> DeltaDiscoveryRequest;
    /// Applies the valid part of `resp` and says how to answer it.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Applied;
    /// How many resources of `type_url` are held.
    fn len(&self, type_url: &str) -> usize;
}

impl ResourceSet for Resources {
    const TYPE_URLS: &'static [&'static str] = &TYPE_URLS;

    fn initial_request(&self, type_url: &str, node: &Node) -> DeltaDiscoveryRequest {
        Resources::initial_request(self, type_url, node)
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Applied {
        Resources::apply(self, resp)
    }

    fn len(&self, type_url: &str) -> usize {
        Resources::len(self, type_url)
    }
}

/// Where a client reports its stream's health (Prometheus counters, in practice).
pub trait XdsReport: Send + Sync + 'static {
    fn connected(&self, up: bool);
    fn terminated(&self, reason: XdsTermination);
    fn reconnecting(&self);
    fn nacked(&self);
}

impl XdsReport for Metrics {
    fn connected(&self, up: bool) {
        self.xds_connected.set(i64::from(up));
    }

    fn terminated(&self, reason: XdsTermination) {
        self.xds_terminated(reason);
    }

    fn reconnecting(&self) {
        self.xds_reconnects.inc();
    }

    fn nacked(&self) {
        self.xds_nacks.inc();
    }
}

/// What `/config_dump` and readiness know about the xDS stream. Cheap to clone.
#[derive(Clone, Default)]
pub struct XdsStatus {
    inner: Arc<Mutex<StatusInner>>,
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusInner {
    address: String,
    connected: bool,
    last_error: Option<String>,
    types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct TypeStatus {
    resources: usize,
    /// Set once a response of this type has been ACKed; readiness waits for every type.
    acked: bool,
    last_acked_nonce: Option<String>,
    last_nack: Option<String>,
}

impl XdsStatus {
    /// A status for ztunnel's client of `addr`: disconnected, nothing ACKed yet.
    pub fn new(addr: &ControlPlaneAddr) -> Self {
        Self::for_types(addr, &TYPE_URLS)
    }

    /// A status for a client of `addr` subscribing to `types`.
    pub fn for_types(addr: &ControlPlaneAddr, types: &[&'static str]) -> Self {
        let s = Self::default();
        {
            let mut inner = s.lock();
            inner.address = addr.to_string();
            for t in types {
                inner.types.insert(t, TypeStatus::default());
            }
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().expect("xDS status lock poisoned")
    }

    /// Ready once every subscribed type has been ACKed at least once; it stays ready through
    /// disconnections, as the last config stays in force.
    pub fn is_ready(&self) -> bool {
        self.lock().types.values().all(|t| t.acked)
    }

    /// Why the proxy is not ready yet, for the readiness body.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let inner = self.lock();
        inner
            .types
            .iter()
            .filter(|(_, t)| !t.acked)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    pub fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&*self.lock()).expect("the status serializes")
    }
}

/// Follows istiod-lite and keeps the proxy's config in line with it.
pub struct XdsClient<R: ResourceSet = Resources> {
    addr: ControlPlaneAddr,
    channel: Channel,
    token: Token,
    cluster_id: Option<AsciiMetadataValue>,
    node: Node,
    status: XdsStatus,
    report: Arc<dyn XdsReport>,
    /// Taken by [`run`](Self::run), which owns it from then on.
    resources: Option<R>,
    /// Runs after every response that changed what is held.
    publish: Box<dyn Fn(&R) + Send + Sync>,
}

/// Who a client is and where it connects: what [`XdsClient::with_resources`] needs besides
/// the resources.
pub struct ClientParts {
    pub addr: ControlPlaneAddr,
    /// See [`grpc::channel_from_config`].
    pub channel: Channel,
    pub token: Token,
    pub cluster_id: String,
    pub node: Node,
    pub status: XdsStatus,
    pub report: Arc<dyn XdsReport>,
}

/// Reconnect delays: [`INITIAL_BACKOFF`] doubling to [`MAX_BACKOFF`], each jittered by ±50%
/// (never past the cap) so ztunnels cut off together do not come back together.
struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: INITIAL_BACKOFF,
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = self.base.mul_f64(0.5 + fastrand::f64()).min(MAX_BACKOFF);
        self.base = (self.base * 2).min(MAX_BACKOFF);
        delay
    }
}

/// How a stream ended.
struct StreamEnd {
    delivered: bool,
    reason: XdsTermination,
    error: String,
}

impl XdsClient<Resources> {
    /// ztunnel's client for `addr` over `channel` (see [`grpc::channel_from_config`]), with
    /// the token, node name and cluster id of `cfg`, reporting to `status`. `on_change` runs
    /// after every update applied to `store`.
    pub fn new(
        cfg: &Config,
        addr: &ControlPlaneAddr,
        channel: Channel,
        store: Store,
        metrics: Metrics,
        status: XdsStatus,
        on_change: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        let parts = ClientParts {
            addr: addr.clone(),
            channel,
            token: Token::new(cfg.token_file.clone()),
            cluster_id: cfg.cluster_id.clone(),
            node: node(&cfg.node_name),
            status,
            report: Arc::new(metrics),
        };
        Self::with_resources(parts, Resources::default(), move |r: &Resources| {
            store.replace(r.snapshot());
            on_change();
        })
    }
}

impl<R: ResourceSet> XdsClient<R> {
    /// A client subscribing to what `resources` holds; `publish` runs after every response
    /// that changed it.
    pub fn with_resources(
        parts: ClientParts,
        resources: R,
        publish: impl Fn(&R) + Send + Sync + 'static,
    ) -> Self {
        Self {
            addr: parts.addr,
            channel: parts.channel,
            token: parts.token,
            cluster_id: AsciiMetadataValue::try_from(parts.cluster_id.as_str()).ok(),
            node: parts.node,
            status: parts.status,
            report: parts.report,
            resources: Some(resources),
            publish: Box::new(publish),
        }
    }

    pub fn status(&self) -> XdsStatus {
        self.status.clone()
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        let Some(mut resources) = self.resources.take() else {
            return;
        };
        let mut backoff = Backoff::default();
        let mut reported: Option<String> = None;
        loop {
            let end = self.stream(&mut resources).await;
            {
                let mut s = self.status.lock();
                s.connected = false;
                s.last_error = Some(end.error.clone());
            }
            self.report.connected(false);
            self.report.terminated(end.reason);
            if end.delivered {
                backoff = Backoff::default();
                reported = None;
            }
            let delay = backoff.next_delay();
            // A failure is logged once; the same failure again, retry after retry, quietly.
            if reported.as_ref() != Some(&end.error) {
                warn!(
                    addr = %self.addr,
                    reason = ?end.reason,
                    error = %end.error,
                    retry_in_ms = delay.as_millis() as u64,
                    "xDS stream to istiod-lite ended; keeping the last config and retrying"
                );
                reported = Some(end.error.clone());
            } else {
                debug!(
                    addr = %self.addr,
                    reason = ?end.reason,
                    error = %end.error,
                    retry_in_ms = delay.as_millis() as u64,
                    "xDS stream to istiod-lite ended again"
                );
            }
            tokio::time::sleep(delay).await;
            self.report.reconnecting();
        }
    }

    /// One stream, from opening to its end.
    async fn stream(&self, resources: &mut R) -> StreamEnd {
        let end = |delivered, reason, error: String| StreamEnd {
            delivered,
            reason,
            error,
        };
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        for t in R::TYPE_URLS {
            let _ = tx.send(resources.initial_request(t, &self.node));
        }
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let mut request = tonic::Request::new(outbound);
        if let Err(e) = self.token.add_to(request.metadata_mut()) {
            return end(false, XdsTermination::token_unreadable, e.to_string());
        }
        if let Some(c) = &self.cluster_id {
            request.metadata_mut().insert("clusterid", c.clone());
        }
        // A control plane that does not split large pushes may send more than gRPC's 4 MiB
        // default in one response.
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut inbound = match client.delta_aggregated_resources(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let reason = match status.code() {
                    tonic::Code::Unavailable => XdsTermination::connect_failed,
                    _ => XdsTermination::refused,
                };
                return end(false, reason, describe_status(&self.addr, &status));
            }
        };
        info!(addr = %self.addr, "xDS stream to istiod-lite established");
        self.status.lock().connected = true;
        self.report.connected(true);
        let mut delivered = false;
        loop {
            let resp = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return end(
                        delivered,
                        XdsTermination::stream_closed,
                        "istiod-lite closed the stream".to_owned(),
                    );
                }
                Err(status) => {
                    return end(
                        delivered,
                        XdsTermination::stream_error,
                        describe_status(&self.addr, &status),
                    );
                }
            };
            delivered = true;
            let applied = resources.apply(&resp);
            if applied.changed {
                (self.publish)(resources);
            }
            let partial = resp
                .system_version_info
                .ends_with(mesh_proto::PARTIAL_PUSH_SUFFIX);
            self.record(&resp.type_url, &resp.nonce, &applied, resources, partial);
            if applied.is_ack() {
                debug!(
                    type_url = %resp.type_url,
                    nonce = %resp.nonce,
                    resources = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    "xDS update applied"
                );
            } else {
                self.report.nacked();
                let message = applied
                    .reply
                    .error_detail
                    .as_ref()
                    .map(|s| s.message.as_str())
                    .unwrap_or_default();
                warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "xDS update rejected in part (NACK); the valid resources were applied");
            }
            if tx.send(applied.reply).is_err() {
                return end(
                    delivered,
                    XdsTermination::stream_error,
                    "the request stream closed".to_owned(),
                );
            }
        }
    }

    fn record(&self, type_url: &str, nonce: &str, applied: &Applied, resources: &R, partial: bool) {
        let mut s = self.status.lock();
        let Some(t) = s.types.get_mut(type_url) else {
            return;
        };
        t.resources = resources.len(type_url);
        match &applied.reply.error_detail {
            None => {
                // The first parts of a split push leave the proxy unready until the rest.
                if !partial {
                    t.acked = true;
                }
                t.last_acked_nonce = Some(nonce.to_owned());
            }
            Some(e) => t.last_nack = Some(e.message.clone()),
        }
    }
}

/// A gRPC failure in words that point at the likely cause.
fn describe_status(addr: &ControlPlaneAddr, status: &tonic::Status) -> String {
    let detail = grpc::status_detail(status);
    match status.code() {
        tonic::Code::Unavailable => format!("cannot reach istiod-lite at {addr}: {detail}"),
        tonic::Code::Unauthenticated => format!(
            "istiod-lite at {addr} did not accept our credentials: {detail} (is the token file current?)"
        ),
        tonic::Code::PermissionDenied => {
            format!("istiod-lite at {addr} refused the xDS stream: {detail}")
        }
        tonic::Code::Unimplemented => format!(
            "{addr} does not serve delta xDS (DeltaAggregatedResources): {detail}; is it istiod-lite?"
        ),
        code => format!("xDS stream to {addr} failed: {code:?}: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_the_ztunnel_and_its_node() {
        let n = node("worker-1");
        assert_eq!(
            n.id,
            "ztunnel~0.0.0.0~worker-1.istio-system~istio-system.svc.cluster.local"
        );
        let md = n.metadata.unwrap().fields;
        let s = |k: &str| match &md[k].kind {
            Some(prost_types::value::Kind::StringValue(v)) => v.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("NODE_NAME"), "worker-1");
        assert_eq!(s("NAMESPACE"), "istio-system");
        assert_eq!(s("NAME"), "worker-1");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        let bounds = |base: Duration| (base / 2, (base * 3 / 2).min(MAX_BACKOFF));
        let mut base = INITIAL_BACKOFF;
        for _ in 0..12 {
            let d = b.next_delay();
            let (lo, hi) = bounds(base);
            assert!(d >= lo && d <= hi, "{d:?} not within {lo:?}..{hi:?}");
            base = (base * 2).min(MAX_BACKOFF);
        }
        assert_eq!(b.base, MAX_BACKOFF);
        assert!(Backoff::default().next_delay() <= INITIAL_BACKOFF * 3 / 2);
    }

    #[test]
    fn status_is_ready_once_every_type_is_acked() {
        let addr: ControlPlaneAddr = "http://127.0.0.1:15010".parse().unwrap();
        let s = XdsStatus::new(&addr);
        assert!(!s.is_ready());
        assert_eq!(s.waiting_for().len(), 2);
        s.lock()
            .types
            .get_mut(mesh_proto::ADDRESS_TYPE_URL)
            .unwrap()
            .acked = true;
        assert_eq!(s.waiting_for(), vec![mesh_proto::AUTHORIZATION_TYPE_URL]);
        s.lock()
            .types
            .get_mut(mesh_proto::AUTHORIZATION_TYPE_URL)
            .unwrap()
            .acked = true;
        assert!(s.is_ready());
        assert_eq!(s.dump()["address"], "http://127.0.0.1:15010");
    }
}

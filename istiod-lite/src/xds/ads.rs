//! The delta ADS stream: one task per connected proxy.
//!
//! Per type the server remembers what the proxy holds (name → version) and keeps at most one
//! response in flight. A newer snapshot arriving while a response is unanswered waits for the
//! answer, so bursts of changes coalesce into one push per proxy and a slow proxy never builds a
//! queue. A NACK is logged and counted; the proxy keeps its last good version of what it
//! rejected, and the server does not resend it until it changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_proto::discovery::{self, DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::registry::{Registry, SubscriberStatus, TypeStatus};
use super::{Resource, Snapshot, TYPE_URLS};
use crate::auth::{self, Authenticator};
use crate::metrics::{Metrics, TypeLabels, XdsType};
use crate::server::PeerInfo;

/// Resource bytes per response: a full push is split into several responses, each answered
/// before the next is sent, so no message nears the 4 MiB a gRPC client accepts by default.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Responses queued toward one proxy; one per type in flight plus slack.
const OUTBOUND_QUEUE: usize = 4;

#[derive(Clone)]
pub struct AdsService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    authenticator: Option<Arc<dyn Authenticator>>,
    max_response_bytes: usize,
}

impl AdsService {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        authenticator: Option<Arc<dyn Authenticator>>,
    ) -> Self {
        Self {
            snapshots,
            registry,
            metrics,
            authenticator,
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }

    /// Splits pushes at `bytes` of resources instead of [`MAX_RESPONSE_BYTES`].
    pub fn with_max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes.max(1);
        self
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        // On the TLS port every stream authenticates; the plaintext port is for local use.
        let authenticated_as = match (&self.authenticator, peer.as_ref().is_some_and(|p| p.secure))
        {
            (Some(a), true) => {
                let token = auth::bearer(request.metadata())
                    .map_err(|e| Status::unauthenticated(e.to_string()))?;
                let who = a
                    .authenticate(token)
                    .await
                    .map_err(|e| Status::unauthenticated(e.to_string()))?;
                if let Some(p) = &peer {
                    p.mark_authenticated();
                }
                Some(who.to_string())
            }
            _ => None,
        };
        let status = self
            .registry
            .add(peer.as_ref().map(|p| p.addr), authenticated_as);
        let id = status.lock().expect("subscriber lock poisoned").id;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let conn = Connection {
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
            status,
            types: HashMap::new(),
            tx,
            nonce: 0,
            max_response_bytes: self.max_response_bytes,
        };
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        let inbound = request.into_inner();
        let span = info_span!("xds", conn = id, peer = ?peer.map(|p| p.addr));
        tokio::spawn(
            async move {
                metrics.xds_connections.inc();
                let reason = conn.run(inbound).await;
                metrics.xds_connections.dec();
                registry.remove(id);
                info!(reason, "xds stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Per-type state of one stream.
#[derive(Default)]
struct TypeState {
    subscribed: bool,
    client: Holding,
    pending: Option<Pending>,
}

/// What the proxy holds of one type, as far as the server knows.
enum Holding {
    /// Exactly that snapshot's resources: the common case, and it costs nothing per resource.
    Snapshot(Arc<Snapshot>),
    /// The first `n` resources (in name order) of that snapshot: a split push under way.
    Prefix(Arc<Snapshot>, usize),
    /// Some other set (what a reconnecting proxy said it had, or a split push overtaken by a
    /// newer snapshot): name → version hash.
    Names(HashMap<String, u64>),
}

impl Default for Holding {
    fn default() -> Self {
        Holding::Names(HashMap::new())
    }
}

impl Holding {
    fn len(&self, type_url: &str) -> usize {
        match self {
            Holding::Snapshot(s) => s.of_type(type_url).map_or(0, |m| m.len()),
            Holding::Prefix(_, n) => *n,
            Holding::Names(m) => m.len(),
        }
    }
}

/// Versions from a proxy are the server's own hex hashes; anything else never matches.
fn parse_version(v: &str) -> u64 {
    u64::from_str_radix(v, 16).unwrap_or(u64::MAX)
}

struct Pending {
    nonce: String,
    snapshot: u64,
    /// More of this snapshot is still to send (the response was split).
    more: bool,
    sent_at: Instant,
}

struct Connection {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<SubscriberStatus>>,
    types: HashMap<&'static str, TypeState>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    nonce: u64,
    max_response_bytes: usize,
}

impl Connection {
    /// Serves the stream until either side ends it; returns why it ended.
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) -> &'static str {
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(reason) = self.on_request(req).await {
                            return reason;
                        }
                    }
                    Ok(None) => return "proxy closed the stream",
                    Err(e) => {
                        debug!(error = %e, "xds stream error");
                        return "stream error";
                    }
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return "server shutting down";
                    }
                    if let Err(reason) = self.push_all().await {
                        return reason;
                    }
                }
                _ = self.tx.closed() => return "proxy went away",
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), &'static str> {
        let Some(type_url) = TYPE_URLS.iter().copied().find(|t| *t == req.type_url) else {
            warn!(type_url = %req.type_url, "subscription to an unknown type ignored");
            return Ok(());
        };
        if let Some(node) = &req.node {
            let mut st = self.status.lock().expect("subscriber lock poisoned");
            if st.node_id.is_empty() {
                st.node_id = node.id.clone();
                st.node_name = node_name(node);
                info!(node = %st.node_id, node_name = %st.node_name, "proxy connected");
            }
        }
        let state = self.types.entry(type_url).or_default();
        if req.response_nonce.is_empty() {
            // A (re)subscription. On reconnect the proxy says what it already holds, so only
            // the difference and the removals are sent.
            if !state.subscribed {
                state.subscribed = true;
                state.client = Holding::Names(
                    req.initial_resource_versions
                        .into_iter()
                        .map(|(n, v)| {
                            let h = parse_version(&v);
                            (n, h)
                        })
                        .collect(),
                );
                state.pending = None;
                return self.push(type_url, true).await;
            }
            return Ok(());
        }
        let Some(pending) = state.pending.as_ref() else {
            return Ok(()); // An answer to nothing outstanding.
        };
        if pending.nonce != req.response_nonce {
            debug!(nonce = %req.response_nonce, "answer to a superseded response ignored");
            return Ok(());
        }
        let pending = state.pending.take().expect("checked above");
        let more = pending.more;
        {
            let mut st = self.status.lock().expect("subscriber lock poisoned");
            let ts = st.types.entry(type_url.to_owned()).or_default();
            ts.pending_nonce = None;
            match &req.error_detail {
                Some(err) => {
                    ts.nacks += 1;
                    ts.last_nack = Some(err.message.clone());
                    self.metrics
                        .rejects
                        .get_or_create(&TypeLabels {
                            r#type: XdsType::of(type_url),
                        })
                        .inc();
                    warn!(
                        node = %st.node_id,
                        type_url,
                        error = %err.message,
                        "proxy rejected config; it keeps its last good version of what it rejected"
                    );
                }
                None => {
                    if !more {
                        ts.acked_version = pending.snapshot;
                        ts.acked_at = Some(SystemTime::now());
                    }
                    debug!(
                        type_url,
                        version = pending.snapshot,
                        rtt_us = pending.sent_at.elapsed().as_micros() as u64,
                        "ack"
                    );
                }
            }
        }
        let newer = self.snapshots.borrow().version > pending.snapshot;
        if more || newer {
            self.push(type_url, false).await?;
        }
        Ok(())
    }

    async fn push_all(&mut self) -> Result<(), &'static str> {
        for t in TYPE_URLS {
            let ready = self
                .types
                .get(t)
                .is_some_and(|s| s.subscribed && s.pending.is_none());
            if ready {
                self.push(t, false).await?;
            }
        }
        Ok(())
    }

    /// Sends what the proxy lacks of the current snapshot (at most [`MAX_RESPONSE_BYTES`] of it).
    /// `always` sends even an empty response (the answer to a new subscription).
    async fn push(&mut self, type_url: &'static str, always: bool) -> Result<(), &'static str> {
        let snap = self.snapshots.borrow().clone();
        let state = self.types.entry(type_url).or_default();
        let (changed, removed) = diff(&state.client, &snap, type_url);
        if changed.is_empty() && removed.is_empty() && !always {
            state.client = Holding::Snapshot(snap);
            return Ok(());
        }
        // Everything that goes on the wire counts against the budget: names, versions and
        // type URLs as well as bodies, and removals too.
        let per_resource = type_url.len() + 24;
        let mut bytes = 0;
        let mut more = false;
        let mut removed_now = Vec::new();
        for n in removed {
            if bytes > 0 && bytes + n.len() + 4 > self.max_response_bytes {
                more = true;
                break;
            }
            bytes += n.len() + 4;
            removed_now.push(n);
        }
        let removed = removed_now;
        let mut resources = Vec::new();
        for r in &changed {
            if more {
                break;
            }
            let size = r.body.len() + r.name.len() + r.version.len() + per_resource;
            if bytes > 0 && bytes + size > self.max_response_bytes {
                more = true;
                break;
            }
            bytes += size;
            resources.push(discovery::Resource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_owned(),
                    value: r.body.clone(),
                }),
                ..Default::default()
            });
        }
        state.client = if more {
            // Only part went out: remember how far the proxy got.
            let mut has = match std::mem::take(&mut state.client) {
                Holding::Prefix(base, n) if Arc::ptr_eq(&base, &snap) => {
                    Holding::Prefix(base, n + resources.len())
                }
                Holding::Names(m) if m.is_empty() && removed.is_empty() => {
                    Holding::Prefix(snap.clone(), resources.len())
                }
                other => Holding::Names(names_of(other, type_url)),
            };
            if let Holding::Names(has) = &mut has {
                for n in &removed {
                    has.remove(n);
                }
                for r in &changed[..resources.len()] {
                    has.insert(r.name.clone(), r.hash);
                }
            }
            has
        } else {
            Holding::Snapshot(snap.clone())
        };

        self.nonce += 1;
        let nonce = format!("{}-{}", snap.version, self.nonce);
        state.pending = Some(Pending {
            nonce: nonce.clone(),
            snapshot: snap.version,
            more,
            sent_at: Instant::now(),
        });
        {
            let mut st = self.status.lock().expect("subscriber lock poisoned");
            let ts: &mut TypeStatus = st.types.entry(type_url.to_owned()).or_default();
            ts.sent_version = snap.version;
            ts.pending_nonce = Some(nonce.clone());
            ts.resources = state.client.len(type_url);
        }
        self.metrics
            .pushes
            .get_or_create(&TypeLabels {
                r#type: XdsType::of(type_url),
            })
            .inc();
        debug!(
            type_url,
            version = snap.version,
            resources = resources.len(),
            removed = removed.len(),
            more,
            "push"
        );
        let resp = DeltaDiscoveryResponse {
            // A proxy must not count itself ready on the first part of a split push.
            system_version_info: if more {
                format!("{}{}", snap.version, mesh_proto::PARTIAL_PUSH_SUFFIX)
            } else {
                snap.version.to_string()
            },
            resources,
            type_url: type_url.to_owned(),
            nonce,
            removed_resources: removed,
        };
        self.tx.send(Ok(resp)).await.map_err(|_| "proxy went away")
    }
}

/// What a proxy holding `held` lacks of `snap`: changed resources, and names to remove.
fn diff(held: &Holding, snap: &Snapshot, type_url: &str) -> (Vec<Arc<Resource>>, Vec<String>) {
    let empty = BTreeMap::new();
    let current = snap.of_type(type_url).unwrap_or(&empty);
    match held {
        Holding::Snapshot(base) if base.version == snap.version => (vec![], vec![]),
        // One snapshot behind: the snapshot already knows what changed.
        Holding::Snapshot(base) if base.version + 1 == snap.version => {
            match snap.deltas.get(type_url) {
                Some(d) => (d.changed.clone(), d.removed.clone()),
                None => (vec![], vec![]),
            }
        }
        Holding::Snapshot(base) => {
            // Further behind: walk both sorted maps once; shared resources compare by pointer.
            let old = base.of_type(type_url).unwrap_or(&empty);
            let changed = current
                .iter()
                .filter(|(n, r)| {
                    old.get(*n)
                        .is_none_or(|o| !Arc::ptr_eq(o, r) && o.hash != r.hash)
                })
                .map(|(_, r)| r.clone())
                .collect();
            let removed = old
                .keys()
                .filter(|n| !current.contains_key(*n))
                .cloned()
                .collect();
            (changed, removed)
        }
        Holding::Prefix(base, n) if base.version == snap.version => {
            (current.values().skip(*n).cloned().collect(), vec![])
        }
        Holding::Prefix(base, n) => {
            let has = names_of(Holding::Prefix(base.clone(), *n), type_url);
            diff(&Holding::Names(has), snap, type_url)
        }
        Holding::Names(has) => {
            let changed = current
                .iter()
                .filter(|(n, r)| has.get(*n) != Some(&r.hash))
                .map(|(_, r)| r.clone())
                .collect();
            let mut removed: Vec<String> = has
                .keys()
                .filter(|n| !current.contains_key(*n))
                .cloned()
                .collect();
            removed.sort();
            (changed, removed)
        }
    }
}

/// The names and versions a holding stands for.
fn names_of(held: Holding, type_url: &str) -> HashMap<String, u64> {
    match held {
        Holding::Names(m) => m,
        Holding::Snapshot(base) => base
            .of_type(type_url)
            .into_iter()
            .flatten()
            .map(|(n, r)| (n.clone(), r.hash))
            .collect(),
        Holding::Prefix(base, n) => base
            .of_type(type_url)
            .into_iter()
            .flatten()
            .take(n)
            .map(|(n, r)| (n.clone(), r.hash))
            .collect(),
    }
}

/// The node name from the proxy's metadata (`NODE_NAME`), else from its id.
fn node_name(node: &discovery::Node) -> String {
    use prost_types::value::Kind;
    let from_meta = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("NODE_NAME"))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    from_meta.unwrap_or_default()
}

//! Request metrics with Istio's names and labels, and the waypoint's own xDS counters.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use ztunnel::metrics::{XdsTermination, XdsTerminationLabels};
use ztunnel::xds::XdsReport;

/// The labels of every request metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The policy that refused the request, if one did.
    pub response_flags: &'static str,
}

/// Request durations in milliseconds, as Istio buckets them.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Sizes in bytes: 1 to 10^8.
fn size_buckets() -> impl Iterator<Item = f64> {
    (0..9).map(|i| 10f64.powi(i))
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    xds_nacks: Counter,
    xds_reconnects: Counter,
    xds_connected: Gauge,
    xds_terminations: Family<XdsTerminationLabels, Counter>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(DURATION_BUCKETS)
        });
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(size_buckets())
        });
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(size_buckets())
        });
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to the end of its response, in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes in bytes",
            response_bytes.clone(),
        );
        let xds_nacks = Counter::default();
        let xds_reconnects = Counter::default();
        let xds_connected = Gauge::default();
        let xds_terminations = Family::<XdsTerminationLabels, Counter>::default();
        registry.register(
            "waypoint_xds_nacks_sent",
            "xDS responses rejected in whole or part (NACKed); the valid resources were applied",
            xds_nacks.clone(),
        );
        registry.register(
            "waypoint_xds_reconnects",
            "Attempts to reopen the xDS stream to istiod-lite",
            xds_reconnects.clone(),
        );
        registry.register(
            "waypoint_xds_connected",
            "1 while an xDS stream to istiod-lite is established",
            xds_connected.clone(),
        );
        registry.register(
            "waypoint_xds_connection_terminations",
            "xDS streams that ended or could not be opened, by reason",
            xds_terminations.clone(),
        );
        Self {
            requests,
            duration,
            request_bytes,
            response_bytes,
            xds_nacks,
            xds_reconnects,
            xds_connected,
            xds_terminations,
            registry: Arc::new(registry),
        }
    }

    /// Records one finished request.
    pub fn request(&self, labels: &RequestLabels, millis: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(resp_bytes as f64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl XdsReport for Metrics {
    fn connected(&self, up: bool) {
        self.xds_connected.set(i64::from(up));
    }

    fn terminated(&self, reason: XdsTermination) {
        self.xds_terminations
            .get_or_create(&XdsTerminationLabels { reason })
            .inc();
    }

    fn reconnecting(&self) {
        self.xds_reconnects.inc();
    }

    fn nacked(&self) {
        self.xds_nacks.inc();
    }
}

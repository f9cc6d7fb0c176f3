//! istiod-lite's Prometheus metrics, named as Istio's control plane names them where it has
//! an equivalent.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum XdsType {
    address,
    authorization,
    route,
    waypoint_policy,
}

impl XdsType {
    pub fn of(type_url: &str) -> XdsType {
        match type_url {
            mesh_proto::AUTHORIZATION_TYPE_URL => XdsType::authorization,
            mesh_proto::ROUTE_TYPE_URL => XdsType::route,
            mesh_proto::WAYPOINT_POLICY_TYPE_URL => XdsType::waypoint_policy,
            _ => XdsType::address,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub r#type: XdsType,
}

/// Why a certificate request was refused; bounded, so it can be a label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CaRefusal {
    unauthenticated,
    not_authorized,
    bad_request,
    sign_failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaRefusalLabels {
    pub reason: CaRefusal,
}

pub struct Metrics {
    pub registry: Registry,
    /// Connected xDS streams.
    pub xds_connections: Gauge,
    pub pushes: Family<TypeLabels, Counter>,
    pub rejects: Family<TypeLabels, Counter>,
    pub config_errors: Gauge,
    pub translate_seconds: Histogram,
    pub certs_issued: Counter,
    pub ca_refusals: Family<CaRefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let xds_connections = Gauge::default();
        registry.register(
            "pilot_xds",
            "Connected xDS streams",
            xds_connections.clone(),
        );
        let pushes = Family::<TypeLabels, Counter>::default();
        registry.register(
            "pilot_xds_pushes",
            "xDS responses sent, by resource type",
            pushes.clone(),
        );
        let rejects = Family::<TypeLabels, Counter>::default();
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses a proxy rejected (NACKed), by resource type",
            rejects.clone(),
        );
        let config_errors = Gauge::default();
        registry.register(
            "istiod_config_errors",
            "Config objects currently rejected (see /debug/errors)",
            config_errors.clone(),
        );
        let translate_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "istiod_translate_seconds",
            "Time to translate the desired state into xDS resources",
            translate_seconds.clone(),
        );
        let certs_issued = Counter::default();
        registry.register(
            "citadel_server_success_cert_issuance",
            "Workload certificates signed",
            certs_issued.clone(),
        );
        let ca_refusals = Family::<CaRefusalLabels, Counter>::default();
        registry.register(
            "istiod_ca_refusals",
            "Certificate requests refused, by reason",
            ca_refusals.clone(),
        );
        Self {
            registry,
            xds_connections,
            pushes,
            rejects,
            config_errors,
            translate_seconds,
            certs_issued,
            ca_refusals,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

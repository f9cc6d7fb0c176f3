//! Desired state → the resources every ztunnel is sent. A pure function of a [`State`]
//! snapshot: no I/O, no clock, so it is tested table-style without any source or server.
//!
//! The semantics follow Istio's ambient controller where users would notice a difference
//! (resource names, enrolment, waypoint precedence, policy scopes and the L7 fail-safe); see
//! docs/architecture.md for where and why this project differs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_proto::security::Authorization;
use mesh_proto::workload::{
    self, Address, GatewayAddress, NamespacedHostname, NetworkAddress, address, gateway_address,
};

use crate::model::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, Gateway, Kind, Namespace,
    Object, Pod, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_CLASS,
    WAYPOINT_FOR_LABEL,
};
use crate::store::State;

mod policy;
pub mod routes;
pub mod status;
mod waypoint_policy;
mod workloads;

pub use status::{Condition, ObjectStatus};

/// Mesh-wide settings translation depends on.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub cluster_id: String,
    pub trust_domain: String,
    /// Policies here apply mesh-wide.
    pub root_namespace: String,
    /// DNS suffix of service hostnames (`svc.<suffix>`).
    pub domain_suffix: String,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".into(),
            trust_domain: mesh_core::identity::DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: "istio-system".into(),
            domain_suffix: "cluster.local".into(),
        }
    }
}

/// Label on the objects the mesh controller makes for a waypoint Gateway.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_BY_MESH: &str = "istio.io-mesh-controller";

/// Port of a waypoint's HBONE listener.
pub const WAYPOINT_HBONE_PORT: u32 = 15008;

/// Everything translation produces.
#[derive(Debug, Default)]
pub struct Output {
    /// `istio.workload.Address` resources by xDS name (workload uid, or `ns/hostname`).
    pub addresses: BTreeMap<String, Address>,
    /// `istio.security.Authorization` resources by `ns/name`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// `ambient.waypoint.Route` resources by `ns/httproute|grpcroute/name`.
    pub routes: BTreeMap<String, mesh_proto::waypoint::Route>,
    /// `ambient.waypoint.Policy` resources (targetRef AuthorizationPolicies) by `ns/name`.
    pub waypoint_policies: BTreeMap<String, mesh_proto::waypoint::Policy>,
    /// Computed status of Gateways, routes and policies.
    pub statuses: Vec<ObjectStatus>,
    /// Things that are valid YAML but do not do what the user probably meant.
    pub warnings: Vec<String>,
}

/// Translates the whole state.
pub fn translate(state: &State, opts: &MeshOptions) -> Output {
    let idx = Index::new(state, opts);
    let mut out = Output::default();
    policy::translate(&idx, &mut out);
    waypoint_policy::translate(&idx, &mut out);
    workloads::translate(&idx, &mut out);
    routes::translate(&idx, &mut out);
    status::compute(&idx, &mut out);
    out
}

/// Whether each pod is enrolled in the mesh, by (namespace, name): what a node agent captures.
pub fn enrolment(state: &State, opts: &MeshOptions) -> BTreeMap<(String, String), bool> {
    let idx = Index::new(state, opts);
    idx.pods
        .iter()
        .map(|p| {
            let key = (p.metadata.namespace.clone(), p.metadata.name.clone());
            (key, idx.is_ambient(p))
        })
        .collect()
}

/// Only routes, and the status of Gateways and routes: these may refer across namespaces, so
/// they are translated from the whole state (there are few of them).
pub fn gateways_and_routes(state: &State, opts: &MeshOptions) -> Output {
    let has_any = state.of_kind(Kind::Gateway).next().is_some()
        || state.of_kind(Kind::HTTPRoute).next().is_some()
        || state.of_kind(Kind::GRPCRoute).next().is_some();
    let mut out = Output::default();
    if !has_any {
        return out;
    }
    let idx = Index::new(state, opts);
    routes::translate(&idx, &mut out);
    status::compute(&idx, &mut out);
    out
}

/// The state, indexed for translation.
pub(crate) struct Index<'a> {
    pub opts: &'a MeshOptions,
    pub namespaces: HashMap<&'a str, &'a Namespace>,
    pub pods: Vec<&'a Pod>,
    pub pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    pub services: Vec<&'a crate::model::Service>,
    pub services_by_ns: HashMap<&'a str, Vec<&'a crate::model::Service>>,
    pub slices: Vec<&'a crate::model::EndpointSlice>,
    pub gateways: HashMap<(&'a str, &'a str), &'a Gateway>,
    pub routes: Vec<(Kind, &'a crate::model::Route)>,
    pub policies: Vec<&'a crate::model::AuthorizationPolicy>,
    pub peer_authns: Vec<&'a crate::model::PeerAuthentication>,
    pub grants: Vec<&'a crate::model::ReferenceGrant>,
}

impl<'a> Index<'a> {
    fn new(state: &'a State, opts: &'a MeshOptions) -> Self {
        let mut idx = Index {
            opts,
            namespaces: HashMap::new(),
            pods: Vec::new(),
            pods_by_ns: HashMap::new(),
            services: Vec::new(),
            services_by_ns: HashMap::new(),
            slices: Vec::new(),
            gateways: HashMap::new(),
            routes: Vec::new(),
            policies: Vec::new(),
            peer_authns: Vec::new(),
            grants: Vec::new(),
        };
        for o in state.objects.values() {
            let o: &'a Arc<Object> = o;
            match &**o {
                Object::Namespace(n) => {
                    idx.namespaces.insert(&n.metadata.name, n);
                }
                Object::Pod(p) => {
                    idx.pods.push(p);
                    idx.pods_by_ns
                        .entry(&p.metadata.namespace)
                        .or_default()
                        .push(p);
                }
                Object::Service(s) => {
                    idx.services.push(s);
                    idx.services_by_ns
                        .entry(&s.metadata.namespace)
                        .or_default()
                        .push(s);
                }
                Object::EndpointSlice(e) => idx.slices.push(e),
                Object::Gateway(g) => {
                    idx.gateways
                        .insert((&g.metadata.namespace, &g.metadata.name), g);
                }
                Object::HTTPRoute(r) => idx.routes.push((Kind::HTTPRoute, r)),
                Object::GRPCRoute(r) => idx.routes.push((Kind::GRPCRoute, r)),
                Object::AuthorizationPolicy(p) => idx.policies.push(p),
                Object::PeerAuthentication(p) => idx.peer_authns.push(p),
                Object::ReferenceGrant(g) => idx.grants.push(g),
                Object::ServiceAccount(_) => {}
            }
        }
        idx
    }

    fn namespace_label(&self, ns: &str, label: &str) -> Option<&'a str> {
        self.namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.get(label))
            .map(String::as_str)
    }

    /// Enrolled in the mesh: the pod says `ambient`, or its namespace does and the pod does not
    /// say `none`. Host-network pods cannot be captured and never are.
    pub fn is_ambient(&self, pod: &Pod) -> bool {
        if pod.spec.host_network {
            return false;
        }
        match pod
            .metadata
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str)
        {
            Some(DATAPLANE_MODE_AMBIENT) => true,
            Some(DATAPLANE_MODE_NONE) => false,
            _ => {
                self.namespace_label(&pod.metadata.namespace, DATAPLANE_MODE_LABEL)
                    == Some(DATAPLANE_MODE_AMBIENT)
            }
        }
    }

    pub fn service(&self, ns: &str, name: &str) -> Option<&'a crate::model::Service> {
        self.services_by_ns
            .get(ns)?
            .iter()
            .find(|s| s.metadata.name == name)
            .copied()
    }

    /// The Service of a waypoint: named like a waypoint Gateway in its namespace, or labelled
    /// as managed by the mesh controller.
    pub fn is_waypoint_service(&self, svc: &crate::model::Service) -> bool {
        let m = &svc.metadata;
        m.labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_BY_MESH)
            || self
                .gateways
                .get(&(m.namespace.as_str(), m.name.as_str()))
                .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
    }

    pub fn hostname(&self, ns: &str, name: &str) -> String {
        format!("{name}.{ns}.svc.{}", self.opts.domain_suffix)
    }

    /// The waypoint named by `labels` (or, if they say nothing, by the namespace), if it exists
    /// and accepts `traffic` ("service" or "workload").
    pub fn waypoint_for(
        &self,
        labels: &BTreeMap<String, String>,
        ns: &str,
        traffic: &str,
    ) -> Result<Option<GatewayAddress>, String> {
        let (name, wp_ns) = match labels.get(USE_WAYPOINT_LABEL) {
            Some(n) => (
                n.as_str(),
                labels
                    .get(USE_WAYPOINT_NAMESPACE_LABEL)
                    .map_or(ns, String::as_str),
            ),
            None => match self.namespace_label(ns, USE_WAYPOINT_LABEL) {
                Some(n) => (
                    n,
                    self.namespace_label(ns, USE_WAYPOINT_NAMESPACE_LABEL)
                        .unwrap_or(ns),
                ),
                None => return Ok(None),
            },
        };
        if name == "none" {
            return Ok(None);
        }
        let Some(gw) = self.gateways.get(&(wp_ns, name)) else {
            return Err(format!("waypoint {wp_ns}/{name} does not exist"));
        };
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            return Err(format!(
                "Gateway {wp_ns}/{name} is of class {:?}, not {WAYPOINT_CLASS:?}",
                gw.spec.gateway_class_name
            ));
        }
        let accepts = gw
            .metadata
            .labels
            .get(WAYPOINT_FOR_LABEL)
            .map_or("service", String::as_str);
        if accepts != "all" && accepts != traffic {
            return Err(format!(
                "waypoint {wp_ns}/{name} is for {accepts} traffic, not {traffic} traffic"
            ));
        }
        Ok(Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: wp_ns.to_owned(),
                hostname: self.hostname(wp_ns, name),
            })),
            hbone_mtls_port: WAYPOINT_HBONE_PORT,
        }))
    }
}

pub(crate) fn network_address(ip: IpAddr) -> NetworkAddress {
    NetworkAddress {
        network: String::new(),
        address: ip_bytes(ip),
        length: None,
    }
}

pub(crate) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub(crate) fn service_address(svc: workload::Service) -> Address {
    Address {
        r#type: Some(address::Type::Service(svc)),
    }
}

pub(crate) fn workload_address(w: workload::Workload) -> Address {
    Address {
        r#type: Some(address::Type::Workload(w)),
    }
}

pub(crate) fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests;

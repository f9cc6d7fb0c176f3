//! What ztunnel knows about the mesh: workloads, services and authorization policies, indexed
//! for the data path.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use mesh_core::SpiffeId;

pub mod policy;
mod waypoint;

pub use policy::{Authorization, PolicyScope};

/// How traffic to a workload is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Inside HBONE, to the workload's ztunnel.
    Hbone,
    /// As plain TCP: the workload is not in the mesh.
    Tcp,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(serialize_with = "display")]
    pub identity: SpiffeId,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub protocol: Protocol,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub healthy: bool,
    /// The waypoint traffic to this workload goes through, if any.
    pub waypoint: Option<GatewayAddress>,
    /// `namespace/name` of the policies that apply to this workload by selector.
    pub authorization_policies: Vec<String>,
    /// `namespace/hostname` of each service this workload backs, with its ports as resolved
    /// for this workload (a named target port differs from pod to pod). Empty in standalone
    /// mode, where services list their endpoints.
    pub services: BTreeMap<String, Vec<ServicePort>>,
}

impl Workload {
    /// The port this workload listens on for `service_port` of `service` (`namespace/hostname`),
    /// if the control plane resolved one.
    pub fn target_port(&self, service: &str, service_port: u16) -> Option<u16> {
        self.services
            .get(service)?
            .iter()
            .find(|p| p.port == service_port && p.target_port != 0)
            .map(|p| p.target_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// 0 when the service names its target port: then each endpoint says which port it is.
    pub target_port: u16,
    /// What the port speaks, when the Service says (`appProtocol` or the port name).
    #[serde(skip_serializing_if = "AppProtocol::is_unknown")]
    pub app_protocol: AppProtocol,
}

/// A service port's declared protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    #[default]
    Unknown,
    Http1,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    pub fn is_unknown(&self) -> bool {
        *self == AppProtocol::Unknown
    }
}

/// A waypoint (or other HBONE gateway) and the port it takes HBONE on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    #[serde(flatten)]
    pub destination: GatewayDestination,
    pub hbone_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    /// A service, by namespace and hostname.
    Hostname(NamespacedHostname),
    /// A workload or service address.
    Address(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Uids of the workloads behind the service.
    pub endpoints: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The service's own target port for `port` (the port itself when the service names its
    /// target port by name), or `None` if the service does not expose `port`.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| {
            if p.target_port == 0 {
                port
            } else {
                p.target_port
            }
        })
    }

    /// What `port` is declared to speak.
    pub fn app_protocol(&self, port: u16) -> AppProtocol {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map_or(AppProtocol::Unknown, |p| p.app_protocol)
    }

    /// How workloads and xDS name this service: `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

fn display<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// An immutable view of the mesh; replaced whole when config changes.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    services_by_host: HashMap<String, Arc<Service>>,
    /// By `namespace/name`.
    policies: HashMap<String, Arc<Authorization>>,
    /// GLOBAL policies, by key; built once so evaluation does not scan unrelated policies.
    global_policies: Vec<Arc<Authorization>>,
    /// NAMESPACE-scope policies by namespace, each list by key.
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
}

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A mesh workload (directly, or picked behind a service VIP).
    Workload {
        workload: Arc<Workload>,
        /// The workload address and target port to reach.
        addr: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// Through the waypoint of the service or workload addressed: HBONE to one of the
    /// waypoint's pods, whatever tunnel protocol that pod is listed with, asking it for
    /// `target`.
    Waypoint {
        /// The waypoint pod chosen; the server must prove its identity.
        waypoint: Arc<Workload>,
        /// That pod's address and the port it takes HBONE on.
        addr: SocketAddr,
        /// The CONNECT authority: the original destination (service VIP and port, or pod
        /// address and port).
        target: SocketAddr,
        service: Option<Arc<Service>>,
        /// The workload addressed, when the connection was for one (a pod address, or the
        /// endpoint picked behind a VIP whose own waypoint applies).
        workload: Option<Arc<Workload>>,
    },
    /// Not known to the mesh: forwarded unchanged as plain TCP.
    Passthrough(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("service {0} has no healthy endpoints")]
    NoHealthyEndpoints(String),
    #[error("service {service} does not expose port {port}")]
    UnknownPort { service: String, port: u16 },
    /// The waypoint named for the destination is not in the config: refused rather than
    /// sent around it.
    #[error(
        "waypoint {0} is not a known service or workload; traffic that must pass through it is refused"
    )]
    UnknownWaypoint(String),
    #[error("waypoint {0} has no ready endpoint")]
    NoHealthyWaypoint(String),
}

impl Snapshot {
    pub fn new(workloads: Vec<Workload>, services: Vec<Service>) -> Self {
        Self::with_policies(workloads, services, Vec::new())
    }

    pub fn with_policies(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Self {
        let mut s = Snapshot::default();
        for w in workloads {
            let w = Arc::new(w);
            for ip in &w.addresses {
                s.by_ip.insert(*ip, w.clone());
            }
            s.workloads.insert(w.uid.clone(), w);
        }
        for svc in services {
            let svc = Arc::new(svc);
            for ip in &svc.addresses {
                s.services_by_vip.insert(*ip, svc.clone());
            }
            s.services_by_host.insert(svc.hostname.clone(), svc.clone());
            s.services.insert(svc.key(), svc);
        }
        for p in policies {
            s.policies
                .insert(format!("{}/{}", p.namespace, p.name), Arc::new(p));
        }
        let mut keyed: Vec<_> = s.policies.iter().collect();
        keyed.sort_by(|a, b| a.0.cmp(b.0));
        for (_, p) in keyed {
            match p.scope {
                PolicyScope::Global => s.global_policies.push(p.clone()),
                PolicyScope::Namespace => s
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                PolicyScope::WorkloadSelector => {}
            }
        }
        s
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.services_by_host.get(host)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Every authorization policy, in no particular order.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// The policy named `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.policies.get(key)
    }

    /// GLOBAL-scope policies (they apply to every workload), ordered by key.
    pub fn global_policies(&self) -> &[Arc<Authorization>] {
        &self.global_policies
    }

    /// NAMESPACE-scope policies of `namespace`, ordered by key.
    pub fn namespace_policies(&self, namespace: &str) -> &[Arc<Authorization>] {
        self.namespace_policies
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Workloads running on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// Resolves an original destination: service VIP first, then workload address, else
    /// passthrough. Behind a VIP the target port is the endpoint's own for the service when the
    /// control plane resolved one (named target ports differ per pod), else the service's.
    /// A service or workload with a waypoint is reached through that waypoint (see
    /// [`resolve_from`](Self::resolve_from)).
    pub fn resolve(&self, dst: SocketAddr) -> Result<Destination, ResolveError> {
        self.resolve_from(None, dst)
    }

    /// [`resolve`](Self::resolve) for a connection from `source`. Waypoints apply as in
    /// Istio: a VIP whose service has a waypoint goes to that waypoint, `target` being the VIP
    /// and port; a pod address whose workload has a waypoint goes to that one, `target` being
    /// the pod address and port. A VIP whose service has none picks an endpoint, and if that
    /// endpoint has a waypoint of its own the connection goes there for the endpoint's address
    /// and target port, since the endpoint accepts nothing else. A source that is itself the
    /// waypoint in question goes straight on, so a waypoint never loops to itself. A waypoint
    /// that cannot be resolved is an error: traffic never goes around it.
    pub fn resolve_from(
        &self,
        source: Option<&Workload>,
        dst: SocketAddr,
    ) -> Result<Destination, ResolveError> {
        if let Some(svc) = self.services_by_vip.get(&dst.ip()) {
            let service_target = svc
                .target_port(dst.port())
                .ok_or(ResolveError::UnknownPort {
                    service: svc.hostname.clone(),
                    port: dst.port(),
                })?;
            if let Some(gw) = self.waypoint_to_use(svc.waypoint.as_ref(), source) {
                let (waypoint, addr) = self.waypoint_endpoint(gw, dst.is_ipv4())?;
                return Ok(Destination::Waypoint {
                    waypoint,
                    addr,
                    target: dst,
                    service: Some(svc.clone()),
                    workload: None,
                });
            }
            let w = self
                .pick_healthy(svc)
                .ok_or_else(|| ResolveError::NoHealthyEndpoints(svc.hostname.clone()))?;
            let ip = address_for(w, dst.is_ipv4())
                .expect("pick_healthy only returns workloads with an address");
            let target_port = w
                .target_port(&svc.key(), dst.port())
                .unwrap_or(service_target);
            let addr = SocketAddr::new(ip, target_port);
            if let Some(gw) = self.waypoint_to_use(w.waypoint.as_ref(), source) {
                let (waypoint, wp_addr) = self.waypoint_endpoint(gw, dst.is_ipv4())?;
                return Ok(Destination::Waypoint {
                    waypoint,
                    addr: wp_addr,
                    target: addr,
                    service: Some(svc.clone()),
                    workload: Some(w.clone()),
                });
            }
            return Ok(Destination::Workload {
                workload: w.clone(),
                addr,
                service: Some(svc.clone()),
            });
        }
        if let Some(w) = self.by_ip.get(&dst.ip()) {
            if let Some(gw) = self.waypoint_to_use(w.waypoint.as_ref(), source) {
                let (waypoint, addr) = self.waypoint_endpoint(gw, dst.is_ipv4())?;
                return Ok(Destination::Waypoint {
                    waypoint,
                    addr,
                    target: dst,
                    service: None,
                    workload: Some(w.clone()),
                });
            }
            return Ok(Destination::Workload {
                workload: w.clone(),
                addr: dst,
                service: None,
            });
        }
        Ok(Destination::Passthrough(dst))
    }

    /// A random healthy endpoint of `svc` that has an address. Allocation-free: two passes
    /// over the endpoint list.
    fn pick_healthy(&self, svc: &Service) -> Option<&Arc<Workload>> {
        let healthy = || {
            svc.endpoints
                .iter()
                .filter_map(|uid| self.workloads.get(uid))
                .filter(|w| w.healthy && !w.addresses.is_empty())
        };
        let count = healthy().count();
        if count == 0 {
            return None;
        }
        healthy().nth(fastrand::usize(..count))
    }
}

/// The address of `w` to use for a destination of the given family: one of that family if
/// it has one, else its first.
fn address_for(w: &Workload, v4: bool) -> Option<IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .or_else(|| w.addresses.first())
        .copied()
}

/// The current snapshot, swapped whole on config change. Readers take a cheap `Arc` clone
/// once per connection.
#[derive(Clone, Default)]
pub struct Store {
    current: Arc<RwLock<Arc<Snapshot>>>,
}

impl Store {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("store lock poisoned").clone()
    }

    pub fn replace(&self, next: Snapshot) {
        *self.current.write().expect("store lock poisoned") = Arc::new(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(uid: &str, ip: &str, healthy: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            identity: SpiffeId::new("cluster.local", "default", "sa").unwrap(),
            node: "n".into(),
            addresses: vec![ip.parse().unwrap()],
            protocol: Protocol::Hbone,
            canonical_name: uid.into(),
            canonical_revision: "latest".into(),
            healthy,
            waypoint: None,
            authorization_policies: vec![],
            services: BTreeMap::new(),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::new(
            vec![wl("a", "198.18.1.1", true), wl("b", "198.18.1.2", false)],
            vec![Service {
                name: "echo".into(),
                namespace: "default".into(),
                hostname: "echo.default.svc.cluster.local".into(),
                addresses: vec!["198.18.200.1".parse().unwrap()],
                ports: vec![ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: vec!["a".into(), "b".into()],
                waypoint: None,
            }],
        )
    }

    #[test]
    fn vip_resolves_to_a_healthy_endpoint_and_target_port() {
        let s = snapshot();
        for _ in 0..20 {
            match s.resolve("198.18.200.1:80".parse().unwrap()).unwrap() {
                Destination::Workload {
                    workload,
                    addr,
                    service,
                } => {
                    assert_eq!(workload.uid, "a");
                    assert_eq!(addr, "198.18.1.1:8080".parse().unwrap());
                    assert_eq!(service.unwrap().name, "echo");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_service_port_is_an_error() {
        let err = snapshot()
            .resolve("198.18.200.1:81".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service echo.default.svc.cluster.local does not expose port 81"
        );
    }

    #[test]
    fn workload_ip_is_direct_and_unknown_is_passthrough() {
        let s = snapshot();
        assert!(matches!(
            s.resolve("198.18.1.2:9".parse().unwrap()).unwrap(),
            Destination::Workload { addr, .. } if addr == "198.18.1.2:9".parse().unwrap()
        ));
        assert!(matches!(
            s.resolve("198.18.9.9:9".parse().unwrap()).unwrap(),
            Destination::Passthrough(_)
        ));
    }

    #[test]
    fn endpoint_port_mapping_wins_over_the_service_target_port() {
        let key = "default/echo.default.svc.cluster.local";
        let mut a = wl("a", "198.18.1.1", true);
        a.services.insert(
            key.into(),
            vec![
                ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 80,
                    target_port: 9090,
                },
                ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 81,
                    target_port: 0,
                },
            ],
        );
        let svc = Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec!["198.18.200.1".parse().unwrap()],
            ports: vec![
                ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 80,
                    target_port: 8080,
                },
                ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 81,
                    target_port: 8081,
                },
                ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 82,
                    target_port: 0,
                },
            ],
            endpoints: vec!["a".into()],
            waypoint: None,
        };
        let s = Snapshot::new(vec![a], vec![svc]);
        let port = |p: u16| match s.resolve(SocketAddr::new("198.18.200.1".parse().unwrap(), p)) {
            Ok(Destination::Workload { addr, .. }) => addr.port(),
            other => panic!("unexpected {other:?}"),
        };
        // The pod's own mapping; 0 there falls back to the service's; 0 there to the port.
        assert_eq!(port(80), 9090);
        assert_eq!(port(81), 8081);
        assert_eq!(port(82), 82);
    }
}

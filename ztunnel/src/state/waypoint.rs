//! Waypoints as the snapshot resolves them: which pod of a waypoint to send to, whether a
//! workload is one of a waypoint's pods, and whether a peer is.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::SpiffeId;

use super::{
    GatewayAddress, GatewayDestination, NamespacedHostname, ResolveError, Service, Snapshot,
    Workload, address_for,
};

impl Snapshot {
    /// `gw`, unless there is none or `source` is one of its own pods.
    pub(super) fn waypoint_to_use<'a>(
        &self,
        gw: Option<&'a GatewayAddress>,
        source: Option<&Workload>,
    ) -> Option<&'a GatewayAddress> {
        let gw = gw?;
        match source {
            Some(s) if self.is_waypoint_member(gw, s) => None,
            _ => Some(gw),
        }
    }

    /// The service a waypoint is named by: looked up by hostname (no allocation), by
    /// `namespace/hostname` only when that hostname belongs to another namespace's service.
    fn waypoint_service(&self, h: &NamespacedHostname) -> Option<&Arc<Service>> {
        match self.services_by_host.get(&h.hostname) {
            Some(s) if s.namespace == h.namespace => Some(s),
            _ => self
                .services
                .get(&format!("{}/{}", h.namespace, h.hostname)),
        }
    }

    /// A healthy pod of the waypoint `gw` and the address to reach it with HBONE. A waypoint
    /// named by hostname is a service: one of its ready endpoints, at random. One named by
    /// address is a service VIP (likewise) or a workload's own address.
    pub(super) fn waypoint_endpoint(
        &self,
        gw: &GatewayAddress,
        v4: bool,
    ) -> Result<(Arc<Workload>, SocketAddr), ResolveError> {
        let via_service = |svc: &Arc<Service>| {
            let w = self
                .pick_healthy(svc)
                .ok_or_else(|| ResolveError::NoHealthyWaypoint(service_name(svc)))?;
            let ip =
                address_for(w, v4).expect("pick_healthy only returns workloads with an address");
            Ok((w.clone(), SocketAddr::new(ip, gw.hbone_port)))
        };
        match &gw.destination {
            GatewayDestination::Hostname(h) => match self.waypoint_service(h) {
                Some(svc) => via_service(svc),
                None => Err(ResolveError::UnknownWaypoint(format!(
                    "{}/{}",
                    h.namespace, h.hostname
                ))),
            },
            GatewayDestination::Address(ip) => {
                if let Some(svc) = self.services_by_vip.get(ip) {
                    return via_service(svc);
                }
                match self.by_ip.get(ip) {
                    Some(w) if w.healthy => Ok((w.clone(), SocketAddr::new(*ip, gw.hbone_port))),
                    Some(w) => Err(ResolveError::NoHealthyWaypoint(format!(
                        "{}/{}",
                        w.namespace, w.name
                    ))),
                    None => Err(ResolveError::UnknownWaypoint(ip.to_string())),
                }
            }
        }
    }

    /// Every pod of the waypoint `gw`, ready or not.
    fn waypoint_members<'a>(
        &'a self,
        gw: &'a GatewayAddress,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        let (service, workload) = match &gw.destination {
            GatewayDestination::Hostname(h) => (self.waypoint_service(h), None),
            GatewayDestination::Address(ip) => match self.services_by_vip.get(ip) {
                Some(svc) => (Some(svc), None),
                None => (None, self.by_ip.get(ip)),
            },
        };
        service
            .into_iter()
            .flat_map(|svc| svc.endpoints.iter())
            .filter_map(|uid| self.workloads.get(uid))
            .chain(workload)
    }

    /// Whether `w` is one of the pods of the waypoint `gw`.
    pub fn is_waypoint_member(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        self.waypoint_members(gw).any(|m| m.uid == w.uid)
    }

    /// Whether a peer that proved `identity` and connects from `ip` is one of the pods of
    /// the waypoint `gw`: both must belong to the same pod.
    pub fn is_from_waypoint(&self, gw: &GatewayAddress, identity: &SpiffeId, ip: IpAddr) -> bool {
        self.waypoint_members(gw)
            .any(|m| m.identity == *identity && m.addresses.contains(&ip))
    }

    /// How logs and refusals name the waypoint `gw`: `namespace/name` of its service or
    /// workload when known, else what the reference says.
    pub fn waypoint_name(&self, gw: &GatewayAddress) -> String {
        match &gw.destination {
            GatewayDestination::Hostname(h) => match self.waypoint_service(h) {
                Some(svc) => service_name(svc),
                None => format!("{}/{}", h.namespace, h.hostname),
            },
            GatewayDestination::Address(ip) => {
                if let Some(svc) = self.services_by_vip.get(ip) {
                    service_name(svc)
                } else if let Some(w) = self.by_ip.get(ip) {
                    format!("{}/{}", w.namespace, w.name)
                } else {
                    ip.to_string()
                }
            }
        }
    }
}

/// `namespace/name`.
fn service_name(svc: &Service) -> String {
    format!("{}/{}", svc.namespace, svc.name)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::state::{Destination, Protocol, ServicePort};

    const WAYPOINT_HOST: &str = "waypoint.shop.svc.cluster.local";

    fn wl(name: &str, sa: &str, ip: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            identity: SpiffeId::new("cluster.local", "shop", sa).unwrap(),
            node: "n".into(),
            addresses: vec![ip.parse().unwrap()],
            protocol: Protocol::Hbone,
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
            healthy: true,
            waypoint: None,
            authorization_policies: vec![],
            services: BTreeMap::new(),
        }
    }

    fn svc(name: &str, vip: &str, port: u16, target: u16, endpoints: &[&str]) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            addresses: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                app_protocol: crate::state::AppProtocol::Unknown,
                port,
                target_port: target,
            }],
            endpoints: endpoints.iter().map(|e| (*e).into()).collect(),
            waypoint: None,
        }
    }

    fn by_host(namespace: &str, hostname: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Hostname(NamespacedHostname {
                namespace: namespace.into(),
                hostname: hostname.into(),
            }),
            hbone_port: 15008,
        }
    }

    fn by_address(ip: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Address(ip.parse().unwrap()),
            hbone_port: 15009,
        }
    }

    /// Two waypoint pods and one not ready (listed as TCP, as waypoints are not captured),
    /// a server behind the service `cart` whose VIP has the waypoint, a second service
    /// `orders` without one, and a client.
    fn mesh(edit: impl FnOnce(&mut Vec<Workload>, &mut Vec<Service>)) -> Snapshot {
        let wp = |name: &str, ip: &str, healthy: bool| {
            let mut w = wl(name, "waypoint", ip);
            w.protocol = Protocol::Tcp;
            w.healthy = healthy;
            w
        };
        let mut workloads = vec![
            wp("waypoint-1", "198.18.2.1", true),
            wp("waypoint-2", "198.18.2.2", true),
            wp("waypoint-3", "198.18.2.3", false),
            wl("server", "server", "198.18.1.1"),
            wl("client", "client", "198.18.1.9"),
        ];
        let mut cart = svc("cart", "198.18.200.1", 80, 8080, &["server"]);
        cart.waypoint = Some(by_host("shop", WAYPOINT_HOST));
        let mut services = vec![
            svc(
                "waypoint",
                "198.18.201.1",
                15008,
                15008,
                &["waypoint-1", "waypoint-2", "waypoint-3"],
            ),
            cart,
            svc("orders", "198.18.200.2", 80, 9090, &["server"]),
        ];
        edit(&mut workloads, &mut services);
        Snapshot::new(workloads, services)
    }

    fn find<'a>(s: &'a Snapshot, name: &str) -> &'a Arc<Workload> {
        s.workloads().find(|w| w.name == name).unwrap()
    }

    fn client(s: &Snapshot) -> Option<&Workload> {
        Some(find(s, "client").as_ref())
    }

    /// Resolves `dst` from the client many times: the waypoint pods chosen, and the one
    /// authority, service and workload every resolution agreed on.
    fn through_waypoint(
        s: &Snapshot,
        dst: &str,
    ) -> (
        BTreeSet<SocketAddr>,
        SocketAddr,
        Option<String>,
        Option<String>,
    ) {
        let mut pods = BTreeSet::new();
        let mut seen = None;
        for _ in 0..50 {
            match s.resolve_from(client(s), dst.parse().unwrap()).unwrap() {
                Destination::Waypoint {
                    waypoint,
                    addr,
                    target,
                    service,
                    workload,
                } => {
                    assert_eq!(
                        waypoint.identity.to_string(),
                        "spiffe://cluster.local/ns/shop/sa/waypoint"
                    );
                    assert_eq!(Some(&addr.ip()), waypoint.addresses.first());
                    pods.insert(addr);
                    let this = (
                        target,
                        service.map(|s| s.name.clone()),
                        workload.map(|w| w.name.clone()),
                    );
                    assert!(seen.is_none() || seen.as_ref() == Some(&this), "{this:?}");
                    seen = Some(this);
                }
                other => panic!("expected the waypoint, got {other:?}"),
            }
        }
        let (target, service, workload) = seen.unwrap();
        (pods, target, service, workload)
    }

    fn ready_pods(port: u16) -> BTreeSet<SocketAddr> {
        [
            SocketAddr::new("198.18.2.1".parse().unwrap(), port),
            SocketAddr::new("198.18.2.2".parse().unwrap(), port),
        ]
        .into()
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_a_ready_waypoint_pod_for_its_vip() {
        let s = mesh(|_, _| {});
        let (pods, target, service, workload) = through_waypoint(&s, "198.18.200.1:80");
        assert_eq!(pods, ready_pods(15008), "random among the ready pods only");
        assert_eq!(target, "198.18.200.1:80".parse().unwrap(), "authority kept");
        assert_eq!(service.as_deref(), Some("cart"));
        assert_eq!(workload, None);
    }

    #[test]
    fn a_workload_with_a_waypoint_is_reached_through_it_for_its_own_address() {
        let s = mesh(|w, _| w[3].waypoint = Some(by_host("shop", WAYPOINT_HOST)));
        let (pods, target, service, workload) = through_waypoint(&s, "198.18.1.1:8080");
        assert_eq!(pods, ready_pods(15008));
        assert_eq!(target, "198.18.1.1:8080".parse().unwrap());
        assert_eq!(service, None);
        assert_eq!(workload.as_deref(), Some("server"));
    }

    #[test]
    fn an_endpoint_with_a_waypoint_behind_a_service_without_one_is_reached_through_it() {
        let s = mesh(|w, _| w[3].waypoint = Some(by_host("shop", WAYPOINT_HOST)));
        let (_, target, service, workload) = through_waypoint(&s, "198.18.200.2:80");
        assert_eq!(
            target,
            "198.18.1.1:9090".parse().unwrap(),
            "the endpoint picked"
        );
        assert_eq!(service.as_deref(), Some("orders"));
        assert_eq!(workload.as_deref(), Some("server"));
    }

    #[test]
    fn without_a_waypoint_on_the_path_nothing_changes() {
        let s = mesh(|_, _| {});
        // The pod behind `cart` by its own address: the service's waypoint does not apply.
        match s.resolve_from(client(&s), "198.18.1.1:8080".parse().unwrap()) {
            Ok(Destination::Workload { addr, service, .. }) => {
                assert_eq!(addr, "198.18.1.1:8080".parse().unwrap());
                assert!(service.is_none());
            }
            other => panic!("{other:?}"),
        }
        match s.resolve_from(client(&s), "198.18.200.2:80".parse().unwrap()) {
            Ok(Destination::Workload { addr, .. }) => {
                assert_eq!(addr, "198.18.1.1:9090".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_waypoint_named_by_address_is_a_service_vip_or_a_pod() {
        let s = mesh(|_, svcs| svcs[1].waypoint = Some(by_address("198.18.201.1")));
        let (pods, ..) = through_waypoint(&s, "198.18.200.1:80");
        assert_eq!(
            pods,
            ready_pods(15009),
            "the VIP's ready pods, on the given port"
        );

        let s = mesh(|_, svcs| svcs[1].waypoint = Some(by_address("198.18.2.2")));
        let (pods, ..) = through_waypoint(&s, "198.18.200.1:80");
        assert_eq!(
            pods,
            [SocketAddr::new("198.18.2.2".parse().unwrap(), 15009)].into()
        );
    }

    #[test]
    fn a_waypoint_that_cannot_be_resolved_fails_closed() {
        let cases: Vec<(&str, Snapshot, ResolveError)> = vec![
            (
                "no such service",
                mesh(|_, svcs| svcs[1].waypoint = Some(by_host("shop", "gone.shop.svc"))),
                ResolveError::UnknownWaypoint("shop/gone.shop.svc".into()),
            ),
            (
                "a hostname of another namespace",
                mesh(|_, svcs| svcs[1].waypoint = Some(by_host("other", WAYPOINT_HOST))),
                ResolveError::UnknownWaypoint(format!("other/{WAYPOINT_HOST}")),
            ),
            (
                "no ready pod",
                mesh(|w, _| {
                    w[0].healthy = false;
                    w[1].healthy = false;
                }),
                ResolveError::NoHealthyWaypoint("shop/waypoint".into()),
            ),
            (
                "no pods at all",
                mesh(|_, svcs| svcs[0].endpoints.clear()),
                ResolveError::NoHealthyWaypoint("shop/waypoint".into()),
            ),
            (
                "an address nobody has",
                mesh(|_, svcs| svcs[1].waypoint = Some(by_address("198.18.9.9"))),
                ResolveError::UnknownWaypoint("198.18.9.9".into()),
            ),
            (
                "an address of a pod that is not ready",
                mesh(|_, svcs| svcs[1].waypoint = Some(by_address("198.18.2.3"))),
                ResolveError::NoHealthyWaypoint("shop/waypoint-3".into()),
            ),
        ];
        for (what, s, want) in cases {
            let got = s.resolve_from(client(&s), "198.18.200.1:80".parse().unwrap());
            assert_eq!(got.unwrap_err(), want, "{what}");
        }
        let e = ResolveError::NoHealthyWaypoint("shop/waypoint".into());
        assert_eq!(
            e.to_string(),
            "waypoint shop/waypoint has no ready endpoint"
        );
    }

    #[test]
    fn a_workload_waypoint_that_cannot_be_resolved_fails_closed_too() {
        let s = mesh(|w, _| w[3].waypoint = Some(by_host("shop", "gone.shop.svc")));
        for dst in ["198.18.1.1:8080", "198.18.200.2:80"] {
            let got = s.resolve_from(client(&s), dst.parse().unwrap());
            assert!(
                matches!(got, Err(ResolveError::UnknownWaypoint(_))),
                "{dst}: {got:?}"
            );
        }
    }

    #[test]
    fn the_waypoint_itself_is_not_sent_back_to_itself() {
        let s = mesh(|w, _| w[3].waypoint = Some(by_host("shop", WAYPOINT_HOST)));
        let wp = Some(find(&s, "waypoint-1").as_ref());
        match s.resolve_from(wp, "198.18.200.1:80".parse().unwrap()) {
            Ok(Destination::Workload { addr, .. }) => {
                assert_eq!(addr, "198.18.1.1:8080".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        match s.resolve_from(wp, "198.18.1.1:8080".parse().unwrap()) {
            Ok(Destination::Workload { addr, .. }) => {
                assert_eq!(addr, "198.18.1.1:8080".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        // Another workload with the same service account is not the waypoint.
        let s = mesh(|w, _| {
            w[4].identity = w[0].identity.clone();
        });
        assert!(matches!(
            s.resolve_from(client(&s), "198.18.200.1:80".parse().unwrap()),
            Ok(Destination::Waypoint { .. })
        ));
    }

    #[test]
    fn a_peer_is_the_waypoint_only_with_the_identity_and_address_of_one_of_its_pods() {
        let s = mesh(|_, _| {});
        let gw = by_host("shop", WAYPOINT_HOST);
        let wp_id = SpiffeId::new("cluster.local", "shop", "waypoint").unwrap();
        let other = SpiffeId::new("cluster.local", "shop", "client").unwrap();
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(s.is_from_waypoint(&gw, &wp_id, ip("198.18.2.1")));
        // A pod that is not ready is still one of the waypoint's.
        assert!(s.is_from_waypoint(&gw, &wp_id, ip("198.18.2.3")));
        assert!(!s.is_from_waypoint(&gw, &wp_id, ip("198.18.1.9")));
        assert!(!s.is_from_waypoint(&gw, &other, ip("198.18.2.1")));
        assert!(!s.is_from_waypoint(&by_host("shop", "gone"), &wp_id, ip("198.18.2.1")));
        assert!(s.is_from_waypoint(&by_address("198.18.201.1"), &wp_id, ip("198.18.2.2")));
        assert!(s.is_from_waypoint(&by_address("198.18.2.2"), &wp_id, ip("198.18.2.2")));
        assert!(!s.is_from_waypoint(&by_address("198.18.2.2"), &wp_id, ip("198.18.2.1")));
        assert_eq!(s.waypoint_name(&gw), "shop/waypoint");
        assert_eq!(
            s.waypoint_name(&by_address("198.18.2.2")),
            "shop/waypoint-2"
        );
    }
}

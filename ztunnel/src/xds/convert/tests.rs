use mesh_proto::security as xsec;
use mesh_proto::workload as xwl;

use super::*;
use crate::state::policy::IpBlock;

pub(crate) fn workload(uid: &str, ip: [u8; 4]) -> xwl::Workload {
    xwl::Workload {
        uid: uid.into(),
        name: "echo-1".into(),
        namespace: "apps".into(),
        service_account: "echo".into(),
        node: "node-b".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

pub(crate) fn service(ns: &str, host: &str, vip: [u8; 4], port: u32, target: u32) -> xwl::Service {
    xwl::Service {
        name: host.split('.').next().unwrap_or_default().into(),
        namespace: ns.into(),
        hostname: host.into(),
        addresses: vec![xwl::NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: vec![xwl::Port {
            service_port: port,
            target_port: target,
            app_protocol: 0,
        }],
        ..Default::default()
    }
}

#[test]
fn a_workload_converts_with_defaults() {
    let mut w = workload("c1//v1/Pod/apps/echo-1", [10, 0, 0, 5]);
    w.addresses
        .push(vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    w.authorization_policies = vec!["apps/allow-client".into()];
    w.waypoint = Some(xwl::GatewayAddress {
        destination: Some(xwl::gateway_address::Destination::Hostname(
            xwl::NamespacedHostname {
                namespace: "apps".into(),
                hostname: "waypoint.apps.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 0,
    });
    w.services.insert(
        "apps/echo.apps.svc.cluster.local".into(),
        xwl::PortList {
            ports: vec![xwl::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
        },
    );
    let got = Workload::try_from_xds(&w).unwrap();
    assert_eq!(got.uid, "c1//v1/Pod/apps/echo-1");
    assert_eq!(
        got.identity.to_string(),
        "spiffe://cluster.local/ns/apps/sa/echo"
    );
    assert_eq!(got.protocol, Protocol::Hbone);
    assert_eq!(
        got.addresses,
        vec![
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(got.canonical_name, "echo-1");
    assert_eq!(got.canonical_revision, "latest");
    assert!(got.healthy);
    assert_eq!(got.authorization_policies, vec!["apps/allow-client"]);
    let wp = got.waypoint.clone().unwrap();
    assert_eq!(wp.hbone_port, 15008);
    assert_eq!(
        wp.destination,
        GatewayDestination::Hostname(NamespacedHostname {
            namespace: "apps".into(),
            hostname: "waypoint.apps.svc.cluster.local".into(),
        })
    );
    assert_eq!(
        got.target_port("apps/echo.apps.svc.cluster.local", 80),
        Some(8080)
    );
    // Shown in /config_dump.
    let json = serde_json::to_value(&got).unwrap();
    assert_eq!(
        json["waypoint"]["hostname"]["hostname"],
        "waypoint.apps.svc.cluster.local"
    );
    assert_eq!(json["waypoint"]["hbonePort"], 15008);
    assert_eq!(
        json["services"]["apps/echo.apps.svc.cluster.local"][0]["targetPort"],
        8080
    );
    assert_eq!(json["authorizationPolicies"][0], "apps/allow-client");
}

#[test]
fn trust_domain_status_and_protocol_are_followed() {
    let mut w = workload("u", [10, 0, 0, 5]);
    w.trust_domain = "example.org".into();
    w.status = xwl::WorkloadStatus::Unhealthy as i32;
    w.tunnel_protocol = xwl::TunnelProtocol::None as i32;
    w.canonical_name = "echo".into();
    w.canonical_revision = "v2".into();
    let got = Workload::try_from_xds(&w).unwrap();
    assert_eq!(
        got.identity.to_string(),
        "spiffe://example.org/ns/apps/sa/echo"
    );
    assert!(!got.healthy);
    assert_eq!(got.protocol, Protocol::Tcp);
    assert_eq!(
        (got.canonical_name.as_str(), got.canonical_revision.as_str()),
        ("echo", "v2")
    );
}

#[test]
fn bad_workloads_are_rejected_with_the_field() {
    let err = |w: xwl::Workload| Workload::try_from_xds(&w).unwrap_err().to_string();
    let mut w = workload("u", [10, 0, 0, 5]);
    w.addresses = vec![vec![10, 0, 0, 0, 5]];
    assert_eq!(
        err(w),
        "field addresses[0]: an address is 4 bytes (IPv4) or 16 bytes (IPv6), not 5"
    );
    let mut w = workload("u", [10, 0, 0, 5]);
    w.tunnel_protocol = xwl::TunnelProtocol::LegacyIstioMtls as i32;
    assert!(err(w).contains("LEGACY_ISTIO_MTLS"));
    let mut w = workload("u", [10, 0, 0, 5]);
    w.tunnel_protocol = 9;
    assert!(err(w).contains("tunnel_protocol"));
    let w = workload("", [10, 0, 0, 5]);
    assert_eq!(err(w), "field uid: must not be empty");
    let mut w = workload("u", [10, 0, 0, 5]);
    w.service_account = "a b".into();
    assert!(err(w).contains("service account"));
    let mut w = workload("u", [10, 0, 0, 5]);
    w.services.insert(
        "apps/echo".into(),
        xwl::PortList {
            ports: vec![xwl::Port {
                service_port: 70000,
                target_port: 1,
                app_protocol: 0,
            }],
        },
    );
    assert!(err(w).contains("services[\"apps/echo\"].ports[0].service_port"));
    let mut w = workload("u", [10, 0, 0, 5]);
    w.waypoint = Some(xwl::GatewayAddress {
        destination: Some(xwl::gateway_address::Destination::Address(
            xwl::NetworkAddress {
                network: String::new(),
                address: vec![1, 2, 3],
                length: None,
            },
        )),
        hbone_mtls_port: 15008,
    });
    assert!(err(w).contains("waypoint.address"));
}

#[test]
fn a_service_converts() {
    let mut s = service("apps", "echo.apps.svc.cluster.local", [10, 96, 0, 1], 80, 0);
    s.waypoint = Some(xwl::GatewayAddress {
        destination: Some(xwl::gateway_address::Destination::Address(
            xwl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 9],
                length: None,
            },
        )),
        hbone_mtls_port: 15009,
    });
    let got = Service::try_from_xds(&s).unwrap();
    assert_eq!(got.key(), "apps/echo.apps.svc.cluster.local");
    assert_eq!(got.addresses, vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        got.ports,
        vec![ServicePort {
            app_protocol: crate::state::AppProtocol::Unknown,
            port: 80,
            target_port: 0
        }]
    );
    // A named target port, unresolved at service level: the service port stands in.
    assert_eq!(got.target_port(80), Some(80));
    assert_eq!(
        got.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Address("10.96.0.9".parse().unwrap()),
            hbone_port: 15009,
        })
    );
    let mut bad = s.clone();
    bad.addresses[0].address = vec![0; 5];
    assert!(
        Service::try_from_xds(&bad)
            .unwrap_err()
            .to_string()
            .contains("addresses[0]")
    );
    let mut bad = s;
    bad.ports[0].service_port = 0;
    assert!(
        Service::try_from_xds(&bad)
            .unwrap_err()
            .to_string()
            .contains("ports[0].service_port")
    );
}

pub(crate) fn authorization(ns: &str, name: &str) -> xsec::Authorization {
    use xsec::string_match::MatchType;
    xsec::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: xsec::Scope::WorkloadSelector as i32,
        action: xsec::Action::Deny as i32,
        rules: vec![xsec::Rule {
            clauses: vec![xsec::Clause {
                matches: vec![xsec::Match {
                    principals: vec![xsec::StringMatch {
                        match_type: Some(MatchType::Exact(
                            "cluster.local/ns/apps/sa/client".into(),
                        )),
                    }],
                    not_namespaces: vec![xsec::StringMatch {
                        match_type: Some(MatchType::Presence(())),
                    }],
                    source_ips: vec![xsec::Address {
                        address: vec![10, 1, 0, 0],
                        length: 16,
                    }],
                    destination_ports: vec![8080],
                    service_accounts: vec![xsec::ServiceAccountMatch {
                        namespace: "apps".into(),
                        service_account: "client".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
        extensions: vec![],
    }
}

#[test]
fn an_authorization_converts_and_shows_ip_blocks_as_cidr() {
    let got = Authorization::try_from_xds(&authorization("apps", "deny-client")).unwrap();
    assert_eq!(got.scope, PolicyScope::WorkloadSelector);
    assert_eq!(got.action, PolicyAction::Deny);
    let m = &got.rules[0].clauses[0].matches[0];
    assert_eq!(
        m.principals,
        vec![StringMatch::Exact("cluster.local/ns/apps/sa/client".into())]
    );
    assert_eq!(m.not_namespaces, vec![StringMatch::Presence]);
    assert_eq!(
        m.source_ips,
        vec![IpBlock::new("10.1.0.0".parse().unwrap(), 16).unwrap()]
    );
    assert_eq!(m.destination_ports, vec![8080]);
    let json = serde_json::to_value(&got).unwrap();
    assert_eq!(json["action"], "DENY");
    assert_eq!(json["scope"], "WORKLOAD_SELECTOR");
    let jm = &json["rules"][0]["clauses"][0]["matches"][0];
    assert_eq!(jm["sourceIps"][0], "10.1.0.0/16");
    assert_eq!(
        jm["principals"][0]["exact"],
        "cluster.local/ns/apps/sa/client"
    );
    assert_eq!(jm["notNamespaces"][0], "presence");
    assert!(
        jm.get("destinationIps").is_none(),
        "empty fields are left out"
    );
}

#[test]
fn bad_authorizations_are_rejected_with_the_field() {
    let err = |a: xsec::Authorization| Authorization::try_from_xds(&a).unwrap_err().to_string();
    let mut a = authorization("apps", "p");
    a.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
    assert!(err(a).contains("rules[0].clauses[0].matches[0].source_ips[0]: prefix length 33"),);
    let mut a = authorization("apps", "p");
    a.rules[0].clauses[0].matches[0].principals[0].match_type = None;
    assert!(err(a).contains("principals[0]: no match type"));
    let mut a = authorization("apps", "p");
    a.action = 7;
    assert!(err(a).contains("field action"));
    let mut a = authorization("apps", "p");
    a.rules[0].clauses[0].matches[0].destination_ports = vec![0];
    assert!(err(a).contains("destination_ports[0]"));
}

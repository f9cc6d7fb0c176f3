use std::net::SocketAddr;

use mesh_proto::workload as xwl;

use super::*;
use crate::state::Destination;
use crate::xds::convert::tests::{authorization, service, workload};

fn any_address(a: xwl::Address) -> prost_types::Any {
    prost_types::Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: a.encode_to_vec(),
    }
}

fn wl_resource(name: &str, version: &str, w: xwl::Workload) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(any_address(xwl::Address {
            r#type: Some(xwl::address::Type::Workload(w)),
        })),
        ..Default::default()
    }
}

fn svc_resource(version: &str, s: xwl::Service) -> Resource {
    Resource {
        name: format!("{}/{}", s.namespace, s.hostname),
        version: version.into(),
        resource: Some(any_address(xwl::Address {
            r#type: Some(xwl::address::Type::Service(s)),
        })),
        ..Default::default()
    }
}

fn push(nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

const HOST: &str = "echo.apps.svc.cluster.local";
const KEY: &str = "apps/echo.apps.svc.cluster.local";

fn backing(mut w: xwl::Workload, target: u32) -> xwl::Workload {
    w.services.insert(
        KEY.into(),
        xwl::PortList {
            ports: vec![xwl::Port {
                service_port: 80,
                target_port: target,
                app_protocol: 0,
            }],
        },
    );
    w
}

#[test]
fn a_valid_push_is_applied_and_acked() {
    let mut r = Resources::default();
    let a = r.apply(&push(
        "n1",
        vec![
            wl_resource("w1", "1", backing(workload("w1", [10, 0, 0, 1]), 9080)),
            wl_resource("w2", "1", backing(workload("w2", [10, 0, 0, 2]), 0)),
            svc_resource("1", service("apps", HOST, [10, 96, 0, 1], 80, 8080)),
        ],
        &[],
    ));
    assert!(a.is_ack() && a.changed, "{:?}", a.rejected);
    assert_eq!(a.reply.type_url, ADDRESS_TYPE_URL);
    assert_eq!(a.reply.response_nonce, "n1");
    assert!(a.reply.node.is_none());
    let snap = r.snapshot();
    let svc = snap.service_by_host(HOST).unwrap();
    assert_eq!(svc.endpoints, vec!["w1".to_string(), "w2".to_string()]);
    // Each endpoint's own target port; 0 falls back to the service's.
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        match snap.resolve(vip).unwrap() {
            Destination::Workload { addr, .. } => {
                seen.insert(addr);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let want: std::collections::BTreeSet<SocketAddr> = [
        "10.0.0.1:9080".parse().unwrap(),
        "10.0.0.2:8080".parse().unwrap(),
    ]
    .into();
    assert_eq!(seen, want);
}

#[test]
fn a_bad_resource_is_nacked_by_name_and_the_rest_applied() {
    let mut r = Resources::default();
    r.apply(&push(
        "n1",
        vec![wl_resource("w1", "1", workload("w1", [10, 0, 0, 1]))],
        &[],
    ));
    let mut bad = workload("bad", [10, 0, 0, 9]);
    bad.addresses = vec![vec![1, 2, 3, 4, 5]];
    let mut bad_w1 = workload("w1", [10, 0, 0, 1]);
    bad_w1.tunnel_protocol = xwl::TunnelProtocol::LegacyIstioMtls as i32;
    let a = r.apply(&push(
        "n2",
        vec![
            wl_resource("bad", "1", bad),
            wl_resource("w2", "1", workload("w2", [10, 0, 0, 2])),
            wl_resource("w1", "2", bad_w1),
        ],
        &[],
    ));
    assert!(!a.is_ack());
    assert!(a.changed);
    let status = a.reply.error_detail.as_ref().unwrap();
    assert_eq!(status.code, 3);
    assert!(
        status
            .message
            .starts_with("rejected 2 of 3 resources: bad: field addresses[0]"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("w1: field tunnel_protocol"),
        "{}",
        status.message
    );
    assert_eq!(a.reply.response_nonce, "n2");
    // The good one applied; the rejected update left w1 at its previous version.
    let snap = r.snapshot();
    assert!(snap.workload_by_ip("10.0.0.2".parse().unwrap()).is_some());
    assert!(snap.workload_by_ip("10.0.0.9".parse().unwrap()).is_none());
    let w1 = snap.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
    assert_eq!(w1.protocol, crate::state::Protocol::Hbone);
    assert_eq!(
        r.versions(ADDRESS_TYPE_URL),
        [
            ("w1".to_string(), "1".to_string()),
            ("w2".into(), "1".into())
        ]
        .into()
    );
}

#[test]
fn removals_name_workloads_or_services() {
    let mut r = Resources::default();
    r.apply(&push(
        "n1",
        vec![
            wl_resource("w1", "1", backing(workload("w1", [10, 0, 0, 1]), 0)),
            svc_resource("1", service("apps", HOST, [10, 96, 0, 1], 80, 8080)),
        ],
        &[],
    ));
    let a = r.apply(&push("n2", vec![], &[KEY]));
    assert!(a.is_ack() && a.changed);
    let snap = r.snapshot();
    assert!(snap.service_by_host(HOST).is_none());
    assert!(snap.workload_by_ip("10.0.0.1".parse().unwrap()).is_some());
    let a = r.apply(&push("n3", vec![], &["w1", "never-seen"]));
    assert!(a.is_ack() && a.changed);
    assert!(r.is_empty());
    let a = r.apply(&push("n4", vec![], &["never-seen"]));
    assert!(a.is_ack() && !a.changed);
}

#[test]
fn resources_must_come_under_their_own_name_and_type() {
    let mut r = Resources::default();
    let mut wrong_type = wl_resource("w1", "1", workload("w1", [10, 0, 0, 1]));
    if let Some(any) = wrong_type.resource.as_mut() {
        any.type_url = AUTHORIZATION_TYPE_URL.into();
    }
    let a = r.apply(&push(
        "n1",
        vec![
            wl_resource("other-name", "1", workload("w1", [10, 0, 0, 1])),
            wrong_type,
            Resource {
                name: "empty".into(),
                ..Default::default()
            },
            Resource {
                name: "garbage".into(),
                resource: Some(prost_types::Any {
                    type_url: ADDRESS_TYPE_URL.into(),
                    value: vec![0xff, 0xff, 0xff],
                }),
                ..Default::default()
            },
        ],
        &[],
    ));
    let msg = &a.reply.error_detail.as_ref().unwrap().message;
    assert!(
        msg.contains("other-name: the resource describes \"w1\""),
        "{msg}"
    );
    assert!(msg.contains("w1: the body is a"), "{msg}");
    assert!(msg.contains("empty: the resource has no body"), "{msg}");
    assert!(
        msg.contains("garbage: not a valid istio.workload.Address"),
        "{msg}"
    );
    assert!(r.is_empty() && !a.changed);
}

#[test]
fn authorizations_are_held_by_namespace_and_name() {
    let mut r = Resources::default();
    let res = |name: &str, a: mesh_proto::security::Authorization| Resource {
        name: name.into(),
        version: "7".into(),
        resource: Some(prost_types::Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: a.encode_to_vec(),
        }),
        ..Default::default()
    };
    let a = r.apply(&DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "p1".into(),
        resources: vec![res("apps/deny", authorization("apps", "deny"))],
        ..Default::default()
    });
    assert!(a.is_ack() && a.changed);
    assert_eq!(r.len(AUTHORIZATION_TYPE_URL), 1);
    let snap = r.snapshot();
    let p: Vec<_> = snap.policies().collect();
    assert_eq!(
        (p[0].namespace.as_str(), p[0].name.as_str()),
        ("apps", "deny")
    );
    let node = Node::default();
    let req = r.initial_request(AUTHORIZATION_TYPE_URL, &node);
    assert_eq!(
        req.initial_resource_versions,
        [("apps/deny".to_string(), "7".to_string())].into()
    );
    assert!(req.node.is_some());
    assert!(req.resource_names_subscribe.is_empty(), "wildcard");
    assert!(
        r.initial_request(ADDRESS_TYPE_URL, &node)
            .initial_resource_versions
            .is_empty()
    );
}

#[test]
fn an_unsubscribed_type_is_nacked() {
    let mut r = Resources::default();
    let a = r.apply(&DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        nonce: "x".into(),
        ..Default::default()
    });
    assert!(!a.is_ack() && !a.changed);
    let msg = &a.reply.error_detail.as_ref().unwrap().message;
    assert!(msg.contains("was not subscribed to"), "{msg}");
}

#[test]
fn a_nack_names_at_most_twenty_resources() {
    let mut r = Resources::default();
    let bad: Vec<_> = (0..25)
        .map(|i| Resource {
            name: format!("r{i}"),
            ..Default::default()
        })
        .collect();
    let a = r.apply(&push("n", bad, &[]));
    let msg = &a.reply.error_detail.as_ref().unwrap().message;
    assert!(msg.starts_with("rejected 25 of 25 resources"), "{msg}");
    assert!(msg.ends_with("; and 5 more"), "{msg}");
}

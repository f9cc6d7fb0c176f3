//! The waypoint rule: a workload that has a waypoint (`waypoint` set on the workload itself)
//! accepts connections only from a pod of that waypoint, which is where its L7 policy is
//! enforced. Such a pod proves the identity of a workload behind the waypoint and connects from
//! that same workload's address. Plaintext carries no identity, so it never qualifies.
//!
//! Istio's ztunnel enforced this ("bypassed waypoint", 401) up to 1.21; since 1.22 it leaves it
//! to an ALLOW policy naming the waypoint's service account. See docs/architecture.md for why
//! it is kept here. A waypoint that is set only on a service cannot be enforced this way: a
//! connection to a pod address does not say whether its client meant the service.

use super::{Connection, Verdict};
use crate::state::{Snapshot, Workload};

/// Allows `conn` to `dst` unless `dst` has a waypoint and `conn` does not come from it.
pub fn check(snapshot: &Snapshot, dst: &Workload, conn: &Connection) -> Verdict {
    let Some(gw) = &dst.waypoint else {
        return Verdict::Allow;
    };
    if let Some(id) = &conn.src_identity
        && snapshot.is_from_waypoint(gw, id, conn.src_ip)
    {
        return Verdict::Allow;
    }
    let name = snapshot.waypoint_name(gw);
    let who = match &conn.src_identity {
        Some(id) => format!("{id} from {}", conn.src_ip),
        None => format!("plaintext from {}", conn.src_ip),
    };
    Verdict::Deny {
        reason: format!(
            "traffic to {}/{} must pass through waypoint {name}; {who} is not one of its pods",
            dst.namespace, dst.name
        ),
        policy: format!("waypoint {name}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use mesh_core::SpiffeId;

    use super::*;
    use crate::rbac::authorize;
    use crate::state::policy::{
        Authorization, Clause, Match, PolicyAction, PolicyScope, Rule, StringMatch,
    };
    use crate::state::{
        GatewayAddress, GatewayDestination, NamespacedHostname, Protocol, Service, ServicePort,
    };

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

    fn mesh(server_waypoint: bool, policies: Vec<Authorization>) -> Snapshot {
        let mut server = wl("server", "server", "198.18.1.1");
        if server_waypoint {
            server.waypoint = Some(GatewayAddress {
                destination: GatewayDestination::Hostname(NamespacedHostname {
                    namespace: "shop".into(),
                    hostname: "waypoint.shop.svc.cluster.local".into(),
                }),
                hbone_port: 15008,
            });
        }
        let mut waypoint = wl("waypoint-1", "waypoint", "198.18.2.1");
        waypoint.protocol = Protocol::Tcp;
        Snapshot::with_policies(
            vec![waypoint, server],
            vec![Service {
                name: "waypoint".into(),
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
                addresses: vec!["198.18.201.1".parse().unwrap()],
                ports: vec![ServicePort {
                    app_protocol: crate::state::AppProtocol::Unknown,
                    port: 15008,
                    target_port: 15008,
                }],
                endpoints: vec!["waypoint-1".into()],
                waypoint: None,
            }],
            policies,
        )
    }

    fn conn(sa: Option<&str>, ip: &str) -> Connection {
        Connection {
            src_identity: sa.map(|sa| SpiffeId::new("cluster.local", "shop", sa).unwrap()),
            src_ip: ip.parse::<IpAddr>().unwrap(),
            dst_ip: "198.18.1.1".parse().unwrap(),
            dst_port: 8080,
        }
    }

    #[test]
    fn only_the_waypoint_reaches_a_workload_that_has_one() {
        let s = mesh(true, vec![]);
        let server = s.workload_by_ip("198.18.1.1".parse().unwrap()).unwrap();
        let cases = [
            ("the waypoint pod", Some("waypoint"), "198.18.2.1", true),
            ("another identity", Some("client"), "198.18.2.1", false),
            (
                "the waypoint's identity elsewhere",
                Some("waypoint"),
                "198.18.1.9",
                false,
            ),
            ("plaintext from the waypoint pod", None, "198.18.2.1", false),
        ];
        for (what, sa, ip, allowed) in cases {
            assert_eq!(
                check(&s, server, &conn(sa, ip)).is_allow(),
                allowed,
                "{what}"
            );
        }
        let Verdict::Deny { policy, reason } =
            check(&s, server, &conn(Some("client"), "198.18.1.9"))
        else {
            panic!("denied above");
        };
        assert_eq!(policy, "waypoint shop/waypoint");
        assert_eq!(
            reason,
            "traffic to shop/server must pass through waypoint shop/waypoint; \
             spiffe://cluster.local/ns/shop/sa/client from 198.18.1.9 is not one of its pods"
        );
        let Verdict::Deny { reason, .. } = check(&s, server, &conn(None, "198.18.1.9")) else {
            panic!("plaintext is denied");
        };
        assert!(
            reason.ends_with("plaintext from 198.18.1.9 is not one of its pods"),
            "{reason}"
        );
    }

    #[test]
    fn a_workload_without_a_waypoint_is_left_to_the_policies() {
        let s = mesh(false, vec![]);
        let server = s.workload_by_ip("198.18.1.1".parse().unwrap()).unwrap();
        assert!(check(&s, server, &conn(None, "198.18.1.9")).is_allow());
        assert!(check(&s, server, &conn(Some("client"), "198.18.1.9")).is_allow());
    }

    #[test]
    fn the_waypoint_rule_comes_before_the_policies_and_does_not_replace_them() {
        let allow_client = Authorization {
            name: "allow-client".into(),
            namespace: "shop".into(),
            scope: PolicyScope::Namespace,
            action: PolicyAction::Allow,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        principals: vec![StringMatch::Exact(
                            "cluster.local/ns/shop/sa/client".into(),
                        )],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        let s = mesh(true, vec![allow_client]);
        let server = s.workload_by_ip("198.18.1.1".parse().unwrap()).unwrap();
        // The client the policy allows still may not go around the waypoint...
        let Verdict::Deny { policy, .. } =
            authorize(&s, server, &conn(Some("client"), "198.18.1.9"))
        else {
            panic!("the waypoint rule denies");
        };
        assert_eq!(policy, "waypoint shop/waypoint");
        // ...and the waypoint, which the policy does not allow, is still held to it.
        let Verdict::Deny { policy, .. } =
            authorize(&s, server, &conn(Some("waypoint"), "198.18.2.1"))
        else {
            panic!("the policy denies");
        };
        assert_eq!(policy, "shop/allow-client");
    }
}

//! Table tests: policy set × source × port → verdict.

use std::collections::BTreeMap;

use super::*;
use crate::state::Protocol;
use crate::state::policy::{Clause, Rule};

const NS: &str = "apps";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn dst_workload() -> Workload {
    Workload {
        uid: "cluster1//v1/Pod/apps/backend".into(),
        name: "backend".into(),
        namespace: NS.into(),
        service_account: "backend".into(),
        identity: id(NS, "backend"),
        node: "node-a".into(),
        addresses: vec!["10.0.0.2".parse().unwrap()],
        protocol: Protocol::Hbone,
        canonical_name: "backend".into(),
        canonical_revision: "latest".into(),
        healthy: true,
        waypoint: None,
        authorization_policies: vec![
            "apps/sel-listed".into(),
            "apps/converted_peer_authentication_pa".into(),
            "istio-system/istio_converted_static_strict".into(),
        ],
        services: BTreeMap::new(),
    }
}

fn policy(
    ns: &str,
    name: &str,
    scope: PolicyScope,
    action: PolicyAction,
    rules: Vec<Rule>,
) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action,
        rules,
        dry_run: false,
    }
}

fn allow(name: &str, rules: Vec<Rule>) -> Authorization {
    policy(NS, name, PolicyScope::Namespace, PolicyAction::Allow, rules)
}

fn deny(name: &str, rules: Vec<Rule>) -> Authorization {
    policy(NS, name, PolicyScope::Namespace, PolicyAction::Deny, rules)
}

fn dry(mut p: Authorization) -> Authorization {
    p.dry_run = true;
    p
}

/// One rule, one clause, one match.
fn one(m: Match) -> Vec<Rule> {
    vec![Rule {
        clauses: vec![Clause { matches: vec![m] }],
    }]
}

/// One rule whose clauses are ANDed, each an OR of matches.
fn all_of(clauses: Vec<Vec<Match>>) -> Vec<Rule> {
    vec![Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }]
}

/// `rules: [{}]`: a rule with no clauses.
fn everything() -> Vec<Rule> {
    vec![Rule { clauses: vec![] }]
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn block(s: &str) -> IpBlock {
    let (ip, len) = s.split_once('/').unwrap();
    IpBlock::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap()
}

fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

fn principals(v: Vec<StringMatch>) -> Match {
    Match {
        principals: v,
        ..Default::default()
    }
}

fn static_strict() -> Authorization {
    policy(
        "istio-system",
        "istio_converted_static_strict",
        PolicyScope::WorkloadSelector,
        PolicyAction::Deny,
        one(Match {
            not_principals: vec![StringMatch::Presence],
            ..Default::default()
        }),
    )
}

#[derive(Clone, Copy)]
enum Src {
    /// apps/frontend from 10.0.1.5.
    Frontend,
    /// legacy/old from 10.9.0.7.
    Legacy,
    /// No identity, from 192.168.1.9.
    Plain,
    /// apps/frontend from the given address.
    FrontendAt(&'static str),
}

impl Src {
    fn conn(self, port: u16) -> Connection {
        let (identity, ip) = match self {
            Src::Frontend => (Some(id(NS, "frontend")), "10.0.1.5"),
            Src::Legacy => (Some(id("legacy", "old")), "10.9.0.7"),
            Src::Plain => (None, "192.168.1.9"),
            Src::FrontendAt(ip) => (Some(id(NS, "frontend")), ip),
        };
        Connection {
            src_identity: identity,
            src_ip: ip.parse().unwrap(),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        }
    }
}

/// `None`: allowed; `Some(policy)`: denied by that policy.
type Expect = Option<&'static str>;

struct Case {
    name: &'static str,
    policies: Vec<Authorization>,
    src: Src,
    port: u16,
    dst_ip: Option<&'static str>,
    expect: Expect,
}

fn case(
    name: &'static str,
    policies: Vec<Authorization>,
    src: Src,
    port: u16,
    expect: Expect,
) -> Case {
    Case {
        name,
        policies,
        src,
        port,
        dst_ip: None,
        expect,
    }
}

fn deny_legacy_ns() -> Authorization {
    deny(
        "deny-legacy",
        one(Match {
            namespaces: vec![exact("legacy")],
            ..Default::default()
        }),
    )
}

fn allow_frontend() -> Authorization {
    allow(
        "allow-frontend",
        one(principals(vec![exact("cluster.local/ns/apps/sa/frontend")])),
    )
}

fn allow_src(cidr: &str) -> Vec<Authorization> {
    vec![allow(
        "allow-src",
        one(Match {
            source_ips: vec![block(cidr)],
            ..Default::default()
        }),
    )]
}

fn allow_ports(ports: Vec<u16>) -> Vec<Authorization> {
    vec![allow(
        "allow-ports",
        one(Match {
            destination_ports: ports,
            ..Default::default()
        }),
    )]
}

/// A converted PeerAuthentication: STRICT except port 8081 PERMISSIVE.
fn strict_except_8081() -> Vec<Authorization> {
    vec![policy(
        NS,
        "converted_peer_authentication_pa",
        PolicyScope::WorkloadSelector,
        PolicyAction::Deny,
        all_of(vec![
            vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            }],
            vec![Match {
                not_destination_ports: vec![8081],
                ..Default::default()
            }],
        ]),
    )]
}

fn cases() -> Vec<Case> {
    use Src::*;
    let mut v = vec![
        // No policy at all.
        case("no policies, mtls", vec![], Frontend, 80, None),
        case("no policies, plaintext", vec![], Plain, 80, None),
        // DENY, and DENY over ALLOW.
        case(
            "deny ns matches",
            vec![deny_legacy_ns()],
            Legacy,
            80,
            Some("apps/deny-legacy"),
        ),
        case(
            "deny ns other source",
            vec![deny_legacy_ns()],
            Frontend,
            80,
            None,
        ),
        case(
            "deny wins over allow-all",
            vec![allow("allow-all", everything()), deny_legacy_ns()],
            Legacy,
            80,
            Some("apps/deny-legacy"),
        ),
        case(
            "allow-all with a deny that does not match",
            vec![allow("allow-all", everything()), deny_legacy_ns()],
            Frontend,
            80,
            None,
        ),
        // Empty policies and rules.
        case(
            "allow-nothing mtls",
            vec![allow("allow-nothing", vec![])],
            Frontend,
            80,
            Some("apps/allow-nothing"),
        ),
        case(
            "allow-nothing plaintext",
            vec![allow("allow-nothing", vec![])],
            Plain,
            80,
            Some("apps/allow-nothing"),
        ),
        case(
            "deny with no rules has no effect",
            vec![deny("deny-none", vec![])],
            Legacy,
            80,
            None,
        ),
        case(
            "allow rules [{}] allows plaintext",
            vec![allow("allow-all", everything())],
            Plain,
            80,
            None,
        ),
        case(
            "deny rules [{}] denies all",
            vec![deny("deny-all", everything())],
            Frontend,
            80,
            Some("apps/deny-all"),
        ),
        case(
            "an empty match never matches",
            vec![allow("allow-empty", one(Match::default()))],
            Frontend,
            80,
            Some("apps/allow-empty"),
        ),
        // Principals.
        case(
            "principal exact",
            vec![allow_frontend()],
            Frontend,
            80,
            None,
        ),
        case(
            "principal exact other",
            vec![allow_frontend()],
            Legacy,
            80,
            Some("apps/allow-frontend"),
        ),
        case(
            "principal exact plaintext",
            vec![allow_frontend()],
            Plain,
            80,
            Some("apps/allow-frontend"),
        ),
        case(
            "principal with spiffe:// never matches",
            vec![allow(
                "allow-spiffe",
                one(principals(vec![exact(
                    "spiffe://cluster.local/ns/apps/sa/frontend",
                )])),
            )],
            Frontend,
            80,
            Some("apps/allow-spiffe"),
        ),
        case(
            "principal prefix",
            vec![allow(
                "p",
                one(principals(vec![StringMatch::Prefix(
                    "cluster.local/ns/apps/".into(),
                )])),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "principal prefix other ns",
            vec![allow(
                "p",
                one(principals(vec![StringMatch::Prefix(
                    "cluster.local/ns/apps/".into(),
                )])),
            )],
            Legacy,
            80,
            Some("apps/p"),
        ),
        case(
            "principal suffix",
            vec![allow(
                "s",
                one(principals(vec![StringMatch::Suffix("/sa/frontend".into())])),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "principal suffix plaintext",
            vec![allow(
                "s",
                one(principals(vec![StringMatch::Suffix("/sa/frontend".into())])),
            )],
            Plain,
            80,
            Some("apps/s"),
        ),
        case(
            "principal values are ORed",
            vec![allow(
                "or",
                one(principals(vec![
                    exact("cluster.local/ns/x/sa/y"),
                    exact("cluster.local/ns/legacy/sa/old"),
                ])),
            )],
            Legacy,
            80,
            None,
        ),
        case(
            "presence mtls",
            vec![allow("any", one(principals(vec![StringMatch::Presence])))],
            Frontend,
            80,
            None,
        ),
        case(
            "presence plaintext",
            vec![allow("any", one(principals(vec![StringMatch::Presence])))],
            Plain,
            80,
            Some("apps/any"),
        ),
        // PeerAuthentication STRICT (not_principals: [presence]).
        case(
            "static strict denies plaintext",
            vec![static_strict()],
            Plain,
            80,
            Some("istio-system/istio_converted_static_strict"),
        ),
        case(
            "static strict lets mtls in",
            vec![static_strict()],
            Legacy,
            80,
            None,
        ),
        case(
            "not_principals exact",
            vec![deny(
                "not-fe",
                one(Match {
                    not_principals: vec![exact("cluster.local/ns/apps/sa/frontend")],
                    ..Default::default()
                }),
            )],
            Legacy,
            80,
            Some("apps/not-fe"),
        ),
        case(
            "not_principals exact, the excepted peer",
            vec![deny(
                "not-fe",
                one(Match {
                    not_principals: vec![exact("cluster.local/ns/apps/sa/frontend")],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "port-level strict: plaintext on strict port",
            strict_except_8081(),
            Plain,
            8080,
            Some("apps/converted_peer_authentication_pa"),
        ),
        case(
            "port-level strict: plaintext on permissive port",
            strict_except_8081(),
            Plain,
            8081,
            None,
        ),
        case(
            "port-level strict: mtls on strict port",
            strict_except_8081(),
            Frontend,
            8080,
            None,
        ),
        // Namespaces.
        case(
            "namespace allow",
            vec![allow(
                "ns",
                one(Match {
                    namespaces: vec![exact(NS)],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "namespace allow other",
            vec![allow(
                "ns",
                one(Match {
                    namespaces: vec![exact(NS)],
                    ..Default::default()
                }),
            )],
            Legacy,
            80,
            Some("apps/ns"),
        ),
        case(
            "namespace allow plaintext",
            vec![allow(
                "ns",
                one(Match {
                    namespaces: vec![exact(NS)],
                    ..Default::default()
                }),
            )],
            Plain,
            80,
            Some("apps/ns"),
        ),
        case(
            "namespace prefix",
            vec![allow(
                "ns",
                one(Match {
                    namespaces: vec![StringMatch::Prefix("leg".into())],
                    ..Default::default()
                }),
            )],
            Legacy,
            80,
            None,
        ),
        case(
            "not_namespaces excludes",
            vec![allow(
                "not-legacy",
                one(Match {
                    not_namespaces: vec![exact("legacy")],
                    ..Default::default()
                }),
            )],
            Legacy,
            80,
            Some("apps/not-legacy"),
        ),
        case(
            "not_namespaces is satisfied without an identity",
            vec![allow(
                "not-legacy",
                one(Match {
                    not_namespaces: vec![exact("legacy")],
                    ..Default::default()
                }),
            )],
            Plain,
            80,
            None,
        ),
        // Service accounts.
        case(
            "service account",
            vec![allow(
                "sa",
                one(Match {
                    service_accounts: vec![sa(NS, "frontend")],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "service account, same name other namespace",
            vec![allow(
                "sa",
                one(Match {
                    service_accounts: vec![sa("legacy", "frontend")],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            Some("apps/sa"),
        ),
        case(
            "service account plaintext",
            vec![allow(
                "sa",
                one(Match {
                    service_accounts: vec![sa(NS, "frontend")],
                    ..Default::default()
                }),
            )],
            Plain,
            80,
            Some("apps/sa"),
        ),
        case(
            "not_service_accounts",
            vec![allow(
                "not-old",
                one(Match {
                    not_service_accounts: vec![sa("legacy", "old")],
                    ..Default::default()
                }),
            )],
            Legacy,
            80,
            Some("apps/not-old"),
        ),
        case(
            "not_service_accounts other",
            vec![allow(
                "not-old",
                one(Match {
                    not_service_accounts: vec![sa("legacy", "old")],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            None,
        ),
        // Source CIDRs.
        case(
            "/32 exact",
            allow_src("10.0.1.5/32"),
            FrontendAt("10.0.1.5"),
            80,
            None,
        ),
        case(
            "/32 neighbour",
            allow_src("10.0.1.5/32"),
            FrontendAt("10.0.1.6"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "/8 last address",
            allow_src("10.0.0.0/8"),
            FrontendAt("10.255.255.255"),
            80,
            None,
        ),
        case(
            "/8 next block",
            allow_src("10.0.0.0/8"),
            FrontendAt("11.0.0.0"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "unmasked block",
            allow_src("10.1.2.3/16"),
            FrontendAt("10.1.200.1"),
            80,
            None,
        ),
        case(
            "/0 any v4",
            allow_src("0.0.0.0/0"),
            FrontendAt("203.0.113.9"),
            80,
            None,
        ),
        case(
            "v4 /0 never matches v6",
            allow_src("0.0.0.0/0"),
            FrontendAt("fd00::1"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "v6 /0 never matches v4",
            allow_src("::/0"),
            FrontendAt("10.0.1.5"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "v6 /64 inside",
            allow_src("fd00::/64"),
            FrontendAt("fd00::ffff:1"),
            80,
            None,
        ),
        case(
            "v6 /64 outside",
            allow_src("fd00::/64"),
            FrontendAt("fd00:0:0:1::1"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "v6 /128",
            allow_src("fd00::7/128"),
            FrontendAt("fd00::7"),
            80,
            None,
        ),
        case(
            "v6 /128 neighbour",
            allow_src("fd00::7/128"),
            FrontendAt("fd00::8"),
            80,
            Some("apps/allow-src"),
        ),
        case(
            "deny plaintext range",
            vec![deny(
                "deny-lan",
                one(Match {
                    source_ips: vec![block("192.168.0.0/16")],
                    ..Default::default()
                }),
            )],
            Plain,
            80,
            Some("apps/deny-lan"),
        ),
        case(
            "not_source_ips",
            vec![allow(
                "not-lan",
                one(Match {
                    not_source_ips: vec![block("192.168.0.0/16")],
                    ..Default::default()
                }),
            )],
            Plain,
            80,
            Some("apps/not-lan"),
        ),
        // Ports.
        case(
            "port list hit",
            allow_ports(vec![80, 8080]),
            Frontend,
            8080,
            None,
        ),
        case(
            "port list miss",
            allow_ports(vec![80, 8080]),
            Frontend,
            9090,
            Some("apps/allow-ports"),
        ),
        case(
            "not_destination_ports",
            vec![deny(
                "not-health",
                one(Match {
                    not_destination_ports: vec![15021],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            Some("apps/not-health"),
        ),
        case(
            "not_destination_ports, the excepted port",
            vec![deny(
                "not-health",
                one(Match {
                    not_destination_ports: vec![15021],
                    ..Default::default()
                }),
            )],
            Frontend,
            15021,
            None,
        ),
        // Fields of one match are ANDed; clauses of one rule are ANDed.
        case(
            "principal and port in one match",
            vec![allow(
                "and",
                one(Match {
                    principals: vec![exact("cluster.local/ns/apps/sa/frontend")],
                    destination_ports: vec![80],
                    ..Default::default()
                }),
            )],
            Frontend,
            81,
            Some("apps/and"),
        ),
        case(
            "principal clause and port clause",
            vec![allow(
                "and",
                all_of(vec![
                    vec![principals(vec![exact("cluster.local/ns/apps/sa/frontend")])],
                    vec![Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                ]),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "matches of one clause are ORed",
            vec![allow(
                "or",
                all_of(vec![vec![
                    principals(vec![exact("nobody")]),
                    Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    },
                ]]),
            )],
            Legacy,
            80,
            None,
        ),
        case(
            "a clause with no matches never matches",
            vec![allow("no-matches", all_of(vec![vec![]]))],
            Frontend,
            80,
            Some("apps/no-matches"),
        ),
        // Scope.
        case(
            "global policy applies in every namespace",
            vec![policy(
                "istio-system",
                "global-deny-legacy",
                PolicyScope::Global,
                PolicyAction::Deny,
                deny_legacy_ns().rules,
            )],
            Legacy,
            80,
            Some("istio-system/global-deny-legacy"),
        ),
        case(
            "another namespace's policy does not apply",
            vec![policy(
                "other",
                "deny-all",
                PolicyScope::Namespace,
                PolicyAction::Deny,
                everything(),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "another namespace's allow-nothing does not apply",
            vec![policy(
                "other",
                "allow-nothing",
                PolicyScope::Namespace,
                PolicyAction::Allow,
                vec![],
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "listed selector policy applies",
            vec![policy(
                NS,
                "sel-listed",
                PolicyScope::WorkloadSelector,
                PolicyAction::Deny,
                everything(),
            )],
            Frontend,
            80,
            Some("apps/sel-listed"),
        ),
        case(
            "unlisted selector policy does not apply",
            vec![policy(
                NS,
                "sel-unlisted",
                PolicyScope::WorkloadSelector,
                PolicyAction::Deny,
                everything(),
            )],
            Frontend,
            80,
            None,
        ),
        case(
            "unlisted selector allow does not make allow-list mode",
            vec![policy(
                NS,
                "sel-unlisted",
                PolicyScope::WorkloadSelector,
                PolicyAction::Allow,
                vec![],
            )],
            Frontend,
            80,
            None,
        ),
        // Dry run.
        case(
            "dry-run deny is not enforced",
            vec![dry(deny("deny-all", everything()))],
            Frontend,
            80,
            None,
        ),
        case(
            "dry-run allow-nothing is not enforced",
            vec![dry(allow("allow-nothing", vec![]))],
            Frontend,
            80,
            None,
        ),
        case(
            "dry-run allow does not rescue",
            vec![allow_frontend(), dry(allow("allow-all", everything()))],
            Legacy,
            80,
            Some("apps/allow-frontend"),
        ),
        // Several ALLOWs: any one suffices.
        case(
            "second allow matches",
            vec![
                allow("a", one(principals(vec![exact("nobody")]))),
                allow_frontend(),
            ],
            Frontend,
            80,
            None,
        ),
        case(
            "global allow counts with namespace allow",
            vec![
                policy(
                    "istio-system",
                    "allow-legacy",
                    PolicyScope::Global,
                    PolicyAction::Allow,
                    one(Match {
                        namespaces: vec![exact("legacy")],
                        ..Default::default()
                    }),
                ),
                allow_frontend(),
            ],
            Legacy,
            80,
            None,
        ),
    ];
    // Destination addresses.
    let dst_allow = || {
        vec![allow(
            "dst",
            one(Match {
                destination_ips: vec![block("10.0.0.2/32")],
                ..Default::default()
            }),
        )]
    };
    v.push(Case {
        dst_ip: Some("10.0.0.2"),
        ..case("destination ip hit", dst_allow(), Frontend, 80, None)
    });
    v.push(Case {
        dst_ip: Some("10.0.0.3"),
        ..case(
            "destination ip miss",
            dst_allow(),
            Frontend,
            80,
            Some("apps/dst"),
        )
    });
    v.push(Case {
        dst_ip: Some("10.0.0.2"),
        ..case(
            "not_destination_ips",
            vec![deny(
                "not-dst",
                one(Match {
                    not_destination_ips: vec![block("10.0.0.0/24")],
                    ..Default::default()
                }),
            )],
            Frontend,
            80,
            None,
        )
    });
    v
}

#[test]
fn policy_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let w = dst_workload();
    let mut failures = Vec::new();
    for c in &cases {
        let snap = Snapshot::with_policies(vec![w.clone()], vec![], c.policies.clone());
        let mut conn = c.src.conn(c.port);
        if let Some(ip) = c.dst_ip {
            conn.dst_ip = ip.parse().unwrap();
        }
        let got = evaluate(&snap, &w, &conn);
        let ok = match (&got, c.expect) {
            (Verdict::Allow, None) => true,
            (Verdict::Deny { policy, .. }, Some(want)) => policy == want,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                c.name, c.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reasons_name_the_policy() {
    let w = dst_workload();
    let snap = Snapshot::with_policies(vec![w.clone()], vec![], vec![deny_legacy_ns()]);
    assert_eq!(
        evaluate(&snap, &w, &Src::Legacy.conn(80)),
        Verdict::Deny {
            policy: "apps/deny-legacy".into(),
            reason: "denied by DENY policy apps/deny-legacy".into(),
        }
    );
    let snap = Snapshot::with_policies(
        vec![w.clone()],
        vec![],
        vec![allow_frontend(), allow("b-allow", vec![])],
    );
    assert_eq!(
        evaluate(&snap, &w, &Src::Legacy.conn(80)),
        Verdict::Deny {
            policy: "apps/allow-frontend,apps/b-allow".into(),
            reason: "no ALLOW policy matched (apps/allow-frontend,apps/b-allow)".into(),
        }
    );
}

#[test]
fn the_snapshot_indexes_policies_by_scope() {
    let snap = Snapshot::with_policies(
        vec![],
        vec![],
        vec![
            policy(
                "istio-system",
                "g",
                PolicyScope::Global,
                PolicyAction::Deny,
                vec![],
            ),
            deny_legacy_ns(),
            allow_frontend(),
            policy(
                "other",
                "x",
                PolicyScope::Namespace,
                PolicyAction::Deny,
                vec![],
            ),
            policy(
                NS,
                "sel-listed",
                PolicyScope::WorkloadSelector,
                PolicyAction::Deny,
                vec![],
            ),
        ],
    );
    let names = |ps: &[Arc<Authorization>]| ps.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(snap.global_policies()), ["g"]);
    assert_eq!(
        names(snap.namespace_policies(NS)),
        ["allow-frontend", "deny-legacy"]
    );
    assert_eq!(names(snap.namespace_policies("other")), ["x"]);
    assert!(snap.namespace_policies("nowhere").is_empty());
    assert!(snap.policy("apps/sel-listed").is_some());
}

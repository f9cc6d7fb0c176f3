use mesh_proto::waypoint as pb;

use super::*;

fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(s.into())),
    }
}

fn prefix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Prefix(s.into())),
    }
}

fn policy(name: &str, action: pb::PolicyAction, rules: Vec<pb::PolicyRule>) -> Arc<Policy> {
    Arc::new(
        Policy::compile(&pb::Policy {
            name: name.into(),
            namespace: "shop".into(),
            action: action as i32,
            targets: vec!["web.shop.svc.cluster.local".into()],
            rules,
            dry_run: false,
        })
        .unwrap(),
    )
}

struct Req {
    principal: Option<&'static str>,
    ns: Option<&'static str>,
    ip: &'static str,
    method: &'static str,
    path: &'static str,
    headers: HeaderMap,
}

fn req(principal: &'static str, method: &'static str, path: &'static str) -> Req {
    Req {
        principal: Some(principal),
        ns: principal.split('/').nth(2),
        ip: "198.18.1.10",
        method,
        path,
        headers: HeaderMap::new(),
    }
}

fn verdict(policies: &[Arc<Policy>], r: &Req) -> &'static str {
    let a = Attributes {
        principal: r.principal,
        source_namespace: r.ns,
        source_ip: r.ip.parse().unwrap(),
        host: "web.shop.svc.cluster.local",
        path: r.path,
        method: r.method,
        port: 80,
        headers: &r.headers,
    };
    match evaluate(policies, &a, &mut Vec::new()) {
        Verdict::Allow => "allow",
        Verdict::Deny { .. } => "deny",
    }
}

const CLIENT: &str = "cluster.local/ns/shop/sa/client";
const OTHER: &str = "cluster.local/ns/legacy/sa/batch";

#[test]
fn deny_on_a_path_leaves_other_paths_alone() {
    let deny_admin = policy(
        "no-admin",
        pb::PolicyAction::Deny,
        vec![pb::PolicyRule {
            to: vec![pb::PolicyOperation {
                paths: vec![exact("/admin"), prefix("/admin/")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let p = [deny_admin];
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/admin")), "deny");
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/admin/users")), "deny");
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/")), "allow");
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/administrator")), "allow");
}

#[test]
fn allow_needs_a_match_and_deny_wins() {
    let allow_shop_get = policy(
        "shop-get",
        pb::PolicyAction::Allow,
        vec![pb::PolicyRule {
            from: vec![pb::PolicySource {
                namespaces: vec![exact("shop")],
                ..Default::default()
            }],
            to: vec![pb::PolicyOperation {
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let deny_principal = policy(
        "no-client-secret",
        pb::PolicyAction::Deny,
        vec![pb::PolicyRule {
            from: vec![pb::PolicySource {
                principals: vec![exact(CLIENT)],
                ..Default::default()
            }],
            to: vec![pb::PolicyOperation {
                paths: vec![exact("/secret")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let p = [allow_shop_get, deny_principal];
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/")), "allow");
    assert_eq!(verdict(&p, &req(CLIENT, "POST", "/")), "deny");
    assert_eq!(verdict(&p, &req(OTHER, "GET", "/")), "deny");
    assert_eq!(verdict(&p, &req(CLIENT, "GET", "/secret")), "deny");
    // Without an identity, a namespace condition cannot hold.
    let mut anon = req(CLIENT, "GET", "/");
    anon.principal = None;
    anon.ns = None;
    assert_eq!(verdict(&p, &anon), "deny");
}

#[test]
fn no_rules_allows_nothing_and_an_empty_rule_everything() {
    let nothing = policy("nothing", pb::PolicyAction::Allow, vec![]);
    assert_eq!(verdict(&[nothing], &req(CLIENT, "GET", "/")), "deny");
    let everything = policy(
        "all",
        pb::PolicyAction::Allow,
        vec![pb::PolicyRule::default()],
    );
    assert_eq!(verdict(&[everything], &req(OTHER, "DELETE", "/x")), "allow");
    assert_eq!(verdict(&[], &req(OTHER, "DELETE", "/x")), "allow");
}

#[test]
fn negations_ip_blocks_and_conditions() {
    let p = policy(
        "mixed",
        pb::PolicyAction::Allow,
        vec![pb::PolicyRule {
            from: vec![pb::PolicySource {
                not_principals: vec![prefix("cluster.local/ns/legacy/")],
                ip_blocks: vec!["198.18.0.0/16".into()],
                ..Default::default()
            }],
            to: vec![pb::PolicyOperation {
                not_methods: vec!["DELETE".into()],
                ..Default::default()
            }],
            when: vec![pb::PolicyCondition {
                key: "request.headers[x-team]".into(),
                values: vec![exact("blue")],
                not_values: vec![],
            }],
        }],
    );
    let p = [p];
    let mut r = req(CLIENT, "GET", "/");
    assert_eq!(verdict(&p, &r), "deny", "the header condition is missing");
    r.headers.insert("x-team", "blue".parse().unwrap());
    assert_eq!(verdict(&p, &r), "allow");
    r.method = "DELETE";
    assert_eq!(verdict(&p, &r), "deny");
    let mut o = req(OTHER, "GET", "/");
    o.headers.insert("x-team", "blue".parse().unwrap());
    assert_eq!(verdict(&p, &o), "deny");
    let mut far = req(CLIENT, "GET", "/");
    far.headers.insert("x-team", "blue".parse().unwrap());
    far.ip = "10.1.2.3";
    assert_eq!(verdict(&p, &far), "deny");
}

#[test]
fn dry_run_is_reported_not_enforced() {
    let mut deny = pb::Policy {
        name: "dry".into(),
        namespace: "shop".into(),
        action: pb::PolicyAction::Deny as i32,
        rules: vec![pb::PolicyRule::default()],
        dry_run: true,
        ..Default::default()
    };
    let p = [Arc::new(Policy::compile(&deny).unwrap())];
    let r = req(CLIENT, "GET", "/");
    let a = Attributes {
        principal: r.principal,
        source_namespace: r.ns,
        source_ip: r.ip.parse().unwrap(),
        host: "h",
        path: r.path,
        method: r.method,
        port: 80,
        headers: &r.headers,
    };
    let mut dry = Vec::new();
    assert_eq!(evaluate(&p, &a, &mut dry), Verdict::Allow);
    assert_eq!(
        dry,
        vec![DryRun {
            policy: "shop/dry".into(),
            would: "deny"
        }]
    );
    deny.dry_run = false;
    let p = [Arc::new(Policy::compile(&deny).unwrap())];
    assert!(matches!(
        evaluate(&p, &a, &mut Vec::new()),
        Verdict::Deny { .. }
    ));
}

#[test]
fn bad_policies_are_rejected() {
    let bad_cidr = pb::Policy {
        rules: vec![pb::PolicyRule {
            from: vec![pb::PolicySource {
                ip_blocks: vec!["10.0.0.0/40".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = Policy::compile(&bad_cidr).unwrap_err().to_string();
    assert!(e.contains("10.0.0.0/40"), "{e}");
    let bad_key = pb::Policy {
        rules: vec![pb::PolicyRule {
            when: vec![pb::PolicyCondition {
                key: "request.auth.claims[iss]".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = Policy::compile(&bad_key).unwrap_err().to_string();
    assert!(e.contains("request.auth.claims"), "{e}");
}

#[test]
fn cidrs_contain_what_they_should() {
    let c = Cidr::parse("198.18.0.0/15").unwrap();
    assert!(c.contains("198.19.255.1".parse().unwrap()));
    assert!(!c.contains("198.20.0.1".parse().unwrap()));
    assert!(
        Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap())
    );
    assert!(
        Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap())
    );
    assert!(
        !Cidr::parse("fd00::/8")
            .unwrap()
            .contains("10.0.0.1".parse().unwrap())
    );
    assert!(
        Cidr::parse("10.0.0.1")
            .unwrap()
            .contains("10.0.0.1".parse().unwrap())
    );
}

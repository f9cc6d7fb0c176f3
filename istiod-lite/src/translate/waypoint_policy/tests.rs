use mesh_proto::waypoint as pb;
use pb::string_match::Kind as M;
use serde_json::Value;

use super::super::tests::run;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, selector: {app: web}, ports: [{name: http, port: 80}]}
"#;

fn with(policy: &str) -> super::super::Output {
    run(&format!(
        "{BASE}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
{policy}"
    ))
}

fn condition(out: &super::super::Output, name: &str) -> Value {
    out.statuses
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"))
        .status["conditions"][0]
        .clone()
}

fn m(k: M) -> pb::StringMatch {
    pb::StringMatch { kind: Some(k) }
}

#[test]
fn a_targetref_policy_goes_to_waypoints_with_istio_string_syntax() {
    let out = with(
        "metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: 'true'}}
spec:
  targetRefs:
  - {kind: Service, group: '', name: web}
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/client, '*/sa/admin'], namespaces: [shop], notIpBlocks: [198.18.9.0/24]}
    - source: {serviceAccounts: [front/client]}
    to:
    - operation: {paths: [/api/*], methods: [GET], hosts: ['*.local'], ports: ['80']}
    when:
    - {key: 'request.headers[X-Token]', values: ['*']}
    - {key: source.namespace, notValues: [legacy]}
",
    );
    assert!(out.authorizations.is_empty(), "not sent to ztunnel");
    let p = &out.waypoint_policies["shop/p"];
    assert_eq!(
        p.targets,
        vec![
            "gateway:shop/waypoint".to_owned(),
            "web.shop.svc.cluster.local".to_owned()
        ]
    );
    assert_eq!(p.action, pb::PolicyAction::Allow as i32);
    assert!(p.dry_run);
    let r = &p.rules[0];
    assert_eq!(
        r.from[0].principals,
        vec![
            m(M::Exact("cluster.local/ns/shop/sa/client".into())),
            m(M::Suffix("/sa/admin".into()))
        ]
    );
    assert_eq!(r.from[0].namespaces, vec![m(M::Exact("shop".into()))]);
    assert_eq!(r.from[0].not_ip_blocks, vec!["198.18.9.0/24"]);
    assert_eq!(
        r.from[1].principals,
        vec![m(M::Suffix("/ns/front/sa/client".into()))]
    );
    assert_eq!(r.to[0].paths, vec![m(M::Prefix("/api/".into()))]);
    assert_eq!(r.to[0].methods, vec!["GET"]);
    assert_eq!(r.to[0].hosts, vec![m(M::Suffix(".local".into()))]);
    assert_eq!(r.to[0].ports, vec![80]);
    assert_eq!(r.when[0].key, "request.headers[x-token]");
    assert_eq!(r.when[0].values, vec![m(M::Presence(true))]);
    assert_eq!(r.when[1].not_values, vec![m(M::Exact("legacy".into()))]);
    let c = condition(&out, "p");
    assert_eq!(c["type"], "WaypointAccepted");
    assert_eq!(c["status"], "True");
}

#[test]
fn what_the_waypoint_cannot_evaluate_fails_safe() {
    let rules = "  rules:
  - to: [{operation: {paths: [/a]}}]
    when: [{key: 'request.auth.claims[iss]', values: [x]}]
  - to: [{operation: {paths: [/b]}}]
  - from: [{source: {requestPrincipals: ['*']}}]
";
    let target = "  targetRefs: [{kind: Service, group: '', name: web}]\n";
    let allow = with(&format!(
        "metadata: {{name: p, namespace: shop}}\nspec:\n{target}  action: ALLOW\n{rules}"
    ));
    let p = &allow.waypoint_policies["shop/p"];
    assert_eq!(
        p.rules.len(),
        1,
        "the ALLOW rule needing a JWT claim and the one needing a request principal are dropped"
    );
    assert_eq!(p.rules[0].to[0].paths, vec![m(M::Exact("/b".into()))]);
    let c = condition(&allow, "p");
    assert_eq!(c["reason"], "UnsupportedValue");
    assert!(
        c["message"].as_str().unwrap().contains("allows less"),
        "{c}"
    );

    let deny = with(&format!(
        "metadata: {{name: p, namespace: shop}}\nspec:\n{target}  action: DENY\n{rules}"
    ));
    let p = &deny.waypoint_policies["shop/p"];
    assert_eq!(p.rules.len(), 2, "the DENY rule keeps its other parts");
    assert!(p.rules[0].when.is_empty());
    assert!(
        condition(&deny, "p")["message"]
            .as_str()
            .unwrap()
            .contains("denies more")
    );
}

#[test]
fn custom_denies_everything_audit_does_nothing_and_bad_targets_are_reported() {
    let out = run(&format!(
        "{BASE}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  action: CUSTOM
  provider: {{name: opa}}
  rules: [{{to: [{{operation: {{paths: [/x]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: audit, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  action: AUDIT
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: lost, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: gone}}, {{kind: Deployment, group: apps, name: web}}]
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: nothing, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
"
    ));
    let ext = &out.waypoint_policies["shop/ext"];
    assert_eq!(ext.action, pb::PolicyAction::Deny as i32);
    assert_eq!(
        ext.rules,
        vec![pb::PolicyRule::default()],
        "matches every request"
    );
    let c = condition(&out, "ext");
    assert_eq!(c["status"], "False");
    assert!(c["message"].as_str().unwrap().contains("CUSTOM"), "{c}");

    assert!(!out.waypoint_policies.contains_key("shop/audit"));
    assert_eq!(condition(&out, "audit")["status"], "False");

    assert!(!out.waypoint_policies.contains_key("shop/lost"));
    let c = condition(&out, "lost");
    assert_eq!(c["reason"], "TargetNotFound");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("shop/gone") && msg.contains("apps/Deployment"),
        "{msg}"
    );

    // No rules field: an ALLOW that matches nothing, so it denies every request.
    let p = &out.waypoint_policies["shop/nothing"];
    assert!(p.rules.is_empty());
    assert_eq!(p.action, pb::PolicyAction::Allow as i32);
}

use mesh_proto::waypoint as pb;
use serde_json::Value;

use super::super::tests::{run, state};
use crate::model::Object;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
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
metadata: {name: waypoint, namespace: shop, labels: {gateway.istio.io/managed: istio.io-mesh-controller}}
spec: {clusterIP: 198.18.99.10, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {clusterIP: 198.18.100.2, selector: {app: web, version: v2}, ports: [{name: http, port: 8080}]}
"#;

fn route<'a>(out: &'a super::super::Output, name: &str) -> &'a pb::Route {
    out.routes
        .get(name)
        .unwrap_or_else(|| panic!("no route {name}; have {:?}", out.routes.keys()))
}

fn status(out: &super::super::Output, name: &str) -> Value {
    out.statuses
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"))
        .status
        .clone()
}

#[test]
fn an_httproute_becomes_a_route_with_defaults_filled_in() {
    let out = run(&format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop, creationTimestamp: '2024-02-29T12:00:00Z'}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, port: 80}}]
  rules:
  - matches:
    - path: {{type: Exact, value: /exact}}
      headers: [{{name: X-Version, value: v2}}]
      queryParams: [{{type: RegularExpression, name: q, value: 'a.*'}}]
      method: POST
    - headers: [{{name: x-any, value: '1'}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: X-Set, value: s}}], add: [{{name: X-Add, value: a}}], remove: [X-Gone]}}
    backendRefs: [{{name: web, port: 80, weight: 90}}, {{name: web-v2, port: 8080}}]
    timeouts: {{request: 2s, backendRequest: 500ms}}
    retry: {{attempts: 2, codes: [503], backoff: 100ms}}
  - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}
"
    ));
    let r = route(&out, "shop/httproute/web");
    assert_eq!(r.kind, pb::RouteKind::Http as i32);
    assert_eq!(r.created, 1_709_208_000);
    assert_eq!(
        r.parents,
        vec![pb::ParentService {
            hostname: "web.shop.svc.cluster.local".into(),
            port: 80
        }]
    );
    let rule = &r.rules[0];
    let m = &rule.matches[0];
    assert_eq!(
        m.path,
        Some(pb::PathMatch {
            kind: pb::MatchKind::Exact as i32,
            value: "/exact".into()
        })
    );
    assert_eq!(
        m.headers[0].name, "x-version",
        "header names are lower-cased"
    );
    assert_eq!(m.headers[0].kind, pb::MatchKind::Exact as i32);
    assert_eq!(m.query[0].kind, pb::MatchKind::Regex as i32);
    assert_eq!(m.method, "POST");
    assert_eq!(
        rule.matches[1].path,
        Some(pb::PathMatch {
            kind: pb::MatchKind::Prefix as i32,
            value: "/".into()
        }),
        "no path means prefix /"
    );
    let Some(pb::filter::Kind::RequestHeaders(h)) = &rule.filters[0].kind else {
        panic!("{:?}", rule.filters)
    };
    assert_eq!(h.set[0].name, "x-set");
    assert_eq!(h.remove, vec!["x-gone"]);
    assert_eq!(rule.backends.len(), 2);
    assert_eq!(
        (rule.backends[0].weight, rule.backends[1].weight),
        (90, 1),
        "weight defaults to 1"
    );
    assert_eq!(rule.backends[1].hostname, "web-v2.shop.svc.cluster.local");
    assert!(rule.backends.iter().all(|b| b.invalid.is_empty()));
    assert_eq!(
        (rule.request_timeout_ms, rule.backend_timeout_ms),
        (2000, 500)
    );
    assert_eq!(
        rule.retry,
        Some(pb::Retry {
            attempts: 2,
            codes: vec![503],
            backoff_ms: 100
        })
    );
    let Some(pb::filter::Kind::Redirect(redirect)) = &r.rules[1].filters[0].kind else {
        panic!("{:?}", r.rules[1].filters)
    };
    assert_eq!(redirect.status_code, 302, "redirects default to 302");
    assert!(r.rules[1].backends.is_empty());
    let st = status(&out, "web");
    assert_eq!(st["parents"][0]["conditions"][0]["status"], "True");
    assert_eq!(st["parents"][0]["conditions"][1]["status"], "True");
}

#[test]
fn grpcroute_methods_become_paths() {
    let out = run(&format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: api, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web}}]
  rules:
  - matches:
    - method: {{service: echo.Echo, method: Say}}
    - method: {{service: echo.Echo}}
    - method: {{method: Say}}
    - method: {{type: RegularExpression, service: 'echo\\..*', method: 'S.*'}}
    - headers: [{{name: x-h, value: v}}]
    backendRefs: [{{name: web-v2, port: 8080}}]
"
    ));
    let r = route(&out, "shop/grpcroute/api");
    assert_eq!(r.kind, pb::RouteKind::Grpc as i32);
    let paths: Vec<(i32, String)> = r.rules[0]
        .matches
        .iter()
        .map(|m| {
            let p = m.path.clone().unwrap();
            (p.kind, p.value)
        })
        .collect();
    let (e, p, x) = (
        pb::MatchKind::Exact as i32,
        pb::MatchKind::Prefix as i32,
        pb::MatchKind::Regex as i32,
    );
    assert_eq!(
        paths,
        vec![
            (e, "/echo.Echo/Say".into()),
            (p, "/echo.Echo/".into()),
            (x, "/[^/]+/Say".into()),
            (x, "/(?:echo\\..*)/(?:S.*)".into()),
            (p, "/".into()),
        ]
    );
}

#[test]
fn unusable_backends_stay_in_the_rule_marked_invalid_and_status_says_why() {
    let out = run(&format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: missing, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web}}]
  rules: [{{backendRefs: [{{name: web, port: 80}}, {{name: nope, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: no-port, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web}}]
  rules: [{{backendRefs: [{{name: web}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: front}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, namespace: shop}}]
  rules: [{{backendRefs: [{{name: web-v2, namespace: shop, port: 8080}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: consumer, namespace: front}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, namespace: shop}}]
  rules: [{{backendRefs: [{{name: web, namespace: shop, port: 80}}]}}]
"
    ));
    let backends = |name: &str| route(&out, name).rules[0].backends.clone();
    let reason = |name: &str| status(&out, name)["parents"][0]["conditions"][1]["reason"].clone();

    let b = backends("shop/httproute/missing");
    assert!(b[0].invalid.is_empty());
    assert!(b[1].invalid.contains("not found"), "{}", b[1].invalid);
    assert_eq!(reason("missing"), "BackendNotFound");

    assert!(
        backends("shop/httproute/no-port")[0]
            .invalid
            .contains("port")
    );
    assert_eq!(reason("no-port"), "InvalidDestination");

    assert!(
        backends("front/httproute/elsewhere")[0]
            .invalid
            .contains("ReferenceGrant")
    );
    assert_eq!(reason("elsewhere"), "RefNotPermitted");

    // A ReferenceGrant in the backend's namespace lets HTTPRoutes from `front` use it.
    let granted = run(&format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: front}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, namespace: shop}}]
  rules: [{{backendRefs: [{{name: web-v2, namespace: shop, port: 8080}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: front-routes, namespace: shop}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: front}}]
  to: [{{group: '', kind: Service, name: web-v2}}]
"
    ));
    assert!(
        route(&granted, "front/httproute/elsewhere").rules[0].backends[0]
            .invalid
            .is_empty()
    );

    // A consumer route may send its clients on to the parent Service itself.
    assert!(backends("front/httproute/consumer")[0].invalid.is_empty());
    assert_eq!(reason("consumer"), "ResolvedRefs");
    assert_eq!(route(&out, "front/httproute/consumer").namespace, "front");
}

#[test]
fn routes_without_a_service_parent_are_not_sent() {
    let out = run(&format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-gateway, namespace: shop}}
spec:
  parentRefs: [{{name: waypoint}}]
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-nothing, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: gone}}]
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
"
    ));
    assert!(out.routes.is_empty(), "{:?}", out.routes.keys());
    let st = status(&out, "to-gateway");
    assert_eq!(
        st["parents"][0]["conditions"][0]["reason"],
        "NotAllowedByListeners"
    );
    assert_eq!(
        status(&out, "to-nothing")["parents"][0]["conditions"][0]["reason"],
        "NoMatchingParent"
    );
}

#[test]
fn the_waypoints_own_service_does_not_go_through_a_waypoint() {
    let out = run(BASE);
    let svc = |key: &str| match &out.addresses[key].r#type {
        Some(mesh_proto::workload::address::Type::Service(s)) => s.clone(),
        other => panic!("{other:?}"),
    };
    assert!(svc("shop/web.shop.svc.cluster.local").waypoint.is_some());
    assert!(
        svc("shop/waypoint.shop.svc.cluster.local")
            .waypoint
            .is_none()
    );
}

#[test]
fn malformed_routes_are_refused_naming_the_field() {
    let cases = [
        (
            "matches: [{path: {type: RegularExpression, value: '(('}}]",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "matches: [{path: {type: Exact, value: 'no-slash'}}]",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "matches: [{path: {type: Glob, value: /x}}]",
            "spec.rules[0].matches[0].path.type",
        ),
        (
            "matches: [{method: FETCH}]",
            "spec.rules[0].matches[0].method",
        ),
        (
            "filters: [{type: ExtensionRef, extensionRef: {name: x}}]",
            "spec.rules[0].filters[0].type",
        ),
        (
            "filters: [{type: RequestHeaderModifier}]",
            "spec.rules[0].filters[0].requestHeaderModifier",
        ),
        (
            "filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]",
            "spec.rules[0].filters[0].requestRedirect.statusCode",
        ),
        (
            "timeouts: {request: 2 seconds}",
            "spec.rules[0].timeouts.request",
        ),
        (
            "timeouts: {request: 1s, backendRequest: 2s}",
            "spec.rules[0].timeouts.backendRequest",
        ),
        ("retry: {codes: [200]}", "spec.rules[0].retry.codes[0]"),
        (
            "backendRefs: [{name: web, port: 80, weight: 2000000}]",
            "spec.rules[0].backendRefs[0].weight",
        ),
    ];
    let refused = |kind: &str, rule: &str, field: &str| {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: bad, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web}}]
  rules:
  - {rule}
"
        );
        let v: Value = serde_yaml::from_str(&yaml).unwrap();
        let err = Object::parse(v).expect_err(rule);
        assert_eq!(err.field, field, "{kind} {rule}: {}", err.message);
        assert_eq!(err.object, format!("{kind} shop/bad"));
    };
    for (rule, field) in cases {
        refused("HTTPRoute", rule, field);
    }
    // GRPCRoutes have no paths and their method match is a service/method pair.
    for (rule, field) in [
        (
            "matches: [{path: {value: /x}}]",
            "spec.rules[0].matches[0].path",
        ),
        ("matches: [{method: {}}]", "spec.rules[0].matches[0].method"),
        (
            "filters: [{type: URLRewrite, urlRewrite: {}}]",
            "spec.rules[0].filters[0].type",
        ),
    ] {
        refused("GRPCRoute", rule, field);
    }
}

#[test]
fn routes_reach_the_snapshot_and_a_change_is_one_delta() {
    use crate::xds::{Snapshot, SnapshotBuilder};
    let route = |v: &str| {
        format!(
            "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web}}]
  rules: [{{backendRefs: [{{name: web-v2, port: 8080, weight: {v}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin*]}}}}]}}]
"
        )
    };
    let mut b = SnapshotBuilder::new(Default::default());
    let s1 = b.build(&state(&route("1")), &Snapshot::default());
    assert!(
        s1.of_type(mesh_proto::ROUTE_TYPE_URL)
            .unwrap()
            .contains_key("shop/httproute/web")
    );
    assert!(
        s1.of_type(mesh_proto::WAYPOINT_POLICY_TYPE_URL)
            .unwrap()
            .contains_key("shop/deny-admin")
    );
    let s2 = b.build(&state(&route("2")), &s1);
    let d = &s2.deltas[mesh_proto::ROUTE_TYPE_URL];
    assert_eq!(d.changed.len(), 1);
    assert!(
        s2.deltas[mesh_proto::WAYPOINT_POLICY_TYPE_URL]
            .changed
            .is_empty()
    );
    let s3 = b.build(&state(BASE), &s2);
    assert_eq!(
        s3.deltas[mesh_proto::ROUTE_TYPE_URL].removed,
        vec!["shop/httproute/web"]
    );
    assert_eq!(
        s3.deltas[mesh_proto::WAYPOINT_POLICY_TYPE_URL].removed,
        vec!["shop/deny-admin"]
    );
}

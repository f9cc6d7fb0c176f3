use mesh_proto::security::{Action, Scope, string_match::MatchType};
use mesh_proto::workload::{TunnelProtocol, WorkloadStatus, address, gateway_address};
use serde_json::Value;

use super::*;
use crate::model::Object;

/// Builds a state from YAML documents.
pub(super) fn state(yaml: &str) -> State {
    use serde::Deserialize;
    let objects = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Object::parse(Value::deserialize(d).unwrap()).unwrap());
    State::from_objects(objects)
}

pub(super) fn run(yaml: &str) -> Output {
    translate(&state(yaml), &MeshOptions::default())
}

fn workload<'a>(out: &'a Output, ns: &str, name: &str) -> &'a workload::Workload {
    match &out.addresses[&format!("Kubernetes//Pod/{ns}/{name}")].r#type {
        Some(address::Type::Workload(w)) => w,
        other => panic!("not a workload: {other:?}"),
    }
}

fn service<'a>(out: &'a Output, key: &str) -> &'a workload::Service {
    match &out.addresses[key].r#type {
        Some(address::Type::Service(s)) => s,
        other => panic!("not a service: {other:?}"),
    }
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-7d9f-abcde
  namespace: apps
  labels: {app: echo, version: v2, pod-template-hash: 7d9f}
  ownerReferences: [{kind: ReplicaSet, name: echo-7d9f}]
spec:
  nodeName: node-a
  serviceAccountName: echo
  containers: [{ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 198.18.0.10, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: apps, labels: {istio.io/dataplane-mode: none, app: echo}}
spec: {nodeName: node-a}
status: {podIP: 198.18.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: node-b}
status: {podIP: 198.18.0.12, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: apps}
spec: {nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: apps}
spec:
  clusterIP: 198.19.0.1
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc-x, port: 90, targetPort: 9090}
  - {name: dns, port: 53, protocol: UDP}
"#;

#[test]
fn pods_become_workloads_enrolled_by_namespace_label() {
    let out = run(MESH);
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(echo.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(echo.addresses, vec![vec![198, 18, 0, 10]]);
    assert_eq!(echo.service_account, "echo");
    assert_eq!(echo.node, "node-a");
    assert_eq!(echo.canonical_name, "echo");
    assert_eq!(echo.canonical_revision, "v2");
    assert_eq!(echo.workload_name, "echo");
    assert_eq!(
        echo.workload_type,
        workload::WorkloadType::Deployment as i32
    );
    assert_eq!(echo.status, WorkloadStatus::Healthy as i32);
    assert_eq!(echo.cluster_id, "Kubernetes");

    let opted_out = workload(&out, "apps", "opted-out");
    assert_eq!(opted_out.tunnel_protocol, TunnelProtocol::None as i32);
    let old = workload(&out, "legacy", "old");
    assert_eq!(old.tunnel_protocol, TunnelProtocol::None as i32);
    assert_eq!(old.status, WorkloadStatus::Unhealthy as i32);
    assert!(
        !out.addresses.contains_key("Kubernetes//Pod/apps/pending"),
        "a pod without an IP is not routable"
    );
}

#[test]
fn services_map_ports_and_pods_resolve_named_target_ports() {
    let out = run(MESH);
    let svc = service(&out, "apps/echo.apps.svc.cluster.local");
    assert_eq!(svc.addresses[0].address, vec![198, 19, 0, 1]);
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port, p.app_protocol))
        .collect();
    assert_eq!(
        ports,
        vec![
            (80, 0, workload::AppProtocol::Http11 as i32),
            (90, 9090, workload::AppProtocol::Grpc as i32)
        ],
        "UDP ports are left out; a named target port is resolved per pod"
    );
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    let pl = &echo.services["apps/echo.apps.svc.cluster.local"];
    let mapped: Vec<_> = pl
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(mapped, vec![(80, 8080), (90, 9090)]);
    // The opted-out pod has no `http` container port: that service port is not mapped to it.
    let opted_out = workload(&out, "apps", "opted-out");
    let mapped: Vec<_> = opted_out.services["apps/echo.apps.svc.cluster.local"]
        .ports
        .iter()
        .map(|p| p.service_port)
        .collect();
    assert_eq!(mapped, vec![90]);
}

#[test]
fn removing_the_namespace_label_turns_workloads_back_to_plain_tcp() {
    let out = run(&MESH.replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}"));
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(echo.tunnel_protocol, TunnelProtocol::None as i32);
}

#[test]
fn selectorless_services_take_members_from_endpoint_slices() {
    let out = run(&format!(
        "{MESH}---
apiVersion: v1
kind: Service
metadata: {{name: manual, namespace: apps}}
spec: {{clusterIP: 198.19.0.2, ports: [{{name: web, port: 81}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: manual-1, namespace: apps, labels: {{kubernetes.io/service-name: manual}}}}
addressType: IPv4
endpoints: [{{addresses: [198.18.0.10], targetRef: {{kind: Pod, name: echo-7d9f-abcde}}}}]
ports: [{{name: web, port: 8081}}]
"
    ));
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    let pl = &echo.services["apps/manual.apps.svc.cluster.local"];
    assert_eq!(
        (pl.ports[0].service_port, pl.ports[0].target_port),
        (81, 8081)
    );
}

const WAYPOINTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: apps, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: svc-only, namespace: apps}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn waypoint_host(w: &Option<workload::GatewayAddress>) -> Option<String> {
    match w.as_ref()?.destination.as_ref()? {
        gateway_address::Destination::Hostname(h) => Some(h.hostname.clone()),
        gateway_address::Destination::Address(_) => None,
    }
}

#[test]
fn waypoint_binding_pod_then_namespace_for_workloads_service_then_namespace_for_services() {
    let yaml = format!("{MESH}---\n{WAYPOINTS}")
        .replace(
            "labels: {istio.io/dataplane-mode: ambient}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}",
        )
        .replace(
            "metadata: {name: echo, namespace: apps}",
            "metadata: {name: echo, namespace: apps, labels: {istio.io/use-waypoint: svc-only}}",
        );
    let out = run(&yaml);
    let svc = service(&out, "apps/echo.apps.svc.cluster.local");
    assert_eq!(
        waypoint_host(&svc.waypoint).as_deref(),
        Some("svc-only.apps.svc.cluster.local"),
        "the service's own label wins"
    );
    assert_eq!(svc.waypoint.as_ref().unwrap().hbone_mtls_port, 15008);
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(
        waypoint_host(&echo.waypoint).as_deref(),
        Some("wp.apps.svc.cluster.local"),
        "a service label never binds its pods; the namespace label does"
    );

    // A pod saying `none` opts out even though its namespace names a waypoint.
    let out = run(&yaml.replace(
        "labels: {app: echo, version: v2, pod-template-hash: 7d9f}",
        "labels: {app: echo, version: v2, pod-template-hash: 7d9f, istio.io/use-waypoint: none}",
    ));
    assert_eq!(workload(&out, "apps", "echo-7d9f-abcde").waypoint, None);

    // A waypoint for services only does not bind workloads; naming a missing one is reported.
    let out = run(&yaml.replace(
        "labels: {app: echo, version: v2, pod-template-hash: 7d9f}",
        "labels: {app: echo, version: v2, pod-template-hash: 7d9f, istio.io/use-waypoint: svc-only}",
    ));
    assert_eq!(workload(&out, "apps", "echo-7d9f-abcde").waypoint, None);
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("is for service traffic, not workload traffic")),
        "{:?}",
        out.warnings
    );
    let out = run(&yaml.replace("use-waypoint: svc-only}}", "use-waypoint: ghost}}"));
    assert_eq!(
        service(&out, "apps/echo.apps.svc.cluster.local").waypoint,
        None
    );
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("waypoint apps/ghost does not exist")),
        "{:?}",
        out.warnings
    );
}

fn authz<'a>(out: &'a Output, key: &str) -> &'a Authorization {
    out.authorizations
        .get(key)
        .unwrap_or_else(|| panic!("no policy {key}: {:?}", out.authorizations.keys()))
}

#[test]
fn authorization_policies_scope_and_shape() {
    let out = run(&format!(
        "{MESH}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-deny, namespace: istio-system}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: [203.0.113.0/24]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-allow, namespace: apps}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/apps/sa/client, '*-admin'], serviceAccounts: [client, other/sa]}}}}]
    to: [{{operation: {{ports: ['8080']}}}}]
    when: [{{key: source.namespace, values: [apps]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ns-wide, namespace: apps}}
spec: {{}}
"
    ));
    let p = authz(&out, "istio-system/mesh-deny");
    assert_eq!(p.scope, Scope::Global as i32);
    assert_eq!(p.action, Action::Deny as i32);
    assert_eq!(p.rules[0].clauses[0].matches[0].source_ips[0].length, 24);

    let p = authz(&out, "apps/echo-allow");
    assert_eq!(p.scope, Scope::WorkloadSelector as i32);
    assert_eq!(p.action, Action::Allow as i32);
    let clauses = &p.rules[0].clauses;
    assert_eq!(
        clauses.len(),
        3,
        "to, from and one per when: all must match"
    );
    assert_eq!(clauses[0].matches[0].destination_ports, vec![8080]);
    let from = &clauses[1].matches[0];
    assert_eq!(
        from.principals[0].match_type,
        Some(MatchType::Exact("cluster.local/ns/apps/sa/client".into()))
    );
    assert_eq!(
        from.principals[1].match_type,
        Some(MatchType::Suffix("-admin".into()))
    );
    assert_eq!(from.service_accounts[0].namespace, "apps");
    assert_eq!(from.service_accounts[1].namespace, "other");
    assert_eq!(
        clauses[2].matches[0].namespaces[0].match_type,
        Some(MatchType::Exact("apps".into()))
    );

    // An ALLOW with no rules is sent as-is: it allows nothing in its namespace.
    let p = authz(&out, "apps/ns-wide");
    assert_eq!(p.scope, Scope::Namespace as i32);
    assert!(p.rules.is_empty());

    // Only selector policies are listed on workloads.
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(echo.authorization_policies, vec!["apps/echo-allow"]);
}

#[test]
fn l7_fields_fail_safe_for_ztunnel() {
    let out = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: apps}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: [apps]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: apps}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [bad]}}]
    to: [{operation: {methods: [POST], ports: ['80']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: apps}
spec: {action: AUDIT, rules: [{}]}
"#);
    // ALLOW: the rule needing HTTP methods is dropped; the other stays.
    let p = authz(&out, "apps/allow-get");
    assert_eq!(p.rules.len(), 1);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].namespaces[0].match_type,
        Some(MatchType::Exact("apps".into()))
    );
    // DENY: the method is dropped, the port and namespace still deny.
    let p = authz(&out, "apps/deny-post");
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].clauses[0].matches[0].destination_ports, vec![80]);
    let status = |name: &str| {
        out.statuses.iter().find(|s| s.name == name).unwrap().status["conditions"][0].clone()
    };
    assert_eq!(status("allow-get")["reason"], "UnsupportedValue");
    assert!(
        status("allow-get")["message"]
            .as_str()
            .unwrap()
            .contains("to.operation.methods"),
    );
    assert_eq!(status("deny-post")["reason"], "UnsupportedValue");
    assert!(!out.authorizations.contains_key("apps/audit"));
    assert_eq!(status("audit")["status"], "False");
}

#[test]
fn peer_authentication_strict_and_port_exceptions() {
    let base = format!(
        "{MESH}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"
    );
    let out = run(&base);
    let p = authz(&out, "istio-system/istio_converted_static_strict");
    assert_eq!(p.action, Action::Deny as i32);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].not_principals[0].match_type,
        Some(MatchType::Presence(()))
    );
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(
        echo.authorization_policies,
        vec!["istio-system/istio_converted_static_strict"]
    );

    // A namespace saying PERMISSIVE overrides the mesh; a workload with a port exception gets
    // its own policy instead of the static one.
    let out = run(&format!(
        "{base}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: relaxed, namespace: legacy}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: echo-metrics, namespace: apps}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  portLevelMtls: {{'9090': {{mode: PERMISSIVE}}}}
"
    ));
    assert!(
        workload(&out, "legacy", "old")
            .authorization_policies
            .is_empty()
    );
    let echo = workload(&out, "apps", "echo-7d9f-abcde");
    assert_eq!(
        echo.authorization_policies,
        vec!["apps/converted_peer_authentication_echo-metrics"]
    );
    let p = authz(&out, "apps/converted_peer_authentication_echo-metrics");
    assert_eq!(
        p.rules[0].clauses[1].matches[0].not_destination_ports,
        vec![9090]
    );
}

#[test]
fn gateway_and_route_status() {
    let out = run(&format!(
        "{MESH}---\n{WAYPOINTS}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: apps}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}, {{group: '', kind: Service, name: nope}}]
  rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: broken, namespace: apps}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}]
  rules: [{{backendRefs: [{{name: missing, port: 80}}]}}]
"
    ));
    let st = |name: &str| {
        out.statuses
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no status for {name}"))
            .status
            .clone()
    };
    let wp = st("wp");
    assert_eq!(wp["conditions"][0]["type"], "Accepted");
    assert_eq!(wp["conditions"][0]["status"], "True");
    assert_eq!(wp["conditions"][1]["type"], "Programmed");
    assert_eq!(wp["conditions"][1]["status"], "False");
    assert_eq!(wp["conditions"][1]["reason"], "AddressNotAssigned");

    let r = st("r");
    assert_eq!(r["parents"][0]["conditions"][0]["status"], "True");
    assert_eq!(r["parents"][0]["conditions"][1]["reason"], "ResolvedRefs");
    assert_eq!(
        r["parents"][1]["conditions"][0]["reason"],
        "NoMatchingParent"
    );
    let b = st("broken");
    assert_eq!(b["parents"][0]["conditions"][1]["status"], "False");
    assert_eq!(
        b["parents"][0]["conditions"][1]["reason"],
        "BackendNotFound"
    );
}

#[test]
fn translation_is_deterministic() {
    let a = run(MESH);
    let b = run(MESH);
    assert_eq!(a.addresses, b.addresses);
}

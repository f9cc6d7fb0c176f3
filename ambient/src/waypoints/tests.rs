use std::collections::BTreeMap;

use istiod_lite::model::Pod;
use istiod_lite::translate::{MeshOptions, enrolment, gateways_and_routes};
use serde::Deserialize;

use super::*;

const MESH: &str = "
kind: Namespace
apiVersion: v1
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
kind: Pod
apiVersion: v1
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a}
---
kind: Pod
apiVersion: v1
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-b}
status: {podIP: 198.18.2.20}
---
kind: Service
apiVersion: v1
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.10, selector: {app: web}, ports: [{port: 80}]}
";

/// The objects of a YAML stream.
fn objects(yaml: &str) -> Vec<Object> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|de| serde_json::Value::deserialize(de).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| Object::parse(v).unwrap())
        .collect()
}

fn state(yaml: &str) -> State {
    State::from_objects(objects(yaml))
}

fn plan(yaml: &str) -> Plan {
    Plan::from_state(&state(yaml)).unwrap()
}

fn layout_error(yaml: &str) -> String {
    format!("{:#}", Plan::from_state(&state(yaml)).unwrap_err())
}

/// The YAML with the testbed's objects added, as istiod-lite reads it.
fn with_generated(yaml: &str, ready: bool) -> State {
    let plan = plan(yaml);
    let mut all = objects(yaml);
    all.extend(objects(&manifests(&plan, |_| ready)));
    State::from_objects(all)
}

fn gateway(name: &str, ns: &str, extra: &str) -> String {
    format!(
        "---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {{name: {name}, namespace: {ns}{extra}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    )
}

#[test]
fn a_waypoint_gateway_becomes_a_pod_and_a_service() {
    let plan = plan(MESH);
    let [w] = plan.waypoints.as_slice() else {
        panic!("one waypoint: {:?}", plan.waypoints);
    };
    assert_eq!(
        (w.namespace.as_str(), w.name.as_str()),
        ("shop", "waypoint")
    );
    assert_eq!(w.pod, pod_name("shop", "waypoint"));
    assert_eq!(w.service_ip, "198.18.99.10".parse::<IpAddr>().unwrap());
    assert!(!w.has_own_service_account);

    let pod = plan.waypoint_pod(w).unwrap();
    assert_eq!(pod.waypoint.as_deref(), Some("waypoint"));
    assert_eq!(pod.node, "node-a", "the first node");
    assert_eq!(pod.netns, format!("amb-p-shop.{}", w.pod));
    assert!(pod.app.is_empty());
    // The YAML's pod without an address was served first.
    let client = plan.find_pod("shop/client").unwrap();
    assert_eq!(client.ip.to_string(), "198.18.1.100");
    assert_eq!(pod.ip.to_string(), "198.18.1.101");
    // The mirror fills in addresses of the YAML's pods only.
    assert!(
        !plan
            .allocated()
            .contains_key(&("shop".to_owned(), w.pod.clone()))
    );
    assert!(plan.hosts.contains(&(
        w.service_ip,
        "waypoint.shop.svc.cluster.local waypoint.shop.svc waypoint.shop".to_owned()
    )));
}

#[test]
fn the_objects_are_what_istios_controller_makes() {
    let plan = plan(MESH);
    let w = &plan.waypoints[0];
    let objs = objects(&manifests(&plan, |_| true));
    assert_eq!(
        objs.iter().map(|o| o.kind()).collect::<Vec<_>>(),
        [Kind::ServiceAccount, Kind::Pod, Kind::Service]
    );
    let Object::ServiceAccount(sa) = &objs[0] else {
        unreachable!()
    };
    assert_eq!(
        (sa.metadata.namespace.as_str(), sa.metadata.name.as_str()),
        ("shop", "waypoint")
    );

    let Object::Pod(pod) = &objs[1] else {
        unreachable!()
    };
    let labels = &pod.metadata.labels;
    assert_eq!(labels[GATEWAY_NAME_LABEL], "waypoint");
    assert_eq!(labels[DATAPLANE_MODE_LABEL], DATAPLANE_MODE_NONE);
    assert_eq!(pod.metadata.name, w.pod);
    assert_eq!(pod.spec.node_name, "node-a");
    assert_eq!(pod.spec.service_account_name, "waypoint");
    assert_eq!(pod.ips(), [plan.waypoint_pod(w).unwrap().ip]);
    assert!(pod.is_ready());
    // Owned as a Deployment's pod, so its workload is named after the Gateway.
    let owner = &pod.metadata.owner_references[0];
    assert_eq!(owner.kind, "ReplicaSet");
    assert_eq!(
        owner.name,
        format!("waypoint-{}", labels["pod-template-hash"])
    );
    assert!(w.pod.starts_with(&format!("{}-", owner.name)));

    let Object::Service(svc) = &objs[2] else {
        unreachable!()
    };
    assert_eq!(svc.metadata.name, "waypoint");
    assert_eq!(svc.cluster_ips(), [w.service_ip]);
    assert_eq!(
        svc.spec.selector,
        Some(BTreeMap::from([(
            GATEWAY_NAME_LABEL.to_owned(),
            "waypoint".to_owned()
        )]))
    );
    let ports: Vec<(&str, u16)> = svc
        .spec
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port))
        .collect();
    assert_eq!(ports, [("status-port", 15021), ("mesh", 15008)]);

    let not_ready = objects(&manifests(&plan, |_| false));
    let Object::Pod(pod) = &not_ready[1] else {
        unreachable!()
    };
    assert!(!pod.is_ready());
}

#[test]
fn istiod_lite_programs_the_gateway_once_its_pod_is_ready_and_never_captures_it() {
    let programmed = |ready: bool| {
        let st = with_generated(MESH, ready);
        let statuses = gateways_and_routes(&st, &MeshOptions::default()).statuses;
        let gw = statuses
            .iter()
            .find(|s| s.kind == Kind::Gateway && s.name == "waypoint")
            .unwrap();
        gw.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(programmed(true), "True");
    assert_eq!(programmed(false), "False");

    // Its namespace is enrolled; the pod's label opts it out.
    let st = with_generated(MESH, true);
    let enrolled = enrolment(&st, &MeshOptions::default());
    assert!(enrolled[&("shop".to_owned(), "client".to_owned())]);
    let w = pod_name("shop", "waypoint");
    assert!(!enrolled[&("shop".to_owned(), w)]);
}

#[test]
fn names_and_addresses_depend_only_on_the_yaml() {
    assert_eq!(plan(MESH), plan(MESH));
    let name = pod_name("shop", "waypoint");
    assert_eq!(name, pod_name("shop", "waypoint"));
    let parts: Vec<&str> = name.split('-').collect();
    assert_eq!(parts.len(), 3, "{name}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len()),
        ("waypoint", 10, 5)
    );
    assert!(
        parts[1..]
            .iter()
            .all(|p| p.bytes().all(|b| NAME_ALPHABET.contains(&b))),
        "{name}"
    );
    assert_ne!(name, pod_name("other", "waypoint"));

    // A second waypoint moves none of the YAML's pods.
    let more = plan(&format!("{MESH}{}", gateway("second", "shop", "")));
    let before = plan(MESH);
    for p in before.pods.iter().filter(|p| p.waypoint.is_none()) {
        assert_eq!(
            more.find_pod(&format!("{}/{}", p.namespace, p.name))
                .unwrap()
                .ip,
            p.ip
        );
    }
}

#[test]
fn waypoints_take_the_nodes_in_turn_unless_annotated() {
    let yaml = format!(
        "{MESH}{}{}{}",
        gateway("b", "shop", ""),
        gateway("c", "shop", ""),
        gateway("d", "shop", ", annotations: {ambient.dev/node: node-z}"),
    );
    let plan = plan(&yaml);
    let nodes: Vec<(&str, &str)> = plan
        .waypoints
        .iter()
        .map(|w| (w.name.as_str(), plan.waypoint_pod(w).unwrap().node.as_str()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("b", "node-a"),
            ("c", "node-b"),
            ("d", "node-z"),
            // A node named only by an annotation takes its turn like the others.
            ("waypoint", "node-z"),
        ]
    );
    assert!(plan.node("node-z").is_some());
    let services: Vec<String> = plan
        .waypoints
        .iter()
        .map(|w| w.service_ip.to_string())
        .collect();
    assert_eq!(
        services,
        [
            "198.18.99.10",
            "198.18.99.11",
            "198.18.99.12",
            "198.18.99.13"
        ]
    );
}

#[test]
fn service_addresses_avoid_those_in_use() {
    let yaml = format!(
        "{MESH}---
kind: Service
apiVersion: v1
metadata: {{name: taken, namespace: shop}}
spec: {{clusterIP: 198.18.99.10}}
"
    );
    assert_eq!(
        plan(&yaml).waypoints[0].service_ip.to_string(),
        "198.18.99.11"
    );
}

#[test]
fn a_declared_service_account_is_used_not_duplicated() {
    let yaml = format!(
        "{MESH}---
kind: ServiceAccount
apiVersion: v1
metadata: {{name: waypoint, namespace: shop}}
"
    );
    let plan = plan(&yaml);
    assert!(plan.waypoints[0].has_own_service_account);
    let kinds: Vec<Kind> = objects(&manifests(&plan, |_| true))
        .iter()
        .map(Object::kind)
        .collect();
    assert_eq!(kinds, [Kind::Pod, Kind::Service]);
}

#[test]
fn gateways_of_other_classes_are_left_alone() {
    let yaml = MESH.replace(
        "gatewayClassName: istio-waypoint",
        "gatewayClassName: istio",
    );
    let plan = plan(&yaml);
    assert!(plan.waypoints.is_empty());
    assert!(plan.pods.iter().all(|p| p.waypoint.is_none()));
    assert_eq!(manifests(&plan, |_| true), "");
}

#[test]
fn gateways_that_cannot_be_waypoint_pods_are_named() {
    let cases = [
        (
            MESH.replace("port: 15008, protocol: HBONE", "port: 80, protocol: HTTP"),
            "Gateway shop/waypoint: a waypoint needs a listener with port 15008 and protocol HBONE; it has mesh 80/HTTP",
        ),
        (
            format!(
                "{MESH}{}",
                gateway("w2", "shop", ", annotations: {ambient.dev/node: Node_A}")
            ),
            "Gateway shop/w2: annotation ambient.dev/node \"Node_A\" is not a node name",
        ),
        (
            format!("{MESH}{}", gateway("w.3", "shop", "")),
            "Gateway shop/w.3: a waypoint's name is also its Service's, which must be a DNS label",
        ),
        (
            format!(
                "{MESH}---
kind: Service
apiVersion: v1
metadata: {{name: waypoint, namespace: shop}}
"
            ),
            "Service shop/waypoint: the testbed makes the Service of waypoint Gateway shop/waypoint itself",
        ),
        (
            gateway("lonely", "shop", ""),
            "Gateway shop/lonely: no node to run its waypoint on",
        ),
        (
            format!(
                "{MESH}---
kind: Pod
apiVersion: v1
metadata: {{name: {}, namespace: shop}}
spec: {{nodeName: node-a}}
",
                pod_name("shop", "waypoint")
            ),
            "the testbed gives this name to the pod of waypoint Gateway shop/waypoint",
        ),
    ];
    for (yaml, want) in cases {
        let err = layout_error(&yaml);
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
}

#[test]
fn the_generated_file_says_where_it_comes_from() {
    let plan = plan(MESH);
    let text = manifests(&plan, |_| true);
    assert!(text.starts_with("# Written by `ambient up`"), "{text}");
    let pod: Pod = objects(&text)
        .into_iter()
        .find_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .unwrap();
    assert_eq!(pod.status.phase, "Running");
}

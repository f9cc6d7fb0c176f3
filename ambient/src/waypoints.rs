//! Waypoints as pods: the part of Istio's deployment controller the testbed plays. On
//! Kubernetes, Istio answers a Gateway of class `istio-waypoint` with a ServiceAccount, a
//! Deployment and a Service; here, for Gateway `<gw>` in namespace `<ns>`, the testbed makes
//!
//! - ServiceAccount `<gw>` (unless the YAML declares it);
//! - Pod `<gw>-<hash>-<suffix>`, as the Deployment's ReplicaSet `<gw>-<hash>` would name it,
//!   labelled `gateway.networking.k8s.io/gateway-name: <gw>` and `istio.io/dataplane-mode:
//!   none` (a waypoint is never captured: it speaks HBONE itself). Its node is the Gateway's
//!   annotation `ambient.dev/node`, else the nodes in turn in namespace/name order; its
//!   address is allocated like any pod's without one;
//! - Service `<gw>`: that label as selector, ports 15021 `status-port` and 15008 `mesh`, a
//!   cluster IP from 198.18.99.10 upwards (the examples' services are in 198.18.100.0/24).
//!
//! Names and addresses depend only on the YAML, so the same directory gives the same mesh.
//! istiod-lite sees these objects in the copy of the directory it reads ([`manifests`]); the
//! pod's `Ready` condition follows the waypoint's own readiness, as a kubelet's probe would.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use istiod_lite::model::{DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, Kind, Object, WAYPOINT_CLASS};
use istiod_lite::store::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::testbed::{AppPlan, CLUSTER_ID, NodePlan, Plan, PodPlan};

/// Annotation on a waypoint Gateway naming the node its pod runs on.
pub const NODE_ANNOTATION: &str = "ambient.dev/node";
/// Label naming the Gateway on its pod, Service and ServiceAccount; the Service's selector.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The port of the waypoint's HBONE listener, its Service port `mesh`.
pub const MESH_PORT: u16 = 15008;
/// The port of `/healthz/ready`, its Service port `status-port`.
pub const STATUS_PORT: u16 = 15021;
/// The port of `/metrics`.
pub const METRICS_PORT: u16 = 15020;

const MANAGED_LABEL: &str = "gateway.istio.io/managed";
const MANAGED_BY: &str = "istio.io-mesh-controller";
/// The first three octets of waypoint Service addresses, and the range of the last.
const SERVICE_NET: [u8; 3] = [198, 18, 99];
const SERVICE_HOSTS: std::ops::RangeInclusive<u8> = 10..=250;
/// The characters Kubernetes uses in generated names (no vowels, no look-alikes).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A waypoint the testbed runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaypointPlan {
    pub namespace: String,
    /// The Gateway's name, which its Service and ServiceAccount share.
    pub name: String,
    /// The pod that runs it, in `namespace`; one of the plan's pods.
    pub pod: String,
    pub service_ip: IpAddr,
    /// The YAML declares the ServiceAccount `name` itself, so the testbed makes none.
    #[serde(default)]
    pub has_own_service_account: bool,
}

/// A waypoint Gateway as the YAML declares it, before it is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Declared {
    pub namespace: String,
    pub name: String,
    /// From [`NODE_ANNOTATION`].
    pub node: Option<String>,
    pub has_own_service_account: bool,
}

impl WaypointPlan {
    /// `namespace/name`, as `status` and the supervisor name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Service's hostname, as workloads and services that use it name it.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The supervisor's role name, also the log's: `waypoint/<ns>/<gw>`.
    pub fn role(&self) -> String {
        format!("waypoint/{}/{}", self.namespace, self.name)
    }

    pub fn log_name(&self) -> String {
        format!("waypoint-{}.{}.log", self.namespace, self.name)
    }
}

/// The waypoint Gateways in `state`, by namespace and name. One that cannot become a
/// waypoint pod adds a problem naming it and is left out.
pub(crate) fn declared(state: &State, problems: &mut Vec<String>) -> Vec<Declared> {
    let accounts: BTreeSet<(&str, &str)> = state
        .of_kind(Kind::ServiceAccount)
        .filter_map(|o| match o.as_ref() {
            Object::ServiceAccount(sa) => {
                Some((sa.metadata.namespace.as_str(), sa.metadata.name.as_str()))
            }
            _ => None,
        })
        .collect();
    let services: BTreeSet<(&str, &str)> = state
        .of_kind(Kind::Service)
        .filter_map(|o| match o.as_ref() {
            Object::Service(s) => Some((s.metadata.namespace.as_str(), s.metadata.name.as_str())),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for obj in state.of_kind(Kind::Gateway) {
        let Object::Gateway(gw) = obj.as_ref() else {
            continue;
        };
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue; // Another controller's Gateway.
        }
        let (ns, name) = (&gw.metadata.namespace, &gw.metadata.name);
        let who = format!("Gateway {ns}/{name}");
        if !is_dns_label(name) {
            problems.push(format!(
                "{who}: a waypoint's name is also its Service's, which must be a DNS label (lower-case letters, digits and '-', starting with a letter, at most 63 characters)"
            ));
            continue;
        }
        let hbone = gw
            .spec
            .listeners
            .iter()
            .any(|l| l.port == MESH_PORT && l.protocol == "HBONE");
        if !hbone {
            let listeners: Vec<String> = gw
                .spec
                .listeners
                .iter()
                .map(|l| format!("{} {}/{}", l.name, l.port, l.protocol))
                .collect();
            problems.push(format!(
                "{who}: a waypoint needs a listener with port {MESH_PORT} and protocol HBONE; it has {}",
                if listeners.is_empty() {
                    "none".to_owned()
                } else {
                    listeners.join(", ")
                }
            ));
            continue;
        }
        if services.contains(&(ns.as_str(), name.as_str())) {
            problems.push(format!(
                "Service {ns}/{name}: the testbed makes the Service of waypoint {who} itself; remove this one from the YAML"
            ));
            continue;
        }
        let node = gw.metadata.annotations.get(NODE_ANNOTATION).cloned();
        if let Some(n) = &node
            && !is_node_name(n)
        {
            problems.push(format!(
                "{who}: annotation {NODE_ANNOTATION} {n:?} is not a node name (lower-case letters, digits, '-' and '.')"
            ));
            continue;
        }
        out.push(Declared {
            namespace: ns.clone(),
            name: name.clone(),
            node,
            has_own_service_account: accounts.contains(&(ns.as_str(), name.as_str())),
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The pods of the declared waypoints, on `nodes` (which hold every annotated node), without
/// addresses yet. A name taken by a pod of the YAML is a problem.
pub(crate) fn pods(
    declared: &[Declared],
    nodes: &[NodePlan],
    taken: &BTreeSet<(String, String)>,
    problems: &mut Vec<String>,
) -> Vec<PodPlan> {
    let mut out = Vec::new();
    let mut turn = 0;
    for d in declared {
        let node = match &d.node {
            Some(n) => n.clone(),
            None => {
                let Some(n) = nodes.get(turn % nodes.len().max(1)) else {
                    problems.push(format!(
                        "Gateway {}/{}: no node to run its waypoint on; give a pod a spec.nodeName or the Gateway an annotation {NODE_ANNOTATION}",
                        d.namespace, d.name
                    ));
                    continue;
                };
                turn += 1;
                n.name.clone()
            }
        };
        let name = pod_name(&d.namespace, &d.name);
        if taken.contains(&(d.namespace.clone(), name.clone())) {
            problems.push(format!(
                "Pod {}/{name}: the testbed gives this name to the pod of waypoint Gateway {}/{}; rename the pod",
                d.namespace, d.namespace, d.name
            ));
            continue;
        }
        out.push(PodPlan {
            uid: format!("{CLUSTER_ID}//Pod/{}/{name}", d.namespace),
            namespace: d.namespace.clone(),
            netns: format!("amb-p-{}.{name}", d.namespace),
            name,
            node,
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            allocated: true,
            veth: String::new(),
            app: AppPlan::default(),
            waypoint: Some(d.name.clone()),
        });
    }
    out
}

/// Service addresses for the waypoints whose pods were placed, avoiding every address in
/// `taken` (pods' and services').
pub(crate) fn plans(
    declared: &[Declared],
    pods: &[PodPlan],
    taken: &mut BTreeSet<IpAddr>,
) -> anyhow::Result<Vec<WaypointPlan>> {
    let mut out = Vec::new();
    for d in declared {
        let Some(pod) = pods
            .iter()
            .find(|p| p.namespace == d.namespace && p.waypoint.as_deref() == Some(&d.name))
        else {
            continue;
        };
        let [a, b, c] = SERVICE_NET;
        let free = SERVICE_HOSTS
            .map(|h| IpAddr::V4(Ipv4Addr::new(a, b, c, h)))
            .find(|ip| !taken.contains(ip));
        let Some(ip) = free else {
            anyhow::bail!(
                "Gateway {}/{}: no free waypoint Service address left in {a}.{b}.{c}.{}-{}",
                d.namespace,
                d.name,
                SERVICE_HOSTS.start(),
                SERVICE_HOSTS.end()
            );
        };
        taken.insert(ip);
        out.push(WaypointPlan {
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            pod: pod.name.clone(),
            service_ip: ip,
            has_own_service_account: d.has_own_service_account,
        });
    }
    Ok(out)
}

/// The pod name a Deployment `name` in `namespace` would give its one replica:
/// `<name>-<template hash>-<suffix>`, both parts derived from the names so they are stable.
pub fn pod_name(namespace: &str, name: &str) -> String {
    format!("{}-{}", replica_set_name(namespace, name), {
        let h = fnv1a(format!("{namespace}/{name}/pod").as_bytes());
        encode(h, 5)
    })
}

fn template_hash(namespace: &str, name: &str) -> String {
    encode(fnv1a(format!("{namespace}/{name}").as_bytes()), 10)
}

fn replica_set_name(namespace: &str, name: &str) -> String {
    format!("{name}-{}", template_hash(namespace, name))
}

/// The objects Istio would create for `plan`'s waypoints, as one YAML stream for the copy of
/// the directory istiod-lite reads; `is_ready` gives each pod's `Ready` condition.
pub fn manifests(plan: &Plan, is_ready: impl Fn(&WaypointPlan) -> bool) -> String {
    let mut out = String::new();
    if plan.waypoints.is_empty() {
        return out;
    }
    out.push_str(
        "# Written by `ambient up`: what Istio's deployment controller makes for each waypoint\n\
         # Gateway. Rewritten as the waypoints' readiness changes; edits are lost.\n",
    );
    for w in &plan.waypoints {
        let Some(pod) = plan
            .pods
            .iter()
            .find(|p| p.namespace == w.namespace && p.name == w.pod)
        else {
            continue;
        };
        let mut docs = Vec::new();
        if !w.has_own_service_account {
            docs.push(service_account(w));
        }
        docs.push(pod_object(w, pod, is_ready(w)));
        docs.push(service_object(w));
        for d in docs {
            out.push_str("---\n");
            // A tree of strings, numbers and maps always has a YAML form.
            out.push_str(&serde_yaml::to_string(&d).unwrap_or_default());
        }
    }
    out
}

fn labels(w: &WaypointPlan) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(GATEWAY_NAME_LABEL.into(), json!(w.name));
    m.insert(MANAGED_LABEL.into(), json!(MANAGED_BY));
    m
}

fn service_account(w: &WaypointPlan) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels(w)},
    })
}

fn pod_object(w: &WaypointPlan, pod: &PodPlan, ready: bool) -> Value {
    let hash = template_hash(&w.namespace, &w.name);
    let mut labels = labels(w);
    labels.insert(DATAPLANE_MODE_LABEL.into(), json!(DATAPLANE_MODE_NONE));
    labels.insert("pod-template-hash".into(), json!(hash));
    labels.insert("service.istio.io/canonical-name".into(), json!(w.name));
    labels.insert(
        "service.istio.io/canonical-revision".into(),
        json!("latest"),
    );
    labels.insert("sidecar.istio.io/inject".into(), json!("false"));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": w.namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": replica_set_name(&w.namespace, &w.name),
                "controller": true,
            }],
        },
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": w.name,
            "containers": [{
                "name": "istio-proxy",
                "ports": [
                    {"name": "mesh", "containerPort": MESH_PORT, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                    {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
                ],
            }],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

fn service_object(w: &WaypointPlan) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels(w)},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": w.service_ip.to_string(),
            "clusterIPs": [w.service_ip.to_string()],
            "selector": {GATEWAY_NAME_LABEL: w.name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": "mesh", "port": MESH_PORT, "protocol": "TCP", "appProtocol": "all"},
            ],
        },
    })
}

/// A DNS-1035 label, as Kubernetes requires of Service names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What istiod-lite accepts as a node name for node tokens.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `len` characters of [`NAME_ALPHABET`] from `v`.
fn encode(mut v: u64, len: usize) -> String {
    let base = NAME_ALPHABET.len() as u64;
    (0..len)
        .map(|_| {
            // The remainder is below the alphabet's length.
            let c = NAME_ALPHABET[(v % base) as usize];
            v /= base;
            char::from(c)
        })
        .collect()
}

#[cfg(test)]
mod tests;

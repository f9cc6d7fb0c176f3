//! Pods → workloads, Services → services (with each pod listing the services it backs).

use std::collections::{BTreeMap, HashMap};

use mesh_proto::workload::{
    self, AppProtocol, PortList, TunnelProtocol, WorkloadStatus, WorkloadType,
};

use super::{Index, Output, labels_match, network_address, service_address, workload_address};
use crate::model::{EndpointSlice, IntOrString, Pod, SERVICE_NAME_LABEL, Service, ServicePort};

pub(super) fn translate(idx: &Index<'_>, out: &mut Output) {
    // Services first: pods need their hostnames and ports.
    let mut by_key: HashMap<(&str, &str), &Service> = HashMap::new();
    for svc in &idx.services {
        if svc.spec.type_ == "ExternalName" {
            continue;
        }
        let ns = svc.metadata.namespace.as_str();
        by_key.insert((ns, &svc.metadata.name), svc);
        let hostname = idx.hostname(ns, &svc.metadata.name);
        let waypoint = match idx.waypoint_for(&svc.metadata.labels, ns, "service") {
            // A waypoint's own Service is never sent through a waypoint (itself, usually).
            _ if idx.is_waypoint_service(svc) => None,
            Ok(w) => w,
            Err(e) => {
                out.warnings
                    .push(format!("Service {ns}/{}: {e}", svc.metadata.name));
                None
            }
        };
        let resource = workload::Service {
            name: svc.metadata.name.clone(),
            namespace: ns.to_owned(),
            hostname: hostname.clone(),
            addresses: svc.cluster_ips().into_iter().map(network_address).collect(),
            ports: svc
                .spec
                .ports
                .iter()
                .filter(|p| is_tcp(&p.protocol))
                .map(|p| workload::Port {
                    service_port: p.port.into(),
                    target_port: match &p.target_port {
                        Some(IntOrString::Int(t)) => (*t).into(),
                        Some(IntOrString::String(_)) => 0,
                        None => p.port.into(),
                    },
                    app_protocol: app_protocol(p) as i32,
                })
                .collect(),
            waypoint,
            canonical: true,
            ..Default::default()
        };
        out.addresses
            .insert(format!("{ns}/{hostname}"), service_address(resource));
    }

    // Membership of selector-less services comes from EndpointSlices naming pods.
    let mut slice_members: HashMap<(&str, &str), Vec<(&Service, &EndpointSlice)>> = HashMap::new();
    for slice in &idx.slices {
        let ns = slice.metadata.namespace.as_str();
        let Some(svc_name) = slice.metadata.labels.get(SERVICE_NAME_LABEL) else {
            continue;
        };
        let Some(svc) = by_key.get(&(ns, svc_name.as_str())) else {
            continue;
        };
        if svc.spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
            continue; // Kubernetes manages those slices from the selector.
        }
        for ep in &slice.endpoints {
            if let Some(t) = &ep.target_ref
                && t.kind == "Pod"
            {
                let pod_ns = if t.namespace.is_empty() {
                    ns
                } else {
                    t.namespace.as_str()
                };
                slice_members
                    .entry((pod_ns, t.name.as_str()))
                    .or_default()
                    .push((svc, slice));
            }
        }
    }

    let policies_by_ns = policies_by_namespace(idx);
    let mut by_first_label: HashMap<(&str, &str, &str), Vec<&Service>> = HashMap::new();
    for svc in &idx.services {
        if let Some((k, v)) = svc.spec.selector.as_ref().and_then(|s| s.iter().next()) {
            by_first_label
                .entry((&svc.metadata.namespace, k, v))
                .or_default()
                .push(svc);
        }
    }
    for pod in &idx.pods {
        if matches!(pod.status.phase.as_str(), "Succeeded" | "Failed") {
            continue;
        }
        let ips = pod.ips();
        if ips.is_empty() {
            continue;
        }
        let ns = pod.metadata.namespace.as_str();
        let name = pod.metadata.name.as_str();
        let uid = format!("{}//Pod/{ns}/{name}", idx.opts.cluster_id);
        let ambient = idx.is_ambient(pod);

        let mut services: BTreeMap<String, PortList> = BTreeMap::new();
        // Only services whose first selector label the pod carries can select it.
        let candidates = pod
            .metadata
            .labels
            .iter()
            .filter_map(|(k, v)| by_first_label.get(&(ns, k.as_str(), v.as_str())))
            .flatten();
        for svc in candidates {
            let Some(sel) = &svc.spec.selector else {
                continue;
            };
            if !labels_match(sel, &pod.metadata.labels) {
                continue;
            }
            if svc.spec.type_ == "ExternalName" {
                continue;
            }
            let ports = port_list(svc, |p| match &p.target_port {
                Some(IntOrString::Int(t)) => Some(*t),
                None => Some(p.port),
                Some(IntOrString::String(port_name)) => named_port(pod, port_name),
            });
            services.insert(
                format!("{ns}/{}", idx.hostname(ns, &svc.metadata.name)),
                ports,
            );
        }
        for (svc, slice) in slice_members.get(&(ns, name)).into_iter().flatten() {
            let svc_ns = svc.metadata.namespace.as_str();
            let ports = port_list(svc, |p| {
                slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|sp| sp.name.as_deref().unwrap_or("") == p.name)
                    .and_then(|sp| sp.port)
            });
            services.insert(
                format!("{svc_ns}/{}", idx.hostname(svc_ns, &svc.metadata.name)),
                ports,
            );
        }

        let waypoint = if ambient {
            match idx.waypoint_for(&pod.metadata.labels, ns, "workload") {
                Ok(w) => w,
                Err(e) => {
                    // Only a label on the pod itself is worth a warning: a namespace-wide
                    // waypoint for services is normal and simply does not apply to workloads.
                    if pod
                        .metadata
                        .labels
                        .contains_key(crate::model::USE_WAYPOINT_LABEL)
                    {
                        out.warnings.push(format!("Pod {ns}/{name}: {e}"));
                    }
                    None
                }
            }
        } else {
            None
        };

        let (workload_name, workload_type) = workload_name(pod);
        let labels = &pod.metadata.labels;
        let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let canonical_name = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name.clone());
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into());
        let authorization_policies = policies_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .chain(
                policies_by_ns
                    .get(idx.opts.root_namespace.as_str())
                    .into_iter()
                    .flatten(),
            )
            .filter(|(selector, _)| labels_match(selector, labels))
            .map(|(_, name)| name.clone())
            .chain(super::policy::peer_authentication_policies(idx, pod))
            .collect();
        let w = workload::Workload {
            uid: uid.clone(),
            name: name.to_owned(),
            namespace: ns.to_owned(),
            addresses: ips.iter().map(|ip| super::ip_bytes(*ip)).collect(),
            tunnel_protocol: if ambient {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            } as i32,
            trust_domain: idx.opts.trust_domain.clone(),
            service_account: pod.service_account().to_owned(),
            waypoint,
            node: pod.spec.node_name.clone(),
            canonical_name,
            canonical_revision,
            workload_type: workload_type as i32,
            workload_name,
            authorization_policies,
            status: if pod.is_ready() {
                WorkloadStatus::Healthy
            } else {
                WorkloadStatus::Unhealthy
            } as i32,
            cluster_id: idx.opts.cluster_id.clone(),
            services,
            network_mode: if pod.spec.host_network {
                workload::NetworkMode::HostNetwork
            } else {
                workload::NetworkMode::Standard
            } as i32,
            ..Default::default()
        };
        out.addresses.insert(uid, workload_address(w));
    }
}

/// A selector-scoped policy: its selector and `ns/name`.
type SelectorPolicy = (BTreeMap<String, String>, String);

/// Selector-scoped policies per namespace, sorted by name.
fn policies_by_namespace(idx: &Index<'_>) -> HashMap<String, Vec<SelectorPolicy>> {
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for p in &idx.policies {
        let Some(sel) = &p.spec.selector else {
            continue;
        };
        if sel.match_labels.is_empty() || !super::policy::is_sent(p) {
            continue;
        }
        let ns = &p.metadata.namespace;
        out.entry(ns.clone()).or_default().push((
            sel.match_labels.clone(),
            format!("{ns}/{}", p.metadata.name),
        ));
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.1.cmp(&b.1));
    }
    out
}

/// A pod's ports for `svc`: each TCP service port with the target `target` finds for it on
/// this pod; a port with no target here is left out.
fn port_list(svc: &Service, target: impl Fn(&ServicePort) -> Option<u16>) -> PortList {
    let ports = svc
        .spec
        .ports
        .iter()
        .filter(|p| is_tcp(&p.protocol))
        .filter_map(|p| {
            Some(workload::Port {
                service_port: p.port.into(),
                target_port: target(p)?.into(),
                app_protocol: app_protocol(p) as i32,
            })
        })
        .collect();
    PortList { ports }
}

fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|p| p == "TCP")
}

fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .find(|p| p.name == name && is_tcp(&p.protocol))
        .map(|p| p.container_port)
}

/// The protocol a port speaks, from `appProtocol` or the port name's prefix (`http-web`).
fn app_protocol(p: &ServicePort) -> AppProtocol {
    let hint = p
        .app_protocol
        .as_deref()
        .unwrap_or_else(|| p.name.split('-').next().unwrap_or(""));
    match hint.to_ascii_lowercase().as_str() {
        "http" => AppProtocol::Http11,
        "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "tls" | "https" => AppProtocol::Tls,
        "tcp" => AppProtocol::Tcp,
        _ => AppProtocol::Unknown,
    }
}

/// The name of what runs the pod (its Deployment, CronJob, …), and its type.
fn workload_name(pod: &Pod) -> (String, WorkloadType) {
    if let Some(n) = pod.metadata.labels.get("service.istio.io/workload-name") {
        return (n.clone(), WorkloadType::Pod);
    }
    let Some(owner) = pod.metadata.owner_references.first() else {
        return (pod.metadata.name.clone(), WorkloadType::Pod);
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.metadata.labels.get("pod-template-hash");
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => (deployment.to_owned(), WorkloadType::Deployment),
                None => (owner.name.clone(), WorkloadType::Pod),
            }
        }
        "Job" => match owner.name.rsplit_once('-') {
            // CronJobs name their jobs `<cronjob>-<minutes since epoch>`.
            Some((cron, ts)) if ts.len() >= 8 && ts.bytes().all(|b| b.is_ascii_digit()) => {
                (cron.to_owned(), WorkloadType::Cronjob)
            }
            _ => (owner.name.clone(), WorkloadType::Job),
        },
        _ => (owner.name.clone(), WorkloadType::Pod),
    }
}

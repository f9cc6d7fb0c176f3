//! Status the user reads back: Gateway `Accepted`/`Programmed`, route `Accepted`/`ResolvedRefs`
//! per parent, and whether ztunnel took each AuthorizationPolicy as written. Written to the
//! objects' `status` on Kubernetes; shown on `/debug/status` everywhere.

use serde_json::{Value, json};

use super::{Index, Output, WAYPOINT_HBONE_PORT};
use crate::model::{BackendRef, Kind, ParentRef, Route, RouteFilter, WAYPOINT_CLASS};

/// The controller name written into route status.
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";

/// The computed `status` of one object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ObjectStatus {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The whole `status` stanza, as written to Kubernetes.
    pub status: Value,
}

/// One condition in Kubernetes' shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
    pub observed_generation: i64,
}

fn condition(
    type_: &'static str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
) -> Condition {
    Condition {
        type_,
        status: if ok { "True" } else { "False" },
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
    }
}

pub(super) fn policy_status(
    object: &str,
    generation: i64,
    ok: bool,
    reason: &str,
    message: String,
) -> ObjectStatus {
    condition_status(object, "ZtunnelAccepted", generation, ok, reason, message)
}

/// An AuthorizationPolicy's status with one condition of type `type_`.
pub(super) fn condition_status(
    object: &str,
    type_: &'static str,
    generation: i64,
    ok: bool,
    reason: &str,
    message: String,
) -> ObjectStatus {
    let (ns, name) = object
        .trim_start_matches("AuthorizationPolicy ")
        .split_once('/')
        .unwrap_or(("", object));
    ObjectStatus {
        kind: Kind::AuthorizationPolicy,
        namespace: ns.to_owned(),
        name: name.to_owned(),
        status: json!({"conditions": [condition(type_, ok, reason, message, generation)]}),
    }
}

pub(super) fn compute(idx: &Index<'_>, out: &mut Output) {
    let mut gateways: Vec<_> = idx.gateways.values().collect();
    gateways.sort_by_key(|g| (&g.metadata.namespace, &g.metadata.name));
    for gw in gateways {
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue; // Another controller's Gateway.
        }
        let ns = gw.metadata.namespace.as_str();
        let name = gw.metadata.name.as_str();
        let generation = gw.metadata.generation;
        let hostname = idx.hostname(ns, name);
        let listeners: Vec<Value> = gw
            .spec
            .listeners
            .iter()
            .map(|l| {
                let ok = l.port as u32 == WAYPOINT_HBONE_PORT && l.protocol == "HBONE";
                let c = if ok {
                    condition("Accepted", true, "Accepted", "listener accepted", generation)
                } else {
                    condition(
                        "Accepted",
                        false,
                        "UnsupportedProtocol",
                        format!("a waypoint listens with protocol HBONE on port {WAYPOINT_HBONE_PORT}"),
                        generation,
                    )
                };
                json!({"name": l.name, "attachedRoutes": 0, "supportedKinds": [], "conditions": [c]})
            })
            .collect();
        let svc = idx
            .services_by_ns
            .get(ns)
            .and_then(|v| v.iter().find(|s| s.metadata.name == name));
        let mut addresses = vec![json!({"type": "Hostname", "value": hostname})];
        let programmed = match svc {
            None => condition(
                "Programmed",
                false,
                "AddressNotAssigned",
                format!("waiting for the waypoint's Service {ns}/{name}"),
                generation,
            ),
            Some(s)
                if !s
                    .spec
                    .ports
                    .iter()
                    .any(|p| p.port as u32 == WAYPOINT_HBONE_PORT) =>
            {
                condition(
                    "Programmed",
                    false,
                    "AddressNotUsable",
                    format!("Service {ns}/{name} has no port {WAYPOINT_HBONE_PORT}"),
                    generation,
                )
            }
            Some(s) => {
                for ip in s.cluster_ips() {
                    addresses.insert(0, json!({"type": "IPAddress", "value": ip.to_string()}));
                }
                let ready = s.spec.selector.as_ref().is_some_and(|sel| {
                    !sel.is_empty()
                        && idx.pods_by_ns.get(ns).into_iter().flatten().any(|p| {
                            super::labels_match(sel, &p.metadata.labels)
                                && p.is_ready()
                                && !p.ips().is_empty()
                        })
                });
                if ready {
                    condition(
                        "Programmed",
                        true,
                        "Programmed",
                        format!("assigned to service {hostname}:{WAYPOINT_HBONE_PORT}"),
                        generation,
                    )
                } else {
                    condition(
                        "Programmed",
                        false,
                        "AddressNotAssigned",
                        format!("Service {ns}/{name} has no ready waypoint pod"),
                        generation,
                    )
                }
            }
        };
        let conditions = vec![
            condition(
                "Accepted",
                true,
                "Accepted",
                "resource accepted",
                generation,
            ),
            programmed,
        ];
        out.statuses.push(ObjectStatus {
            kind: Kind::Gateway,
            namespace: ns.to_owned(),
            name: name.to_owned(),
            status: json!({"addresses": addresses, "conditions": conditions, "listeners": listeners}),
        });
    }

    for (kind, route) in &idx.routes {
        if let Some(s) = route_status(idx, *kind, route) {
            out.statuses.push(s);
        }
    }
}

fn route_status(idx: &Index<'_>, kind: Kind, route: &Route) -> Option<ObjectStatus> {
    let ns = route.metadata.namespace.as_str();
    let generation = route.metadata.generation;
    let resolved = resolved_refs(idx, kind, route, generation);
    let mut parents = Vec::new();
    for p in &route.spec.parent_refs {
        let p_ns = p.namespace.as_deref().unwrap_or(ns);
        let accepted = match parent_kind(p) {
            ParentKind::Service => {
                let exists = idx
                    .services_by_ns
                    .get(p_ns)
                    .is_some_and(|v| v.iter().any(|s| s.metadata.name == p.name));
                if exists {
                    condition("Accepted", true, "Accepted", "Route was valid", generation)
                } else {
                    condition(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        format!("parent service {p_ns}/{} not found", p.name),
                        generation,
                    )
                }
            }
            ParentKind::Gateway => match idx.gateways.get(&(p_ns, p.name.as_str())) {
                Some(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => condition(
                    "Accepted",
                    false,
                    "NotAllowedByListeners",
                    "routes attached to a waypoint Gateway itself are not supported; attach them to a Service",
                    generation,
                ),
                Some(_) => continue, // Another controller reports on its own Gateways.
                None => condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!("parent gateway {p_ns}/{} not found", p.name),
                    generation,
                ),
            },
            ParentKind::Other => condition(
                "Accepted",
                false,
                "NoMatchingParent",
                format!(
                    "parent kind {:?} is not supported; use a Service or a waypoint Gateway",
                    p.kind.as_deref().unwrap_or_default()
                ),
                generation,
            ),
        };
        let mut parent_ref = json!({"name": p.name});
        for (k, v) in [
            ("group", p.group.as_deref().map(Value::from)),
            ("kind", p.kind.as_deref().map(Value::from)),
            ("namespace", p.namespace.as_deref().map(Value::from)),
            ("port", p.port.map(Value::from)),
            ("sectionName", p.section_name.as_deref().map(Value::from)),
        ] {
            if let Some(v) = v {
                parent_ref[k] = v;
            }
        }
        parents.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": [accepted, resolved.clone()],
        }));
    }
    if parents.is_empty() {
        return None;
    }
    Some(ObjectStatus {
        kind,
        namespace: ns.to_owned(),
        name: route.metadata.name.clone(),
        status: json!({"parents": parents}),
    })
}

enum ParentKind {
    Service,
    Gateway,
    Other,
}

fn parent_kind(p: &ParentRef) -> ParentKind {
    let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
    match (group, p.kind.as_deref().unwrap_or("Gateway")) {
        ("" | "core", "Service") => ParentKind::Service,
        ("gateway.networking.k8s.io", "Gateway") => ParentKind::Gateway,
        _ => ParentKind::Other,
    }
}

/// Whether every backend of every rule (mirrors included) can be used: the first problem
/// found is reported.
fn resolved_refs(idx: &Index<'_>, kind: Kind, route: &Route, generation: i64) -> Condition {
    fn filters(list: &[RouteFilter]) -> impl Iterator<Item = &BackendRef> {
        list.iter()
            .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref))
    }
    for rule in &route.spec.rules {
        let mut refs: Vec<&BackendRef> = rule.backend_refs.iter().collect();
        refs.extend(filters(&rule.filters));
        for b in &rule.backend_refs {
            refs.extend(filters(&b.filters));
        }
        for b in refs {
            if let Some((reason, message)) = super::routes::backend_problem(idx, kind, route, b) {
                return condition("ResolvedRefs", false, reason, message, generation);
            }
        }
    }
    condition(
        "ResolvedRefs",
        true,
        "ResolvedRefs",
        "All references resolved",
        generation,
    )
}

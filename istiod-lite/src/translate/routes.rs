//! HTTPRoutes and GRPCRoutes attached to Services → `ambient.waypoint.Route`, for waypoints.
//!
//! istiod-lite resolves everything the waypoint would otherwise have to look up: parent and
//! backend Services become hostnames, defaults are filled in (path prefix `/`, weight 1,
//! redirect 302), GRPCRoute methods become HTTP/2 paths. A backend that cannot be used stays
//! in the rule, marked invalid, so its share of requests gets 500 as Gateway API requires;
//! the reason is in the route's `ResolvedRefs` status.
//!
//! Validation of field values happens when the object is read (see `model::routes`), so an
//! object that reaches this point is well formed.

use mesh_proto::waypoint as pb;

use super::{Index, Output};
use crate::model::{
    BackendRef, HeaderModifierSpec, Kind, MethodMatchSpec, ParentRef, PathModifierSpec, Route,
    RouteFilter, RouteMatch, RouteRule, parse_duration_ms, parse_timestamp,
};

/// The xDS name of a route: `<namespace>/<kind>/<name>`.
pub fn resource_name(kind: Kind, ns: &str, name: &str) -> String {
    format!("{ns}/{}/{name}", kind_name(kind))
}

fn kind_name(kind: Kind) -> &'static str {
    if kind == Kind::GRPCRoute {
        "grpcroute"
    } else {
        "httproute"
    }
}

/// Whether a parentRef names a Service (the mesh attachment), not a Gateway.
pub(super) fn is_service_parent(p: &ParentRef) -> bool {
    matches!(p.group.as_deref(), Some("" | "core")) && p.kind.as_deref() == Some("Service")
}

pub(super) fn translate(idx: &Index<'_>, out: &mut Output) {
    for (kind, route) in &idx.routes {
        if let Some(r) = translate_route(idx, *kind, route) {
            out.routes.insert(
                resource_name(*kind, &route.metadata.namespace, &route.metadata.name),
                r,
            );
        }
    }
}

fn translate_route(idx: &Index<'_>, kind: Kind, route: &Route) -> Option<pb::Route> {
    let ns = route.metadata.namespace.as_str();
    let parents: Vec<pb::ParentService> = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| is_service_parent(p))
        .filter_map(|p| {
            let p_ns = p.namespace.as_deref().unwrap_or(ns);
            idx.service(p_ns, &p.name)?;
            Some(pb::ParentService {
                hostname: idx.hostname(p_ns, &p.name),
                port: p.port.map_or(0, u32::from),
            })
        })
        .collect();
    if parents.is_empty() {
        return None;
    }
    let grpc = kind == Kind::GRPCRoute;
    Some(pb::Route {
        name: route.metadata.name.clone(),
        namespace: ns.to_owned(),
        kind: i32::from(if grpc {
            pb::RouteKind::Grpc
        } else {
            pb::RouteKind::Http
        }),
        parents,
        rules: route
            .spec
            .rules
            .iter()
            .map(|r| rule(idx, (kind, route), r, grpc))
            .collect(),
        created: route
            .metadata
            .creation_timestamp
            .as_deref()
            .and_then(parse_timestamp)
            .unwrap_or(0),
    })
}

fn rule(idx: &Index<'_>, route: (Kind, &Route), r: &RouteRule, grpc: bool) -> pb::RouteRule {
    let ms = |v: &Option<String>| {
        v.as_deref()
            .and_then(parse_duration_ms)
            .map_or(0, |ms| u32::try_from(ms).unwrap_or(u32::MAX))
    };
    pb::RouteRule {
        matches: r.matches.iter().map(|m| route_match(m, grpc)).collect(),
        filters: filters(idx, route, &r.filters),
        backends: r
            .backend_refs
            .iter()
            .map(|b| backend(idx, route, b))
            .collect(),
        request_timeout_ms: r.timeouts.as_ref().map_or(0, |t| ms(&t.request)),
        backend_timeout_ms: r.timeouts.as_ref().map_or(0, |t| ms(&t.backend_request)),
        retry: r.retry.as_ref().map(|retry| pb::Retry {
            attempts: retry.attempts.unwrap_or(0),
            codes: retry.codes.iter().map(|c| u32::from(*c)).collect(),
            backoff_ms: ms(&retry.backoff),
        }),
    }
}

fn match_kind(type_: Option<&str>) -> i32 {
    let kind = match type_ {
        Some("RegularExpression") => pb::MatchKind::Regex,
        Some("PathPrefix") => pb::MatchKind::Prefix,
        _ => pb::MatchKind::Exact,
    };
    kind as i32
}

fn route_match(m: &RouteMatch, grpc: bool) -> pb::RouteMatch {
    let key_matches = |list: &[crate::model::KeyMatchSpec], lower: bool| {
        list.iter()
            .map(|k| pb::KeyMatch {
                name: if lower {
                    k.name.to_ascii_lowercase()
                } else {
                    k.name.clone()
                },
                kind: match_kind(k.type_.as_deref()),
                value: k.value.clone(),
            })
            .collect()
    };
    let mut out = pb::RouteMatch {
        path: None,
        headers: key_matches(&m.headers, true),
        query: key_matches(&m.query_params, false),
        method: String::new(),
    };
    match &m.method {
        Some(MethodMatchSpec::Http(method)) if !grpc => out.method = method.clone(),
        Some(MethodMatchSpec::Grpc(g)) if grpc => {
            // A gRPC call is a POST to /<service>/<method>.
            let regex = g.type_.as_deref() == Some("RegularExpression");
            out.path = Some(match (regex, g.service.as_deref(), g.method.as_deref()) {
                (false, Some(s), Some(method)) => {
                    path(pb::MatchKind::Exact, format!("/{s}/{method}"))
                }
                (false, Some(s), None) => path(pb::MatchKind::Prefix, format!("/{s}/")),
                (false, None, Some(method)) => {
                    path(pb::MatchKind::Regex, format!("/[^/]+/{}", escape(method)))
                }
                (true, s, method) => path(
                    pb::MatchKind::Regex,
                    format!(
                        "/(?:{})/(?:{})",
                        s.unwrap_or("[^/]+"),
                        method.unwrap_or("[^/]+")
                    ),
                ),
                (false, None, None) => path(pb::MatchKind::Prefix, "/".into()),
            });
        }
        _ => {}
    }
    if let Some(p) = &m.path {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        out.path = Some(pb::PathMatch {
            kind: match p.type_.as_deref() {
                None => pb::MatchKind::Prefix as i32,
                t => match_kind(t),
            },
            value,
        });
    } else if out.path.is_none() {
        out.path = Some(path(pb::MatchKind::Prefix, "/".into()));
    }
    out
}

fn path(kind: pb::MatchKind, value: String) -> pb::PathMatch {
    pb::PathMatch {
        kind: kind as i32,
        value,
    }
}

/// Escapes regex metacharacters in a literal.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn filters(idx: &Index<'_>, route: (Kind, &Route), list: &[RouteFilter]) -> Vec<pb::Filter> {
    list.iter().filter_map(|f| filter(idx, route, f)).collect()
}

fn header_modifier(m: &HeaderModifierSpec) -> pb::HeaderModifier {
    let headers = |list: &[crate::model::HeaderValueSpec]| {
        list.iter()
            .map(|h| pb::Header {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: headers(&m.set),
        add: headers(&m.add),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn path_modifier(p: &PathModifierSpec) -> Option<pb::PathModifier> {
    use pb::path_modifier::Kind;
    let kind = match p.type_.as_str() {
        "ReplaceFullPath" => Kind::Full(p.replace_full_path.clone()?),
        "ReplacePrefixMatch" => Kind::Prefix(p.replace_prefix_match.clone()?),
        _ => return None,
    };
    Some(pb::PathModifier { kind: Some(kind) })
}

fn filter(idx: &Index<'_>, route: (Kind, &Route), f: &RouteFilter) -> Option<pb::Filter> {
    use pb::filter::Kind;
    let kind = match f.type_.as_str() {
        "RequestHeaderModifier" => {
            Kind::RequestHeaders(header_modifier(f.request_header_modifier.as_ref()?))
        }
        "ResponseHeaderModifier" => {
            Kind::ResponseHeaders(header_modifier(f.response_header_modifier.as_ref()?))
        }
        "RequestRedirect" => {
            let r = f.request_redirect.as_ref()?;
            Kind::Redirect(pb::Redirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().and_then(path_modifier),
                port: r.port.map_or(0, u32::from),
                status_code: r.status_code.map_or(302, u32::from),
            })
        }
        "URLRewrite" => {
            let r = f.url_rewrite.as_ref()?;
            Kind::Rewrite(pb::Rewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().and_then(path_modifier),
            })
        }
        "RequestMirror" => {
            let m = f.request_mirror.as_ref()?;
            let percent = match (&m.percent, &m.fraction) {
                (Some(p), _) => *p,
                (None, Some(fr)) => {
                    let den = fr.denominator.unwrap_or(100).max(1);
                    (u64::from(fr.numerator) * 100 / u64::from(den)) as u32
                }
                (None, None) => 100,
            };
            if percent == 0 {
                return None; // Mirrors nothing.
            }
            Kind::Mirror(pb::Mirror {
                backend: Some(backend(idx, route, &m.backend_ref)),
                percent,
            })
        }
        _ => return None, // Refused when the object was read.
    };
    Some(pb::Filter { kind: Some(kind) })
}

fn backend(idx: &Index<'_>, (kind, route): (Kind, &Route), b: &BackendRef) -> pb::Backend {
    let b_ns = b.namespace.as_deref().unwrap_or(&route.metadata.namespace);
    pb::Backend {
        hostname: idx.hostname(b_ns, &b.name),
        port: b.port.map_or(0, u32::from),
        weight: b.weight.unwrap_or(1),
        filters: filters(idx, (kind, route), &b.filters),
        invalid: backend_problem(idx, kind, route, b)
            .map(|(_, message)| message)
            .unwrap_or_default(),
    }
}

/// Why a backend cannot be used, as a `ResolvedRefs` reason and message; `None` if it can.
///
/// A backend in another namespace needs a ReferenceGrant there, except the route's own parent
/// Service: a consumer route may send its namespace's requests on to the Service they were
/// for (the mesh conformance tests expect this).
pub(super) fn backend_problem(
    idx: &Index<'_>,
    kind: Kind,
    route: &Route,
    b: &BackendRef,
) -> Option<(&'static str, String)> {
    let ns = route.metadata.namespace.as_str();
    let group = b.group.as_deref().unwrap_or("");
    let b_kind = b.kind.as_deref().unwrap_or("Service");
    if !(matches!(group, "" | "core") && b_kind == "Service") {
        return Some((
            "InvalidKind",
            format!("backend kind {group}/{b_kind} is not supported; use a Service"),
        ));
    }
    let b_ns = b.namespace.as_deref().unwrap_or(ns);
    let is_parent = route.spec.parent_refs.iter().any(|p| {
        is_service_parent(p) && p.name == b.name && p.namespace.as_deref().unwrap_or(ns) == b_ns
    });
    let granted = || {
        idx.grants.iter().any(|g| {
            g.metadata.namespace == b_ns && g.allows_service(&kind.to_string(), ns, &b.name)
        })
    };
    if b_ns != ns && !is_parent && !granted() {
        return Some((
            "RefNotPermitted",
            format!(
                "backend service {b_ns}/{} is in another namespace and no ReferenceGrant there allows {kind}s from {ns}",
                b.name
            ),
        ));
    }
    let Some(svc) = idx.service(b_ns, &b.name) else {
        return Some((
            "BackendNotFound",
            format!("backend service {b_ns}/{} not found", b.name),
        ));
    };
    match b.port {
        None => Some((
            "InvalidDestination",
            format!("backend service {b_ns}/{} needs a port", b.name),
        )),
        Some(port) if !svc.spec.ports.iter().any(|p| p.port == port) => Some((
            "BackendNotFound",
            format!("backend service {b_ns}/{} has no port {port}", b.name),
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests;

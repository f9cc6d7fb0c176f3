//! AuthorizationPolicy and PeerAuthentication → `istio.security.Authorization`, for ztunnel.
//!
//! ztunnel sees connections, not requests, so a rule that needs HTTP attributes cannot be
//! checked there. The translation fails safe: an ALLOW rule that needs them is dropped (it can
//! only allow less), a DENY rule loses those fields (it can only deny more). Either way the
//! policy's status says what was ignored.

use mesh_proto::security::{
    self as sec, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch,
    StringMatch, string_match::MatchType,
};

use super::{Index, Output, status};
use crate::model::{
    AuthorizationPolicy, MtlsMode, Operation, PeerAuthentication, Pod, PolicyAction, PolicyRule,
    Source, parse_cidr,
};

/// The policy every workload in STRICT mode refers to: deny connections without a peer identity.
/// Generated names contain `_`, which Kubernetes names cannot: they never collide with a user's.
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// `when` keys ztunnel can evaluate.
const L4_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Policies ztunnel is sent at all (targetRef policies are for waypoints; AUDIT and CUSTOM are
/// not supported by ztunnel).
pub(super) fn is_sent(p: &AuthorizationPolicy) -> bool {
    p.spec.target_ref.is_none()
        && p.spec.target_refs.is_empty()
        && matches!(p.spec.action, PolicyAction::Allow | PolicyAction::Deny)
}

pub(super) fn translate(idx: &Index<'_>, out: &mut Output) {
    for p in &idx.policies {
        let key = format!("{}/{}", p.metadata.namespace, p.metadata.name);
        let object = format!("AuthorizationPolicy {key}");
        if p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty() {
            // Applied by the waypoint the target uses, not by ztunnel.
            continue;
        }
        let action = match p.spec.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
            other => {
                out.statuses.push(status::policy_status(
                    &object,
                    p.metadata.generation,
                    false,
                    "UnsupportedValue",
                    format!("ztunnel does not support the {other:?} action"),
                ));
                continue;
            }
        };
        let scope = if p
            .spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
        {
            Scope::WorkloadSelector
        } else if p.metadata.namespace == idx.opts.root_namespace {
            Scope::Global
        } else {
            Scope::Namespace
        };
        let mut ignored = Vec::new();
        let rules = p
            .spec
            .rules
            .iter()
            .flatten()
            .filter_map(|r| rule(r, action, &p.metadata.namespace, &mut ignored))
            .collect();
        let (ok, reason, message) = if ignored.is_empty() {
            (true, "Accepted", "bound to ztunnel".to_owned())
        } else {
            ignored.sort();
            ignored.dedup();
            let effect = if action == Action::Allow {
                "rules using them are ignored, so this policy allows less"
            } else {
                "they are ignored, so this policy denies more"
            };
            (
                true,
                "UnsupportedValue",
                format!(
                    "ztunnel does not support HTTP attributes (found: {}); {effect}; use a waypoint for L7 policy",
                    ignored.join(", ")
                ),
            )
        };
        out.statuses.push(status::policy_status(
            &object,
            p.metadata.generation,
            ok,
            reason,
            message,
        ));
        out.authorizations.insert(
            key,
            Authorization {
                name: p.metadata.name.clone(),
                namespace: p.metadata.namespace.clone(),
                scope: scope as i32,
                action: action as i32,
                rules,
                dry_run: false,
                extensions: vec![],
            },
        );
    }
    peer_authentications(idx, out);
}

/// One AuthorizationPolicy rule: `to`, `from` and each `when` become clauses that must all
/// match; the entries inside a clause are alternatives. `None` drops the rule.
fn rule(r: &PolicyRule, action: Action, ns: &str, ignored: &mut Vec<String>) -> Option<Rule> {
    let before = ignored.len();
    let mut clauses = Vec::new();
    if !r.to.is_empty() {
        let matches =
            r.to.iter()
                .map(|t| operation(&t.operation, ignored))
                .collect();
        clauses.push(Clause { matches });
    }
    if !r.from.is_empty() {
        let matches = r
            .from
            .iter()
            .map(|f| source(&f.source, ns, ignored))
            .collect();
        clauses.push(Clause { matches });
    }
    for w in &r.when {
        let mut m = Match::default();
        if !L4_KEYS.contains(&w.key.as_str()) {
            ignored.push(format!("when.{}", w.key));
        } else {
            condition(&w.key, &w.values, &mut m, false);
            condition(&w.key, &w.not_values, &mut m, true);
        }
        clauses.push(Clause { matches: vec![m] });
    }
    if action == Action::Allow && ignored.len() > before {
        return None;
    }
    Some(Rule { clauses })
}

fn operation(op: &Operation, ignored: &mut Vec<String>) -> Match {
    for (name, v) in [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ] {
        if !v.is_empty() {
            ignored.push(format!("to.operation.{name}"));
        }
    }
    Match {
        destination_ports: ports(&op.ports),
        not_destination_ports: ports(&op.not_ports),
        ..Default::default()
    }
}

fn source(s: &Source, ns: &str, ignored: &mut Vec<String>) -> Match {
    for (name, v) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !v.is_empty() {
            ignored.push(format!("from.source.{name}"));
        }
    }
    Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals: strings(&s.principals),
        not_principals: strings(&s.not_principals),
        source_ips: cidrs(&s.ip_blocks),
        not_source_ips: cidrs(&s.not_ip_blocks),
        service_accounts: service_accounts(&s.service_accounts, ns),
        not_service_accounts: service_accounts(&s.not_service_accounts, ns),
        ..Default::default()
    }
}

fn condition(key: &str, values: &[String], m: &mut Match, negate: bool) {
    if values.is_empty() {
        return;
    }
    match (key, negate) {
        ("source.ip", false) => m.source_ips.extend(cidrs(values)),
        ("source.ip", true) => m.not_source_ips.extend(cidrs(values)),
        ("source.namespace", false) => m.namespaces.extend(strings(values)),
        ("source.namespace", true) => m.not_namespaces.extend(strings(values)),
        ("source.principal", false) => m.principals.extend(strings(values)),
        ("source.principal", true) => m.not_principals.extend(strings(values)),
        ("destination.ip", false) => m.destination_ips.extend(cidrs(values)),
        ("destination.ip", true) => m.not_destination_ips.extend(cidrs(values)),
        ("destination.port", false) => m.destination_ports.extend(ports(values)),
        ("destination.port", true) => m.not_destination_ports.extend(ports(values)),
        _ => {}
    }
}

/// `*` → any value present; `*x` → suffix; `x*` → prefix; else exact.
fn string_match(s: &str) -> StringMatch {
    let t = if s == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = s.strip_prefix('*') {
        MatchType::Suffix(rest.to_owned())
    } else if let Some(rest) = s.strip_suffix('*') {
        MatchType::Prefix(rest.to_owned())
    } else {
        MatchType::Exact(s.to_owned())
    };
    StringMatch {
        match_type: Some(t),
    }
}

fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| string_match(s)).collect()
}

/// Ports were validated when the object was read; anything else is skipped.
fn ports(v: &[String]) -> Vec<u32> {
    v.iter()
        .filter_map(|p| p.parse::<u16>().ok())
        .map(u32::from)
        .collect()
}

fn cidrs(v: &[String]) -> Vec<sec::Address> {
    v.iter()
        .filter_map(|s| parse_cidr(s))
        .map(|(ip, len)| sec::Address {
            address: super::ip_bytes(ip),
            length: len.into(),
        })
        .collect()
}

/// `ns/sa`, or a bare `sa` in the policy's own namespace.
fn service_accounts(v: &[String], ns: &str) -> Vec<ServiceAccountMatch> {
    v.iter()
        .map(|s| match s.split_once('/') {
            Some((n, sa)) => ServiceAccountMatch {
                namespace: n.to_owned(),
                service_account: sa.to_owned(),
            },
            None => ServiceAccountMatch {
                namespace: ns.to_owned(),
                service_account: s.clone(),
            },
        })
        .collect()
}

fn deny_plaintext() -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Default::default()
    }
}

/// The static strict policy (whenever any PeerAuthentication exists) and one policy per
/// workload-selecting PeerAuthentication with port-level exceptions.
fn peer_authentications(idx: &Index<'_>, out: &mut Output) {
    if idx.peer_authns.is_empty() {
        return;
    }
    let root = &idx.opts.root_namespace;
    out.authorizations.insert(
        format!("{root}/{STATIC_STRICT}"),
        Authorization {
            name: STATIC_STRICT.into(),
            namespace: root.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![deny_plaintext()],
                }],
            }],
            dry_run: false,
            extensions: vec![],
        },
    );
    for pa in &idx.peer_authns {
        if &pa.metadata.namespace == root || pa.spec.selector.is_none() {
            continue;
        }
        if pa.spec.port_level_mtls.is_empty() {
            continue;
        }
        let Some(rules) = port_level_rules(idx, pa, None) else {
            continue;
        };
        out.authorizations.insert(
            format!(
                "{}/{CONVERTED_PREFIX}{}",
                pa.metadata.namespace, pa.metadata.name
            ),
            Authorization {
                name: format!("{CONVERTED_PREFIX}{}", pa.metadata.name),
                namespace: pa.metadata.namespace.clone(),
                scope: Scope::WorkloadSelector as i32,
                action: Action::Deny as i32,
                rules,
                dry_run: false,
                extensions: vec![],
            },
        );
    }
}

/// The DENY rules for a PeerAuthentication with port-level modes, given the mode it inherits.
/// `None` when nothing needs denying beyond (or instead of) the static strict policy.
fn port_level_rules(
    idx: &Index<'_>,
    pa: &PeerAuthentication,
    inherited: Option<MtlsMode>,
) -> Option<Vec<Rule>> {
    let parent = inherited.unwrap_or_else(|| namespace_mode(idx, &pa.metadata.namespace));
    let own = pa.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode);
    let effective = if own == MtlsMode::Unset { parent } else { own };
    let ports = |strict: bool| -> Vec<u32> {
        pa.spec
            .port_level_mtls
            .iter()
            .filter(|(_, m)| (m.mode == MtlsMode::Strict) == strict && m.mode != MtlsMode::Unset)
            .filter_map(|(p, _)| p.parse::<u16>().ok().map(u32::from))
            .collect()
    };
    if effective == MtlsMode::Strict {
        let exceptions = ports(false);
        if exceptions.is_empty() {
            return None;
        }
        Some(vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![deny_plaintext()],
                },
                Clause {
                    matches: vec![Match {
                        not_destination_ports: exceptions,
                        ..Default::default()
                    }],
                },
            ],
        }])
    } else {
        let strict = ports(true);
        if strict.is_empty() {
            return None;
        }
        Some(
            strict
                .into_iter()
                .map(|p| Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            destination_ports: vec![p],
                            ..deny_plaintext()
                        }],
                    }],
                })
                .collect(),
        )
    }
}

/// The mode a namespace's workloads inherit: the oldest selector-less PeerAuthentication in the
/// namespace, else the mesh-wide one in the root namespace, else PERMISSIVE. DISABLE counts as
/// PERMISSIVE (ztunnel always accepts HBONE).
fn namespace_mode(idx: &Index<'_>, ns: &str) -> MtlsMode {
    let level = |ns: &str| {
        oldest(
            idx.peer_authns
                .iter()
                .filter(|p| p.metadata.namespace == ns && p.spec.selector.is_none()),
        )
        .map(mode_of)
        .filter(|m| *m != MtlsMode::Unset)
    };
    level(ns)
        .or_else(|| level(&idx.opts.root_namespace))
        .unwrap_or(MtlsMode::Permissive)
}

fn mode_of(p: &PeerAuthentication) -> MtlsMode {
    match p.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode) {
        MtlsMode::Disable => MtlsMode::Permissive,
        m => m,
    }
}

/// Kubernetes gives no creation time in hand-written YAML; names break the tie deterministically.
fn oldest<'a>(
    it: impl Iterator<Item = &'a &'a PeerAuthentication>,
) -> Option<&'a PeerAuthentication> {
    it.min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
        .copied()
}

/// The PeerAuthentication-derived policies a pod refers to.
pub(super) fn peer_authentication_policies(idx: &Index<'_>, pod: &Pod) -> Vec<String> {
    if idx.peer_authns.is_empty() {
        return vec![];
    }
    let ns = pod.metadata.namespace.as_str();
    let root = &idx.opts.root_namespace;
    let selecting = oldest(idx.peer_authns.iter().filter(|p| {
        p.metadata.namespace == ns
            && ns != root
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| super::labels_match(&s.match_labels, &pod.metadata.labels))
    }));
    let inherited = namespace_mode(idx, ns);
    if let Some(pa) = selecting {
        if !pa.spec.port_level_mtls.is_empty()
            && port_level_rules(idx, pa, Some(inherited)).is_some()
        {
            // Its own policy already encodes the workload's mode, exceptions included.
            return vec![format!("{ns}/{CONVERTED_PREFIX}{}", pa.metadata.name)];
        }
        let own = mode_of(pa);
        let effective = if own == MtlsMode::Unset {
            inherited
        } else {
            own
        };
        return strict_ref(effective, root);
    }
    strict_ref(inherited, root)
}

fn strict_ref(mode: MtlsMode, root: &str) -> Vec<String> {
    if mode == MtlsMode::Strict {
        vec![format!("{root}/{STATIC_STRICT}")]
    } else {
        vec![]
    }
}

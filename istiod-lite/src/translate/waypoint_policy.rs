//! AuthorizationPolicies with `targetRefs` → `ambient.waypoint.Policy`, enforced per request
//! by the waypoint that serves the target (a Service, or the waypoint Gateway itself).
//!
//! Everything Istio's waypoint matches on is carried except JWT attributes and `when` keys
//! the waypoint cannot see; those fail safe as for ztunnel: an ALLOW rule that needs them is
//! dropped, a DENY rule loses them. Request principals are exact rather than fail-safe: the
//! mesh reads no RequestAuthentication, so no request has one. CUSTOM (an external
//! authorizer) cannot be honoured, so it fails closed: every request to its targets is denied
//! until the policy is removed, and its status says so.

use mesh_proto::waypoint as pb;

use super::{Index, Output, status};
use crate::model::{AuthorizationPolicy, Operation, PolicyAction, PolicyRule, Source};

/// The condition type of a targetRef policy's status.
pub const CONDITION: &str = "WaypointAccepted";

/// `when` keys the waypoint evaluates (`request.headers[...]` aside).
const KEYS: [&str; 5] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
];

/// Annotation that makes a policy dry-run: evaluated and logged, never enforced.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

pub(super) fn translate(idx: &Index<'_>, out: &mut Output) {
    for p in &idx.policies {
        if p.spec.target_ref.is_none() && p.spec.target_refs.is_empty() {
            continue; // ztunnel's.
        }
        let ns = p.metadata.namespace.as_str();
        let object = format!("AuthorizationPolicy {ns}/{}", p.metadata.name);
        let report = |out: &mut Output, ok: bool, reason: &str, message: String| {
            out.statuses.push(status::condition_status(
                &object,
                CONDITION,
                p.metadata.generation,
                ok,
                reason,
                message,
            ));
        };
        let (targets, mut problems) = targets(idx, p);
        if targets.is_empty() {
            report(out, false, "TargetNotFound", problems.join("; "));
            continue;
        }
        let mut ignored = Vec::new();
        let (action, rules) = match p.spec.action {
            PolicyAction::Allow | PolicyAction::Deny => {
                let action = if p.spec.action == PolicyAction::Allow {
                    pb::PolicyAction::Allow
                } else {
                    pb::PolicyAction::Deny
                };
                let rules = p
                    .spec
                    .rules
                    .iter()
                    .flatten()
                    .filter_map(|r| rule(r, action, ns, &mut ignored))
                    .collect();
                (action, rules)
            }
            PolicyAction::Custom => {
                report(
                    out,
                    false,
                    "UnsupportedValue",
                    "CUSTOM (an external authorizer) is not supported; every request to its targets is denied until this policy is removed".into(),
                );
                out.waypoint_policies.insert(
                    format!("{ns}/{}", p.metadata.name),
                    pb::Policy {
                        name: p.metadata.name.clone(),
                        namespace: ns.to_owned(),
                        action: pb::PolicyAction::Deny as i32,
                        targets,
                        rules: vec![pb::PolicyRule::default()],
                        dry_run: false,
                    },
                );
                continue;
            }
            PolicyAction::Audit => {
                report(
                    out,
                    false,
                    "UnsupportedValue",
                    "AUDIT is not supported; this policy has no effect".into(),
                );
                continue;
            }
        };
        ignored.sort();
        ignored.dedup();
        let (reason, mut message) = if ignored.is_empty() {
            ("Accepted", "bound to the waypoint".to_owned())
        } else {
            let effect = if action == pb::PolicyAction::Allow {
                "rules using them are ignored, so this policy allows less"
            } else {
                "they are ignored, so this policy denies more"
            };
            (
                "UnsupportedValue",
                format!(
                    "the waypoint cannot evaluate {}; {effect}",
                    ignored.join(", ")
                ),
            )
        };
        if !problems.is_empty() {
            problems.insert(0, message);
            message = problems.join("; ");
        }
        report(out, true, reason, message);
        out.waypoint_policies.insert(
            format!("{ns}/{}", p.metadata.name),
            pb::Policy {
                name: p.metadata.name.clone(),
                namespace: ns.to_owned(),
                action: action as i32,
                targets,
                rules,
                dry_run: p
                    .metadata
                    .annotations
                    .get(DRY_RUN_ANNOTATION)
                    .is_some_and(|v| v == "true"),
            },
        );
    }
}

/// The policy's targets as the waypoint names them, and what was wrong with the others.
fn targets(idx: &Index<'_>, p: &AuthorizationPolicy) -> (Vec<String>, Vec<String>) {
    let ns = p.metadata.namespace.as_str();
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    for t in p.spec.target_ref.iter().chain(&p.spec.target_refs) {
        match (t.group.as_str(), t.kind.as_str()) {
            ("" | "core", "Service") => {
                if idx.service(ns, &t.name).is_some() {
                    targets.push(idx.hostname(ns, &t.name));
                } else {
                    problems.push(format!("target Service {ns}/{} not found", t.name));
                }
            }
            ("gateway.networking.k8s.io", "Gateway") => match idx.gateways.get(&(ns, &*t.name)) {
                Some(g) if g.spec.gateway_class_name == crate::model::WAYPOINT_CLASS => {
                    targets.push(format!("gateway:{ns}/{}", t.name));
                }
                Some(_) => problems.push(format!(
                    "target Gateway {ns}/{} is not a waypoint (class {:?})",
                    t.name,
                    crate::model::WAYPOINT_CLASS
                )),
                None => problems.push(format!("target Gateway {ns}/{} not found", t.name)),
            },
            (g, k) => problems.push(format!(
                "target kind {g}/{k} is not supported; use a Service or a waypoint Gateway"
            )),
        }
    }
    targets.sort();
    targets.dedup();
    (targets, problems)
}

fn rule(
    r: &PolicyRule,
    action: pb::PolicyAction,
    ns: &str,
    ignored: &mut Vec<String>,
) -> Option<pb::PolicyRule> {
    let before = ignored.len();
    let from = r
        .from
        .iter()
        .filter_map(|f| {
            let (s, never_matches) = source(&f.source, ns, ignored);
            (!never_matches).then_some(s)
        })
        .collect::<Vec<_>>();
    // Every `from` entry needs a request principal: the rule never matches.
    let never = !r.from.is_empty() && from.is_empty();
    let to = r.to.iter().map(|t| operation(&t.operation)).collect();
    let mut when = Vec::new();
    for w in &r.when {
        let key = w.key.as_str();
        let header = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'));
        let key = match header {
            Some(h) => format!("request.headers[{}]", h.to_ascii_lowercase()),
            None if KEYS.contains(&key) => {
                if key == "remote.ip" {
                    "source.ip".into()
                } else {
                    key.to_owned()
                }
            }
            None => {
                ignored.push(format!("when.{key}"));
                continue;
            }
        };
        when.push(pb::PolicyCondition {
            key,
            values: strings(&w.values),
            not_values: strings(&w.not_values),
        });
    }
    if never || (action == pb::PolicyAction::Allow && ignored.len() > before) {
        return None;
    }
    Some(pb::PolicyRule { from, to, when })
}

/// One `from.source`; the flag says it can never match (it needs a request principal).
fn source(s: &Source, ns: &str, ignored: &mut Vec<String>) -> (pb::PolicySource, bool) {
    let never = !s.request_principals.is_empty();
    let mut principals = strings(&s.principals);
    let mut not_principals = strings(&s.not_principals);
    for (list, out) in [
        (&s.service_accounts, &mut principals),
        (&s.not_service_accounts, &mut not_principals),
    ] {
        if list.is_empty() {
            continue;
        }
        if !out.is_empty() {
            // Both fields must hold, which one list of alternatives cannot say.
            ignored.push("from.source.serviceAccounts with principals".into());
            continue;
        }
        out.extend(list.iter().map(|sa| {
            let (n, sa) = sa.split_once('/').unwrap_or((ns, sa));
            pb::StringMatch {
                kind: Some(pb::string_match::Kind::Suffix(format!("/ns/{n}/sa/{sa}"))),
            }
        }));
    }
    let mut ip_blocks = s.ip_blocks.clone();
    ip_blocks.extend(s.remote_ip_blocks.iter().cloned());
    let mut not_ip_blocks = s.not_ip_blocks.clone();
    not_ip_blocks.extend(s.not_remote_ip_blocks.iter().cloned());
    (
        pb::PolicySource {
            principals,
            not_principals,
            namespaces: strings(&s.namespaces),
            not_namespaces: strings(&s.not_namespaces),
            ip_blocks,
            not_ip_blocks,
        },
        never,
    )
}

fn operation(op: &Operation) -> pb::PolicyOperation {
    let ports = |v: &[String]| -> Vec<u32> {
        v.iter()
            .filter_map(|p| p.parse::<u16>().ok())
            .map(u32::from)
            .collect()
    };
    pb::PolicyOperation {
        hosts: strings(&op.hosts),
        not_hosts: strings(&op.not_hosts),
        paths: strings(&op.paths),
        not_paths: strings(&op.not_paths),
        methods: op.methods.clone(),
        not_methods: op.not_methods.clone(),
        ports: ports(&op.ports),
        not_ports: ports(&op.not_ports),
    }
}

/// Istio's string syntax: `*` → present, `*x` → suffix, `x*` → prefix, else exact.
fn strings(v: &[String]) -> Vec<pb::StringMatch> {
    use pb::string_match::Kind;
    v.iter()
        .map(|s| {
            let kind = if s == "*" {
                Kind::Presence(true)
            } else if let Some(rest) = s.strip_prefix('*') {
                Kind::Suffix(rest.to_owned())
            } else if let Some(rest) = s.strip_suffix('*') {
                Kind::Prefix(rest.to_owned())
            } else {
                Kind::Exact(s.clone())
            };
            pb::StringMatch { kind: Some(kind) }
        })
        .collect()
}

#[cfg(test)]
mod tests;

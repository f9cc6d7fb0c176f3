//! L4 authorization with Istio's semantics: decides whether a connection to a local workload
//! may proceed, from the policies held in the snapshot. Pure: no I/O, only a trace of dry-run
//! outcomes.
//!
//! The policies that apply to a destination workload W are the GLOBAL ones, the NAMESPACE ones
//! of W's namespace and the WORKLOAD_SELECTOR ones W lists in `authorization_policies`. Any
//! matching DENY denies; with no ALLOW policy the connection is allowed; otherwise some ALLOW
//! must match. Dry-run policies are evaluated and logged but never change the verdict.
//!
//! Before the policies, a workload with a waypoint takes connections only from that waypoint
//! ([`waypoint`]).

use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::SpiffeId;
use tracing::info;

use crate::state::policy::{
    Authorization, IpBlock, Match, PolicyAction, PolicyScope, ServiceAccountMatch, StringMatch,
};
use crate::state::{Snapshot, Workload};

/// What the policies see of a connection.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The peer identity proven over mTLS; `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny {
        /// `namespace/name` of the deciding policy (the ALLOW policies, comma-separated, when
        /// none of them matched).
        policy: String,
        /// Why, for the client (`x-mesh-reason`) and the access log.
        reason: String,
    },
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

/// Decides `conn` to `dst` against the policies in `snapshot` that apply to `dst`.
pub fn evaluate(snapshot: &Snapshot, dst: &Workload, conn: &Connection) -> Verdict {
    let identity = conn.src_identity.as_ref().map(|id| id.to_string());
    let ctx = Ctx {
        conn,
        principal: identity
            .as_deref()
            .map(|id| id.strip_prefix("spiffe://").unwrap_or(id)),
    };
    let mut allows: Vec<&Authorization> = Vec::new();
    let mut allow_matched = false;
    for p in applicable(snapshot, dst) {
        let matched = matches_policy(p, &ctx);
        if p.dry_run {
            let would = match (p.action, matched) {
                (PolicyAction::Deny, true) => "deny",
                (PolicyAction::Deny, false) => "no effect",
                (PolicyAction::Allow, true) => "allow",
                (PolicyAction::Allow, false) => "no match",
            };
            info!(
                policy = %key(p),
                dst.workload = %format_args!("{}/{}", dst.namespace, dst.name),
                src.addr = %conn.src_ip,
                src.identity = ctx.principal.unwrap_or(""),
                dst.port = conn.dst_port,
                would,
                component = "rbac",
                "dry-run policy evaluated"
            );
            continue;
        }
        match p.action {
            PolicyAction::Deny if matched => {
                let policy = key(p);
                return Verdict::Deny {
                    reason: format!("denied by DENY policy {policy}"),
                    policy,
                };
            }
            PolicyAction::Deny => {}
            PolicyAction::Allow => {
                allow_matched |= matched;
                allows.push(p);
            }
        }
    }
    if allows.is_empty() || allow_matched {
        return Verdict::Allow;
    }
    let policy = allows.iter().map(|p| key(p)).collect::<Vec<_>>().join(",");
    Verdict::Deny {
        reason: format!("no ALLOW policy matched ({policy})"),
        policy,
    }
}

/// The whole decision on a connection to `dst`: the waypoint rule ([`waypoint::check`]), then
/// the policies ([`evaluate`]). What an open connection is evaluated against again after a
/// config change.
pub fn authorize(snapshot: &Snapshot, dst: &Workload, conn: &Connection) -> Verdict {
    match waypoint::check(snapshot, dst, conn) {
        Verdict::Allow => evaluate(snapshot, dst, conn),
        deny => deny,
    }
}

/// The policies that apply to `dst`: global, its namespace's, then those it selects.
fn applicable<'a>(
    snapshot: &'a Snapshot,
    dst: &'a Workload,
) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
    let selected = dst
        .authorization_policies
        .iter()
        .filter_map(|k| snapshot.policy(k))
        .filter(|p| p.scope == PolicyScope::WorkloadSelector);
    snapshot
        .global_policies()
        .iter()
        .chain(snapshot.namespace_policies(&dst.namespace))
        .chain(selected)
}

fn key(p: &Authorization) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// A policy matches if any rule matches; a rule with no clauses matches everything, and a
/// policy with no rules never matches.
fn matches_policy(p: &Authorization, ctx: &Ctx<'_>) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses
            .iter()
            .all(|clause| clause.matches.iter().any(|m| matches(m, ctx)))
    })
}

/// The connection as matches compare it.
struct Ctx<'a> {
    conn: &'a Connection,
    /// The peer identity without `spiffe://`.
    principal: Option<&'a str>,
}

/// Set fields are ANDed, the values of one field ORed; `not_*` values must not match. An empty
/// Match (nothing set) never matches, as in Istio's ztunnel.
fn matches(m: &Match, ctx: &Ctx<'_>) -> bool {
    if *m == Match::default() {
        return false;
    }
    let c = ctx.conn;
    let ns = c.src_identity.as_ref().map(|id| id.namespace());
    let principal = |s: &StringMatch| string_matches(s, ctx.principal);
    let namespace = |s: &StringMatch| string_matches(s, ns);
    let sa = |s: &ServiceAccountMatch| {
        c.src_identity.as_ref().is_some_and(|id| {
            id.namespace() == s.namespace && id.service_account() == s.service_account
        })
    };
    let src_ip = |b: &IpBlock| contains(b, c.src_ip);
    let dst_ip = |b: &IpBlock| contains(b, c.dst_ip);
    let port = |p: &u16| *p == c.dst_port;
    positive(&m.namespaces, namespace)
        && negative(&m.not_namespaces, namespace)
        && positive(&m.principals, principal)
        && negative(&m.not_principals, principal)
        && positive(&m.source_ips, src_ip)
        && negative(&m.not_source_ips, src_ip)
        && positive(&m.destination_ips, dst_ip)
        && negative(&m.not_destination_ips, dst_ip)
        && positive(&m.destination_ports, port)
        && negative(&m.not_destination_ports, port)
        && positive(&m.service_accounts, sa)
        && negative(&m.not_service_accounts, sa)
}

/// Unset, or some value matches.
fn positive<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

/// No value matches.
fn negative<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(f)
}

/// `None` (no identity) matches nothing, not even presence.
fn string_matches(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence => !v.is_empty(),
    }
}

/// Whether `ip` lies in `block`; never across address families.
fn contains(block: &IpBlock, ip: IpAddr) -> bool {
    match (block.addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let len = u32::from(block.prefix_len.min(32));
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let len = u32::from(block.prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

pub mod revoke;
#[cfg(test)]
mod tests;
pub mod waypoint;

//! L7 authorization: AuthorizationPolicies that target a Service or the waypoint itself,
//! evaluated per request with Istio's semantics.
//!
//! DENY policies are evaluated first: any match refuses the request. Then, if any ALLOW policy
//! applies, one of them must match. A dry-run policy is evaluated and logged, never enforced.
//! A policy matches when any of its rules does; a rule when some `from`, some `to` and every
//! `when` match (an empty part matches anything).

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use mesh_proto::waypoint as pb;

/// The request as authorization sees it.
pub struct Attributes<'a> {
    /// `trust-domain/ns/NS/sa/SA` (the SPIFFE ID without its scheme); `None` without mTLS.
    pub principal: Option<&'a str>,
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    /// Host header without the port.
    pub host: &'a str,
    /// Empty for opaque TCP.
    pub path: &'a str,
    /// Empty for opaque TCP.
    pub method: &'a str,
    pub port: u16,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPolicy(String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => e == v,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

fn strings(list: &[pb::StringMatch]) -> Vec<StringMatch> {
    use pb::string_match::Kind;
    list.iter()
        .filter_map(|m| {
            Some(match m.kind.as_ref()? {
                Kind::Exact(e) => StringMatch::Exact(e.clone()),
                Kind::Prefix(p) => StringMatch::Prefix(p.clone()),
                Kind::Suffix(s) => StringMatch::Suffix(s.clone()),
                Kind::Presence(_) => StringMatch::Presence,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Self, InvalidPolicy> {
        let bad = || InvalidPolicy(format!("{s:?} is not an address or CIDR"));
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
        };
        Ok(Self { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (
                u128::from(u32::from(a)) << 96,
                u128::from(u32::from(b)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), self.prefix),
            _ => return false,
        };
        if bits == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - u32::from(bits));
        a & mask == b & mask
    }
}

fn cidrs(list: &[String]) -> Result<Vec<Cidr>, InvalidPolicy> {
    list.iter().map(|s| Cidr::parse(s)).collect()
}

/// `any` (if not empty) must contain a match and `none` must not.
fn field<T>(any: &[T], none: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (any.is_empty() || any.iter().any(&hit)) && !none.iter().any(hit)
}

#[derive(Debug)]
struct Source {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

impl Source {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        // Without an identity, a principal or namespace condition cannot hold (and a negated
        // one cannot either: Istio treats a missing attribute as not matching).
        let needs_identity = !self.principals.is_empty()
            || !self.not_principals.is_empty()
            || !self.namespaces.is_empty()
            || !self.not_namespaces.is_empty();
        if needs_identity && a.principal.is_none() {
            return false;
        }
        let principal = a.principal.unwrap_or_default();
        let ns = a.source_namespace.unwrap_or_default();
        field(&self.principals, &self.not_principals, |m| {
            m.matches(principal)
        }) && field(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
            && field(&self.ip_blocks, &self.not_ip_blocks, |c| {
                c.contains(a.source_ip)
            })
    }
}

#[derive(Debug)]
struct Operation {
    hosts: Vec<StringMatch>,
    not_hosts: Vec<StringMatch>,
    paths: Vec<StringMatch>,
    not_paths: Vec<StringMatch>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    ports: Vec<u32>,
    not_ports: Vec<u32>,
}

impl Operation {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let host = |m: &StringMatch| match m {
            // Hosts compare without regard to case.
            StringMatch::Exact(e) => e.eq_ignore_ascii_case(a.host),
            other => other.matches(&a.host.to_ascii_lowercase()),
        };
        field(&self.hosts, &self.not_hosts, host)
            && field(&self.paths, &self.not_paths, |m| m.matches(a.path))
            && field(&self.methods, &self.not_methods, |m| {
                m == "*" || m.as_str() == a.method
            })
            && field(&self.ports, &self.not_ports, |p| *p == u32::from(a.port))
    }
}

#[derive(Debug)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    Method,
    Path,
}

#[derive(Debug)]
struct Condition {
    key: Key,
    values: Vec<StringMatch>,
    not_values: Vec<StringMatch>,
}

impl Condition {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let value: Option<String> = match &self.key {
            Key::Header(h) => a
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            Key::SourceIp => {
                // Values may be CIDRs.
                return field(&self.values, &self.not_values, |m| match m {
                    StringMatch::Exact(e) => Cidr::parse(e).is_ok_and(|c| c.contains(a.source_ip)),
                    other => other.matches(&a.source_ip.to_string()),
                });
            }
            Key::SourceNamespace => a.source_namespace.map(str::to_owned),
            Key::SourcePrincipal => a.principal.map(str::to_owned),
            Key::DestinationPort => Some(a.port.to_string()),
            Key::Method => Some(a.method.to_owned()),
            Key::Path => Some(a.path.to_owned()),
        };
        let Some(v) = value else {
            return false;
        };
        field(&self.values, &self.not_values, |m| m.matches(&v))
    }
}

fn key(k: &str) -> Result<Key, InvalidPolicy> {
    if let Some(h) = k
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        return http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
            .map(Key::Header)
            .map_err(|_| InvalidPolicy(format!("when: {h:?} is not a header name")));
    }
    Ok(match k {
        "source.ip" | "remote.ip" => Key::SourceIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.port" => Key::DestinationPort,
        "request.method" => Key::Method,
        "request.path" | "request.url_path" => Key::Path,
        other => {
            return Err(InvalidPolicy(format!(
                "when: key {other:?} is not supported by the waypoint"
            )));
        }
    })
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

impl Rule {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a)))
            && self.when.iter().all(|c| c.matches(a))
    }
}

/// A policy, compiled.
#[derive(Debug)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub deny: bool,
    pub dry_run: bool,
    pub targets: Vec<String>,
    rules: Vec<Rule>,
}

impl Policy {
    pub fn compile(p: &pb::Policy) -> Result<Self, InvalidPolicy> {
        let deny = match pb::PolicyAction::try_from(p.action) {
            Ok(pb::PolicyAction::Allow) => false,
            Ok(pb::PolicyAction::Deny) => true,
            Err(_) => return Err(InvalidPolicy(format!("unknown action {}", p.action))),
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| {
                            Ok(Source {
                                principals: strings(&s.principals),
                                not_principals: strings(&s.not_principals),
                                namespaces: strings(&s.namespaces),
                                not_namespaces: strings(&s.not_namespaces),
                                ip_blocks: cidrs(&s.ip_blocks)?,
                                not_ip_blocks: cidrs(&s.not_ip_blocks)?,
                            })
                        })
                        .collect::<Result<_, InvalidPolicy>>()?,
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            hosts: strings(&o.hosts),
                            not_hosts: strings(&o.not_hosts),
                            paths: strings(&o.paths),
                            not_paths: strings(&o.not_paths),
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| {
                            Ok(Condition {
                                key: key(&c.key)?,
                                values: strings(&c.values),
                                not_values: strings(&c.not_values),
                            })
                        })
                        .collect::<Result<_, InvalidPolicy>>()?,
                })
            })
            .collect::<Result<_, InvalidPolicy>>()?;
        Ok(Self {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            deny,
            dry_run: p.dry_run,
            targets: p.targets.clone(),
            rules,
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn matches(&self, a: &Attributes<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(a))
    }
}

/// The outcome of authorization.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, by the named policy (or because no ALLOW policy matched).
    Deny {
        policy: String,
        reason: String,
    },
}

/// A dry-run policy that would have changed the outcome, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct DryRun {
    pub policy: String,
    pub would: &'static str,
}

/// Evaluates `policies` (those that apply to the request's target) in Istio's order.
pub fn evaluate(policies: &[Arc<Policy>], a: &Attributes<'_>, dry: &mut Vec<DryRun>) -> Verdict {
    for p in policies.iter().filter(|p| p.deny) {
        if p.matches(a) {
            if p.dry_run {
                dry.push(DryRun {
                    policy: p.key(),
                    would: "deny",
                });
                continue;
            }
            return Verdict::Deny {
                policy: p.key(),
                reason: "a DENY policy matched".to_owned(),
            };
        }
    }
    let allows: Vec<&Arc<Policy>> = policies.iter().filter(|p| !p.deny).collect();
    let enforced: Vec<&&Arc<Policy>> = allows.iter().filter(|p| !p.dry_run).collect();
    for p in allows.iter().filter(|p| p.dry_run) {
        if !p.matches(a) {
            dry.push(DryRun {
                policy: p.key(),
                would: "deny (no rule matched)",
            });
        }
    }
    if enforced.is_empty() || enforced.iter().any(|p| p.matches(a)) {
        return Verdict::Allow;
    }
    let names: Vec<String> = enforced.iter().map(|p| p.key()).collect();
    Verdict::Deny {
        policy: names.join(","),
        reason: "no ALLOW policy matched".to_owned(),
    }
}

#[cfg(test)]
mod tests;

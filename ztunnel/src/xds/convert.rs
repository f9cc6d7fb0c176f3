//! From istio.workload and istio.security messages to the snapshot's types. Everything here is
//! peer input: anything unusable is an error naming the field, which becomes part of a NACK.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mesh_core::SpiffeId;
use mesh_core::hbone::HBONE_PORT;
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;
use mesh_proto::security as xsec;
use mesh_proto::workload as xwl;

use crate::state::policy::{
    Clause, IpBlock, Match, PolicyAction, PolicyScope, Rule, ServiceAccountMatch, StringMatch,
};
use crate::state::{
    AppProtocol, Authorization, GatewayAddress, GatewayDestination, NamespacedHostname, Protocol,
    Service, ServicePort, Workload,
};

/// Why a resource cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("field {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("an Address must hold a workload or a service; this one holds neither")]
    EmptyAddress,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// One `istio.workload.Address` resource, converted.
#[derive(Debug, Clone)]
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

impl AddressResource {
    pub fn try_from_xds(a: &xwl::Address) -> Result<Self, ConvertError> {
        match &a.r#type {
            Some(xwl::address::Type::Workload(w)) => Workload::try_from_xds(w).map(Self::Workload),
            Some(xwl::address::Type::Service(s)) => Service::try_from_xds(s).map(Self::Service),
            None => Err(ConvertError::EmptyAddress),
        }
    }

    /// The xDS resource name this resource must be sent under: a workload's uid, a service's
    /// `namespace/hostname`.
    pub fn resource_name(&self) -> String {
        match self {
            Self::Workload(w) => w.uid.clone(),
            Self::Service(s) => s.key(),
        }
    }
}

impl Workload {
    pub fn try_from_xds(w: &xwl::Workload) -> Result<Self, ConvertError> {
        non_empty("uid", &w.uid)?;
        non_empty("name", &w.name)?;
        non_empty("namespace", &w.namespace)?;
        let trust_domain = or_default(&w.trust_domain, DEFAULT_TRUST_DOMAIN);
        let service_account = or_default(&w.service_account, "default");
        let identity = SpiffeId::new(trust_domain, &w.namespace, service_account)
            .map_err(|e| invalid("trust_domain/namespace/service_account", e.to_string()))?;
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ip_from_bytes(a, &format!("addresses[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = match xwl::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(xwl::TunnelProtocol::Hbone) => Protocol::Hbone,
            Ok(xwl::TunnelProtocol::None) => Protocol::Tcp,
            Ok(xwl::TunnelProtocol::LegacyIstioMtls) => {
                return Err(invalid(
                    "tunnel_protocol",
                    "LEGACY_ISTIO_MTLS (sidecar mTLS) is not supported; ztunnel carries traffic over HBONE or plain TCP",
                ));
            }
            Err(_) => {
                return Err(invalid(
                    "tunnel_protocol",
                    format!("unknown value {}", w.tunnel_protocol),
                ));
            }
        };
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| gateway(g, "waypoint"))
            .transpose()?;
        let mut services = BTreeMap::new();
        for (key, list) in &w.services {
            if !key.contains('/') {
                return Err(invalid(
                    format!("services[{key:?}]"),
                    "the key must be namespace/hostname",
                ));
            }
            let ports = list
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| service_port(p, &format!("services[{key:?}].ports[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            services.insert(key.clone(), ports);
        }
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: service_account.to_owned(),
            identity,
            node: w.node.clone(),
            addresses,
            protocol,
            canonical_name: or_default(&w.canonical_name, &w.name).to_owned(),
            canonical_revision: or_default(&w.canonical_revision, "latest").to_owned(),
            healthy: w.status == xwl::WorkloadStatus::Healthy as i32,
            waypoint,
            authorization_policies: w.authorization_policies.clone(),
            services,
        })
    }
}

impl Service {
    /// Endpoints are left empty: they come from the workloads that name this service.
    pub fn try_from_xds(s: &xwl::Service) -> Result<Self, ConvertError> {
        non_empty("name", &s.name)?;
        non_empty("namespace", &s.namespace)?;
        non_empty("hostname", &s.hostname)?;
        let addresses = s
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ip_from_bytes(&a.address, &format!("addresses[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = s
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| service_port(p, &format!("ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = s
            .waypoint
            .as_ref()
            .map(|g| gateway(g, "waypoint"))
            .transpose()?;
        Ok(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            addresses,
            ports,
            endpoints: Vec::new(),
            waypoint,
        })
    }
}

impl Authorization {
    pub fn try_from_xds(a: &xsec::Authorization) -> Result<Self, ConvertError> {
        non_empty("name", &a.name)?;
        non_empty("namespace", &a.namespace)?;
        let scope = match xsec::Scope::try_from(a.scope) {
            Ok(xsec::Scope::Global) => PolicyScope::Global,
            Ok(xsec::Scope::Namespace) => PolicyScope::Namespace,
            Ok(xsec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => return Err(invalid("scope", format!("unknown value {}", a.scope))),
        };
        let action = match xsec::Action::try_from(a.action) {
            Ok(xsec::Action::Allow) => PolicyAction::Allow,
            Ok(xsec::Action::Deny) => PolicyAction::Deny,
            Err(_) => return Err(invalid("action", format!("unknown value {}", a.action))),
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for (r, rule) in a.rules.iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (c, clause) in rule.clauses.iter().enumerate() {
                let matches = clause
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(m, x)| policy_match(x, &format!("rules[{r}].clauses[{c}].matches[{m}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                clauses.push(Clause { matches });
            }
            rules.push(Rule { clauses });
        }
        Ok(Authorization {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

fn policy_match(m: &xsec::Match, at: &str) -> Result<Match, ConvertError> {
    let strings = |v: &[xsec::StringMatch], field: &str| {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match(s, &format!("{at}.{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let blocks = |v: &[xsec::Address], field: &str| {
        v.iter()
            .enumerate()
            .map(|(i, a)| ip_block(a, &format!("{at}.{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |v: &[u32], field: &str| {
        v.iter()
            .enumerate()
            .map(|(i, p)| port(*p, &format!("{at}.{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |v: &[xsec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings(&m.namespaces, "namespaces")?,
        not_namespaces: strings(&m.not_namespaces, "not_namespaces")?,
        principals: strings(&m.principals, "principals")?,
        not_principals: strings(&m.not_principals, "not_principals")?,
        source_ips: blocks(&m.source_ips, "source_ips")?,
        not_source_ips: blocks(&m.not_source_ips, "not_source_ips")?,
        destination_ips: blocks(&m.destination_ips, "destination_ips")?,
        not_destination_ips: blocks(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    })
}

fn string_match(s: &xsec::StringMatch, field: &str) -> Result<StringMatch, ConvertError> {
    use xsec::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(invalid(
            field,
            "no match type (exact, prefix, suffix or presence)",
        )),
    }
}

fn ip_block(a: &xsec::Address, field: &str) -> Result<IpBlock, ConvertError> {
    let ip = ip_from_bytes(&a.address, field)?;
    u8::try_from(a.length)
        .ok()
        .and_then(|len| IpBlock::new(ip, len))
        .ok_or_else(|| {
            invalid(
                field,
                format!("prefix length {} is too long for {ip}", a.length),
            )
        })
}

fn gateway(g: &xwl::GatewayAddress, field: &str) -> Result<GatewayAddress, ConvertError> {
    use xwl::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Hostname(h)) => {
            if h.hostname.is_empty() || h.namespace.is_empty() {
                return Err(invalid(
                    format!("{field}.hostname"),
                    "needs both namespace and hostname",
                ));
            }
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            })
        }
        Some(Destination::Address(a)) => {
            GatewayDestination::Address(ip_from_bytes(&a.address, &format!("{field}.address"))?)
        }
        None => return Err(invalid(field, "names neither a hostname nor an address")),
    };
    let hbone_port = match g.hbone_mtls_port {
        0 => HBONE_PORT,
        p => port(p, &format!("{field}.hbone_mtls_port"))?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_port,
    })
}

fn service_port(p: &xwl::Port, field: &str) -> Result<ServicePort, ConvertError> {
    let service = port(p.service_port, &format!("{field}.service_port"))?;
    // 0 is allowed here: a named target port, resolved per endpoint.
    let target = u16::try_from(p.target_port).map_err(|_| {
        invalid(
            format!("{field}.target_port"),
            format!("{} is not a port", p.target_port),
        )
    })?;
    let app_protocol = match xwl::AppProtocol::try_from(p.app_protocol) {
        Ok(xwl::AppProtocol::Http11) => AppProtocol::Http1,
        Ok(xwl::AppProtocol::Http2) => AppProtocol::Http2,
        Ok(xwl::AppProtocol::Grpc) => AppProtocol::Grpc,
        Ok(xwl::AppProtocol::Tcp) => AppProtocol::Tcp,
        Ok(xwl::AppProtocol::Tls) => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    };
    Ok(ServicePort {
        port: service,
        target_port: target,
        app_protocol,
    })
}

fn port(p: u32, field: &str) -> Result<u16, ConvertError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("{p} is not a port")))
}

/// An address from its network-order bytes: 4 for IPv4, 16 for IPv6.
pub fn ip_from_bytes(b: &[u8], field: &str) -> Result<IpAddr, ConvertError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(invalid(
            field,
            format!(
                "an address is 4 bytes (IPv4) or 16 bytes (IPv6), not {}",
                b.len()
            ),
        ))
    }
}

fn non_empty(field: &str, v: &str) -> Result<(), ConvertError> {
    if v.is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn or_default<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() { default } else { v }
}

#[cfg(test)]
pub(crate) mod tests;

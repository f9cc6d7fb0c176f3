//! Reading ztunnel's `/config_dump` JSON into the few fields the views show.
//!
//! Fields are looked up by hand rather than deserialised so that an error names the exact place
//! in the dump (`workloads[3].addresses[0]`); unknown fields are ignored, so a newer ztunnel
//! that adds fields still renders.

use serde_json::Value;

/// A value in the dump and the path that leads to it, for error messages.
#[derive(Clone)]
struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn root(dump: &'a Value) -> Self {
        Self {
            value: dump,
            path: String::new(),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// A field that must be present (it may be `null` if the caller then accepts that).
    fn field(&self, key: &str) -> Result<Node<'a>, String> {
        let map = self
            .value
            .as_object()
            .ok_or_else(|| self.wrong("an object"))?;
        match map.get(key) {
            Some(value) => Ok(Node {
                value,
                path: self.child_path(key),
            }),
            None if self.path.is_empty() => Err(format!(
                "config_dump has no field \"{key}\"; is the ztunnel older than this CLI?"
            )),
            None => Err(format!(
                "config_dump field \"{}\" is missing",
                self.child_path(key)
            )),
        }
    }

    /// A field that may be absent or `null`.
    fn optional(&self, key: &str) -> Result<Option<Node<'a>>, String> {
        let map = self
            .value
            .as_object()
            .ok_or_else(|| self.wrong("an object"))?;
        Ok(map.get(key).filter(|v| !v.is_null()).map(|value| Node {
            value,
            path: self.child_path(key),
        }))
    }

    fn wrong(&self, expected: &str) -> String {
        let found = match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        };
        let path = if self.path.is_empty() {
            "config_dump".to_owned()
        } else {
            format!("config_dump field \"{}\"", self.path)
        };
        format!("{path} should be {expected}, found {found}")
    }

    fn str(&self) -> Result<&'a str, String> {
        self.value.as_str().ok_or_else(|| self.wrong("a string"))
    }

    fn u64(&self) -> Result<u64, String> {
        self.value
            .as_u64()
            .ok_or_else(|| self.wrong("a non-negative integer"))
    }

    fn bool(&self) -> Result<bool, String> {
        self.value.as_bool().ok_or_else(|| self.wrong("a boolean"))
    }

    fn list(&self) -> Result<Vec<Node<'a>>, String> {
        let items = self.value.as_array().ok_or_else(|| self.wrong("a list"))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    fn str_field(&self, key: &str) -> Result<&'a str, String> {
        self.field(key)?.str()
    }

    fn optional_str(&self, key: &str) -> Result<Option<&'a str>, String> {
        self.optional(key)?.map(|n| n.str()).transpose()
    }

    fn strs_field(&self, key: &str) -> Result<Vec<&'a str>, String> {
        self.field(key)?.list()?.iter().map(Node::str).collect()
    }
}

/// A workload as the dump lists it under `workloads`.
#[derive(Debug)]
pub(super) struct Workload<'a> {
    pub raw: &'a Value,
    pub uid: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub node: &'a str,
    pub addresses: Vec<&'a str>,
    pub protocol: &'a str,
    pub healthy: bool,
    pub waypoint: Option<Gateway<'a>>,
}

/// Where a waypoint is: a service by hostname, or an address.
#[derive(Debug)]
pub(super) enum Gateway<'a> {
    Hostname {
        namespace: &'a str,
        hostname: &'a str,
    },
    Address(&'a str),
}

#[derive(Debug)]
pub(super) struct Service<'a> {
    pub raw: &'a Value,
    pub name: &'a str,
    pub namespace: &'a str,
    pub hostname: &'a str,
    pub addresses: Vec<&'a str>,
    /// Uids of the workloads behind the service.
    pub endpoints: Vec<&'a str>,
    pub waypoint: Option<Gateway<'a>>,
}

#[derive(Debug)]
pub(super) struct Policy<'a> {
    pub raw: &'a Value,
    pub name: &'a str,
    pub namespace: &'a str,
    /// `GLOBAL`, `NAMESPACE` or `WORKLOAD_SELECTOR`.
    pub scope: &'a str,
    /// `ALLOW` or `DENY`.
    pub action: &'a str,
    pub rules: usize,
    pub dry_run: bool,
}

#[derive(Debug)]
pub(super) struct Certificate<'a> {
    pub raw: &'a Value,
    pub identity: &'a str,
    /// As ztunnel judged it when it wrote the dump (`Valid`, `Expired`).
    pub state: &'a str,
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Debug)]
pub(super) struct Connection<'a> {
    pub raw: &'a Value,
    pub direction: &'a str,
    /// `namespace/name` of the local workload, when ztunnel could tell.
    pub workload: Option<&'a str>,
    pub source: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub protocol: &'a str,
    pub peer_identity: Option<&'a str>,
    pub age_ms: u64,
}

#[derive(Debug)]
pub(super) struct Pod<'a> {
    pub raw: &'a Value,
    pub uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub ips: Vec<&'a str>,
    pub state: &'a str,
    pub error: Option<&'a str>,
}

fn section<'a>(dump: &'a Value, key: &str) -> Result<Vec<Node<'a>>, String> {
    Node::root(dump).field(key)?.list()
}

fn gateway<'a>(parent: &Node<'a>, key: &str) -> Result<Option<Gateway<'a>>, String> {
    let Some(g) = parent.optional(key)? else {
        return Ok(None);
    };
    if let Some(h) = g.optional("hostname")? {
        return Ok(Some(Gateway::Hostname {
            namespace: h.str_field("namespace")?,
            hostname: h.str_field("hostname")?,
        }));
    }
    match g.optional_str("address")? {
        Some(a) => Ok(Some(Gateway::Address(a))),
        None => Err(format!(
            "config_dump field \"{}\" has neither \"hostname\" nor \"address\"",
            g.path
        )),
    }
}

pub(super) fn workloads(dump: &Value) -> Result<Vec<Workload<'_>>, String> {
    section(dump, "workloads")?
        .into_iter()
        .map(|w| {
            Ok(Workload {
                raw: w.value,
                uid: w.str_field("uid")?,
                name: w.str_field("name")?,
                namespace: w.str_field("namespace")?,
                node: w.str_field("node")?,
                addresses: w.strs_field("addresses")?,
                protocol: w.str_field("protocol")?,
                healthy: w.field("healthy")?.bool()?,
                waypoint: gateway(&w, "waypoint")?,
            })
        })
        .collect()
}

pub(super) fn services(dump: &Value) -> Result<Vec<Service<'_>>, String> {
    section(dump, "services")?
        .into_iter()
        .map(|s| {
            Ok(Service {
                raw: s.value,
                name: s.str_field("name")?,
                namespace: s.str_field("namespace")?,
                hostname: s.str_field("hostname")?,
                addresses: s.strs_field("addresses")?,
                endpoints: s.strs_field("endpoints")?,
                waypoint: gateway(&s, "waypoint")?,
            })
        })
        .collect()
}

pub(super) fn policies(dump: &Value) -> Result<Vec<Policy<'_>>, String> {
    section(dump, "policies")?
        .into_iter()
        .map(|p| {
            Ok(Policy {
                raw: p.value,
                name: p.str_field("name")?,
                namespace: p.str_field("namespace")?,
                scope: p.str_field("scope")?,
                action: p.str_field("action")?,
                rules: p.field("rules")?.list()?.len(),
                dry_run: match p.optional("dryRun")? {
                    Some(d) => d.bool()?,
                    None => false,
                },
            })
        })
        .collect()
}

pub(super) fn certificates(dump: &Value) -> Result<Vec<Certificate<'_>>, String> {
    section(dump, "certificates")?
        .into_iter()
        .map(|c| {
            Ok(Certificate {
                raw: c.value,
                identity: c.str_field("identity")?,
                state: c.str_field("state")?,
                not_before: c.field("notBefore")?.u64()?,
                not_after: c.field("notAfter")?.u64()?,
            })
        })
        .collect()
}

pub(super) fn connections(dump: &Value) -> Result<Vec<Connection<'_>>, String> {
    section(dump, "connections")?
        .into_iter()
        .map(|c| {
            Ok(Connection {
                raw: c.value,
                direction: c.str_field("direction")?,
                workload: c.optional_str("workload")?,
                source: c.optional_str("source")?,
                destination: c.optional_str("destination")?,
                protocol: c.str_field("protocol")?,
                peer_identity: c.optional_str("peerIdentity")?,
                age_ms: c.field("ageMs")?.u64()?,
            })
        })
        .collect()
}

/// The pods the node agent handed over; `None` when the dump says `null`: this ztunnel does
/// not run in-pod capture.
pub(super) fn pods(dump: &Value) -> Result<Option<Vec<Pod<'_>>>, String> {
    let section = Node::root(dump).field("pods")?;
    if section.value.is_null() {
        return Ok(None);
    }
    section
        .list()?
        .into_iter()
        .map(|p| {
            Ok(Pod {
                raw: p.value,
                uid: p.str_field("uid")?,
                namespace: p.str_field("namespace")?,
                name: p.str_field("name")?,
                ips: p.strs_field("ips")?,
                state: p.str_field("state")?,
                error: p.optional_str("error")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

/// The namespace in a SPIFFE identity (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
pub(super) fn identity_namespace(identity: &str) -> Option<&str> {
    let path = identity.strip_prefix("spiffe://")?;
    let mut parts = path.split('/').skip(1);
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa")) => Some(ns),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn errors_name_the_path() {
        let dump = json!({"workloads": [
            {"uid": "a", "name": "a", "namespace": "n", "node": "x", "addresses": [],
             "protocol": "HBONE", "healthy": true, "waypoint": null},
            {"uid": "b", "name": "b", "namespace": "n", "node": 7},
        ]});
        assert_eq!(
            workloads(&dump).unwrap_err(),
            "config_dump field \"workloads[1].node\" should be a string, found a number"
        );
        let dump = json!({"workloads": [{"uid": "b", "name": "b", "namespace": "n"}]});
        assert_eq!(
            workloads(&dump).unwrap_err(),
            "config_dump field \"workloads[0].node\" is missing"
        );
        assert!(
            connections(&json!({}))
                .unwrap_err()
                .contains("no field \"connections\"")
        );
        assert_eq!(
            services(&json!([])).unwrap_err(),
            "config_dump should be an object, found a list"
        );
    }

    #[test]
    fn waypoint_forms() {
        let w = |wp: Value| {
            json!({"services": [{"name": "s", "namespace": "n", "hostname": "h",
                "addresses": [], "endpoints": [], "waypoint": wp}]})
        };
        let d = w(json!({"hostname": {"namespace": "n", "hostname": "wp.n.svc"}, "hbonePort": 1}));
        assert!(matches!(
            services(&d).unwrap()[0].waypoint,
            Some(Gateway::Hostname {
                hostname: "wp.n.svc",
                ..
            })
        ));
        let d = w(json!({"address": "10.0.0.1", "hbonePort": 1}));
        assert!(matches!(
            services(&d).unwrap()[0].waypoint,
            Some(Gateway::Address("10.0.0.1"))
        ));
        let d = w(json!({"hbonePort": 1}));
        assert!(services(&d).unwrap_err().contains("services[0].waypoint"));
    }

    #[test]
    fn namespace_of_an_identity() {
        assert_eq!(
            identity_namespace("spiffe://cluster.local/ns/apps/sa/echo"),
            Some("apps")
        );
        assert_eq!(identity_namespace("spiffe://cluster.local/other"), None);
        assert_eq!(identity_namespace("apps/echo"), None);
    }
}

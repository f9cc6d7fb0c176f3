//! One function per view: the rows of its table and the dump items it shows.

use std::collections::HashMap;

use serde_json::Value;

use super::Filter;
use super::dump::{self, Gateway};
use super::time::{age, rfc3339};

/// Shown for an absent value (no waypoint, no peer identity), as `istioctl` does.
const NONE: &str = "None";

/// What one view shows.
pub(super) struct Section {
    /// The top-level field of the dump it comes from.
    pub key: &'static str,
    pub heading: &'static str,
    pub headers: &'static [&'static str],
    /// Sorted.
    pub rows: Vec<Vec<String>>,
    /// Said instead of a table when the section does not apply to this ztunnel.
    pub note: Option<&'static str>,
    /// The dump's own items that pass the filter, in dump order, for `-o json|yaml`.
    pub items: Value,
}

pub(super) fn workloads(dump: &Value, filter: &Filter) -> Result<Section, String> {
    let names = Names::new(dump);
    let mut shown: Vec<_> = dump::workloads(dump)?
        .into_iter()
        .filter(|w| filter.matches_namespace(Some(w.namespace)) && filter.matches_node(w.node))
        .collect();
    let items = raw(&shown, |w| w.raw);
    shown.sort_by(|a, b| (a.namespace, a.name, a.uid).cmp(&(b.namespace, b.name, b.uid)));
    let rows = shown
        .iter()
        .map(|w| {
            vec![
                w.namespace.to_owned(),
                w.name.to_owned(),
                joined(&w.addresses),
                w.node.to_owned(),
                names.waypoint(w.waypoint.as_ref(), w.namespace),
                w.protocol.to_owned(),
            ]
        })
        .collect();
    Ok(Section {
        key: "workloads",
        heading: "Workloads",
        headers: &[
            "NAMESPACE",
            "POD NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ],
        rows,
        note: None,
        items,
    })
}

pub(super) fn services(dump: &Value, filter: &Filter) -> Result<Section, String> {
    let names = Names::new(dump);
    let mut shown: Vec<_> = dump::services(dump)?
        .into_iter()
        .filter(|s| filter.matches_namespace(Some(s.namespace)))
        .collect();
    // An endpoint counts as healthy when ztunnel would send traffic to it: known, healthy
    // and with an address.
    let healthy: HashMap<&str, bool> = dump::workloads(dump)?
        .iter()
        .map(|w| (w.uid, w.healthy && !w.addresses.is_empty()))
        .collect();
    let items = raw(&shown, |s| s.raw);
    shown.sort_by(|a, b| (a.namespace, a.name, a.hostname).cmp(&(b.namespace, b.name, b.hostname)));
    let rows = shown
        .iter()
        .map(|s| {
            let up = s
                .endpoints
                .iter()
                .filter(|uid| healthy.get(*uid).copied().unwrap_or(false))
                .count();
            vec![
                s.namespace.to_owned(),
                s.name.to_owned(),
                joined(&s.addresses),
                names.waypoint(s.waypoint.as_ref(), s.namespace),
                format!("{up}/{}", s.endpoints.len()),
            ]
        })
        .collect();
    Ok(Section {
        key: "services",
        heading: "Services",
        headers: &[
            "NAMESPACE",
            "SERVICE NAME",
            "SERVICE VIP",
            "WAYPOINT",
            "ENDPOINTS",
        ],
        rows,
        note: None,
        items,
    })
}

pub(super) fn policies(dump: &Value, filter: &Filter) -> Result<Section, String> {
    let mut shown: Vec<_> = dump::policies(dump)?
        .into_iter()
        .filter(|p| filter.matches_namespace(Some(p.namespace)))
        .collect();
    let items = raw(&shown, |p| p.raw);
    shown.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    let rows = shown
        .iter()
        .map(|p| {
            let mut action = title_case(p.action);
            if p.dry_run {
                action.push_str(" (dry run)");
            }
            vec![
                p.namespace.to_owned(),
                p.name.to_owned(),
                action,
                title_case(p.scope),
                p.rules.to_string(),
            ]
        })
        .collect();
    Ok(Section {
        key: "policies",
        heading: "Policies",
        headers: &["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "RULES"],
        rows,
        note: None,
        items,
    })
}

pub(super) fn certificates(
    dump: &Value,
    filter: &Filter,
    now_unix: u64,
) -> Result<Section, String> {
    let mut shown: Vec<_> = dump::certificates(dump)?
        .into_iter()
        .filter(|c| filter.matches_namespace(dump::identity_namespace(c.identity)))
        .collect();
    let items = raw(&shown, |c| c.raw);
    shown.sort_by(|a, b| a.identity.cmp(b.identity));
    let rows = shown
        .iter()
        .map(|c| {
            let valid = c.not_before <= now_unix && now_unix < c.not_after;
            vec![
                c.identity.to_owned(),
                // ztunnel keeps only workload certificates; roots are not in the dump.
                "Leaf".to_owned(),
                c.state.to_owned(),
                valid.to_string(),
                rfc3339(c.not_after),
                rfc3339(c.not_before),
            ]
        })
        .collect();
    Ok(Section {
        key: "certificates",
        heading: "Certificates",
        headers: &[
            "CERTIFICATE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "NOT AFTER",
            "NOT BEFORE",
        ],
        rows,
        note: None,
        items,
    })
}

pub(super) fn connections(dump: &Value, filter: &Filter) -> Result<Section, String> {
    let mut shown: Vec<_> = dump::connections(dump)?
        .into_iter()
        .filter(|c| {
            let namespace = c.workload.and_then(|w| w.split_once('/')).map(|(ns, _)| ns);
            filter.matches_namespace(namespace)
        })
        .collect();
    let items = raw(&shown, |c| c.raw);
    // Stable: connections that tie keep the dump's order, oldest first. Those ztunnel could
    // not attribute to a workload go last.
    shown.sort_by_key(|c| {
        (
            c.workload.is_none(),
            c.workload,
            c.direction,
            c.source,
            c.destination,
        )
    });
    let rows = shown
        .iter()
        .map(|c| {
            vec![
                c.workload.unwrap_or(NONE).to_owned(),
                c.direction.to_owned(),
                c.source.unwrap_or(NONE).to_owned(),
                c.destination.unwrap_or(NONE).to_owned(),
                c.protocol.to_owned(),
                c.peer_identity.unwrap_or(NONE).to_owned(),
                age(c.age_ms),
            ]
        })
        .collect();
    Ok(Section {
        key: "connections",
        heading: "Connections",
        headers: &[
            "WORKLOAD",
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
            "PROTOCOL",
            "PEER",
            "AGE",
        ],
        rows,
        note: None,
        items,
    })
}

pub(super) fn pods(dump: &Value, filter: &Filter) -> Result<Section, String> {
    let headers = &["NAMESPACE", "POD NAME", "ADDRESS", "STATE", "ERROR"];
    let Some(all) = dump::pods(dump)? else {
        return Ok(Section {
            key: "pods",
            heading: "Pods",
            headers,
            rows: Vec::new(),
            note: Some("in-pod capture is off on this ztunnel (\"pods\" is null)"),
            items: Value::Null,
        });
    };
    let mut shown: Vec<_> = all
        .into_iter()
        .filter(|p| filter.matches_namespace(Some(p.namespace)))
        .collect();
    let items = raw(&shown, |p| p.raw);
    shown.sort_by(|a, b| (a.namespace, a.name, a.uid).cmp(&(b.namespace, b.name, b.uid)));
    let rows = shown
        .iter()
        .map(|p| {
            vec![
                p.namespace.to_owned(),
                p.name.to_owned(),
                joined(&p.ips),
                p.state.to_owned(),
                p.error.unwrap_or(NONE).to_owned(),
            ]
        })
        .collect();
    Ok(Section {
        key: "pods",
        heading: "Pods",
        headers,
        rows,
        note: None,
        items,
    })
}

/// The dump's items, cloned into a list.
fn raw<T>(shown: &[T], item: impl Fn(&T) -> &Value) -> Value {
    Value::Array(shown.iter().map(|t| item(t).clone()).collect())
}

fn joined(values: &[&str]) -> String {
    if values.is_empty() {
        NONE.to_owned()
    } else {
        values.join(",")
    }
}

/// `WORKLOAD_SELECTOR` → `WorkloadSelector`, `ALLOW` → `Allow`, as `istioctl` shows them.
fn title_case(screaming: &str) -> String {
    screaming
        .split('_')
        .flat_map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase())
                .into_iter()
                .chain(chars.map(|c| c.to_ascii_lowercase()))
        })
        .collect()
}

/// Names of services and workloads by address and hostname, to show a waypoint by name.
///
/// Built from whatever in the dump reads cleanly: a malformed entry only costs a name here;
/// the view that lists it reports the error.
struct Names<'a> {
    by_address: HashMap<&'a str, (&'a str, &'a str)>,
    by_hostname: HashMap<&'a str, (&'a str, &'a str)>,
}

impl<'a> Names<'a> {
    fn new(dump: &'a Value) -> Self {
        let mut names = Names {
            by_address: HashMap::new(),
            by_hostname: HashMap::new(),
        };
        let entries = |key: &str| {
            dump.get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|item| {
                    let namespace = item.get("namespace")?.as_str()?;
                    let name = item.get("name")?.as_str()?;
                    Some((item, (namespace, name)))
                })
        };
        let addresses = |item: &'a Value| {
            item.get("addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
        };
        // A service wins over a workload that shares its address.
        for (item, name) in entries("workloads").chain(entries("services")) {
            for address in addresses(item) {
                names.by_address.insert(address, name);
            }
        }
        for (item, name) in entries("services") {
            if let Some(host) = item.get("hostname").and_then(Value::as_str) {
                names.by_hostname.insert(host, name);
            }
        }
        names
    }

    /// `name` for a waypoint in `namespace`, `namespace/name` for one elsewhere; the hostname
    /// or address itself when the dump does not name it.
    fn waypoint(&self, gateway: Option<&Gateway<'_>>, namespace: &str) -> String {
        let show = |(ns, name): (&str, &str)| {
            if ns == namespace {
                name.to_owned()
            } else {
                format!("{ns}/{name}")
            }
        };
        match gateway {
            None => NONE.to_owned(),
            Some(Gateway::Hostname {
                namespace: ns,
                hostname,
            }) => match self.by_hostname.get(hostname) {
                Some(&name) => show(name),
                // `<name>.<namespace>.svc.<domain>` names a service even if the dump does
                // not list it.
                None => match hostname.split_once('.') {
                    Some((name, rest))
                        if rest
                            .strip_prefix(*ns)
                            .is_some_and(|r| r == ".svc" || r.starts_with(".svc.")) =>
                    {
                        show((ns, name))
                    }
                    _ => hostname.to_string(),
                },
            },
            Some(Gateway::Address(address)) => match self.by_address.get(address) {
                Some(&name) => show(name),
                None => address.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screaming_snake_to_title_case() {
        assert_eq!(title_case("WORKLOAD_SELECTOR"), "WorkloadSelector");
        assert_eq!(title_case("ALLOW"), "Allow");
        assert_eq!(title_case(""), "");
    }
}

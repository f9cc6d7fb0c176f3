//! The standalone mesh description: a YAML file of workloads and services, watched for changes.
//!
//! ```yaml
//! trustDomain: cluster.local      # optional
//! workloads:
//!   - name: client
//!     namespace: default
//!     serviceAccount: client      # optional, "default"
//!     node: node-a
//!     addresses: [198.18.0.1]
//!     protocol: HBONE             # or TCP for a workload outside the mesh
//!     labels: {app: client}
//! services:
//!   - name: echo
//!     namespace: default
//!     addresses: [198.18.200.1]
//!     ports: [{port: 80, targetPort: 8080}]
//!     selector: {app: echo}
//!     waypoint: {service: waypoint}   # optional: traffic to the VIP goes through it
//! ```
//!
//! A `waypoint` (on a service, or on a workload for traffic to its own address) names a
//! service of the file, in the object's namespace unless `namespace` says otherwise, or gives
//! an `address` (a service VIP or a workload address); `hbonePort` defaults to 15008. The
//! waypoint's own pods are workloads with `protocol: TCP`, as they are not captured.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::SpiffeId;
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;
use serde::Deserialize;
use tracing::{error, info};

use crate::state::{
    GatewayAddress, GatewayDestination, NamespacedHostname, Protocol, Service, ServicePort,
    Snapshot, Store, Workload,
};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default = "default_service_account")]
    service_account: String,
    node: String,
    addresses: Vec<IpAddr>,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    canonical_name: Option<String>,
    #[serde(default)]
    canonical_revision: Option<String>,
    #[serde(default = "default_true")]
    healthy: bool,
    #[serde(default)]
    waypoint: Option<WaypointSpec>,
}

/// A waypoint: a service of the file by name, or an address.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaypointSpec {
    #[serde(default)]
    service: Option<String>,
    /// The service's namespace; the referring object's by default.
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    hbone_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    hostname: Option<String>,
    addresses: Vec<IpAddr>,
    ports: Vec<PortSpec>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    waypoint: Option<WaypointSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortSpec {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_service_account() -> String {
    "default".into()
}
fn default_protocol() -> Protocol {
    Protocol::Hbone
}
fn default_true() -> bool {
    true
}

/// A config file that cannot be used, naming the file, the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {object}: field {field}: {message}")]
    Invalid {
        path: PathBuf,
        object: String,
        field: &'static str,
        message: String,
    },
}

/// Parses and checks a mesh description.
pub fn parse(path: &Path, text: &str) -> Result<Snapshot, LocalConfigError> {
    let file: File = if text.trim().is_empty() {
        File {
            trust_domain: None,
            workloads: vec![],
            services: vec![],
        }
    } else {
        serde_yaml::from_str(text).map_err(|e| LocalConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    };
    let invalid =
        |object: String, field: &'static str, message: String| LocalConfigError::Invalid {
            path: path.to_owned(),
            object,
            field,
            message,
        };
    let td = file
        .trust_domain
        .clone()
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    SpiffeId::new(&td, "ns", "sa").map_err(|_| {
        invalid(
            "top level".into(),
            "trustDomain",
            format!(
                "{td:?} is not a valid trust domain (lower-case letters, digits, '-', '.', '_')"
            ),
        )
    })?;

    // Every service's hostname, so waypoints can name a service before it is checked.
    let hostnames: HashMap<(&str, &str), String> = file
        .services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), hostname_of(s)))
        .collect();
    let waypoint = |object: &str, ns: &str, spec: &Option<WaypointSpec>| {
        spec.as_ref()
            .map(|w| gateway(w, ns, &hostnames))
            .transpose()
            .map_err(|message| invalid(object.to_owned(), "waypoint", message))
    };

    let mut workloads = Vec::with_capacity(file.workloads.len());
    let mut seen_uid = HashSet::new();
    let mut seen_ip: HashMap<IpAddr, String> = HashMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        let object = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
        if w.name.is_empty() {
            return Err(invalid(object, "name", "must not be empty".into()));
        }
        if w.node.is_empty() {
            return Err(invalid(object, "node", "must not be empty".into()));
        }
        if w.addresses.is_empty() {
            return Err(invalid(
                object,
                "addresses",
                "needs at least one address".into(),
            ));
        }
        let identity = SpiffeId::new(&td, &w.namespace, &w.service_account)
            .map_err(|e| invalid(object.clone(), "serviceAccount", e.to_string()))?;
        let uid = w
            .uid
            .clone()
            .unwrap_or_else(|| format!("local//v1/Pod/{}/{}", w.namespace, w.name));
        if !seen_uid.insert(uid.clone()) {
            return Err(invalid(object, "name", format!("duplicate workload {uid}")));
        }
        for ip in &w.addresses {
            if let Some(other) = seen_ip.insert(*ip, object.clone()) {
                return Err(invalid(
                    object,
                    "addresses",
                    format!("{ip} is already used by {other}"),
                ));
            }
        }
        workloads.push(Workload {
            uid,
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            identity,
            node: w.node.clone(),
            addresses: w.addresses.clone(),
            protocol: w.protocol,
            canonical_name: w.canonical_name.clone().unwrap_or_else(|| {
                w.labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| w.name.clone())
            }),
            canonical_revision: w
                .canonical_revision
                .clone()
                .or_else(|| w.labels.get("version").cloned())
                .unwrap_or_else(|| "latest".into()),
            healthy: w.healthy,
            waypoint: waypoint(&object, &w.namespace, &w.waypoint)?,
            authorization_policies: Vec::new(),
            services: BTreeMap::new(),
        });
    }

    let mut services = Vec::with_capacity(file.services.len());
    let mut seen_vip: HashMap<IpAddr, String> = HashMap::new();
    let mut seen_host: HashMap<String, String> = HashMap::new();
    for (i, s) in file.services.iter().enumerate() {
        let object = format!("services[{i}] ({}/{})", s.namespace, s.name);
        if s.addresses.is_empty() {
            return Err(invalid(
                object,
                "addresses",
                "needs at least one address".into(),
            ));
        }
        for ip in &s.addresses {
            if let Some(other) = seen_vip.insert(*ip, object.clone()) {
                return Err(invalid(
                    object,
                    "addresses",
                    format!("{ip} is already used by {other}"),
                ));
            }
            if let Some(w) = seen_ip.get(ip) {
                return Err(invalid(
                    object,
                    "addresses",
                    format!("{ip} is already used by {w}"),
                ));
            }
        }
        if s.ports.is_empty() {
            return Err(invalid(object, "ports", "needs at least one port".into()));
        }
        let mut ports = Vec::with_capacity(s.ports.len());
        for p in &s.ports {
            let target_port = p.target_port.unwrap_or(p.port);
            if p.port == 0 || target_port == 0 {
                return Err(invalid(
                    object,
                    "ports",
                    "port 0 is not a valid port".into(),
                ));
            }
            ports.push(ServicePort {
                app_protocol: crate::state::AppProtocol::Unknown,
                port: p.port,
                target_port,
            });
        }
        let hostname = hostname_of(s);
        if !is_valid_hostname(&hostname) {
            return Err(invalid(
                object,
                "hostname",
                format!("{hostname:?} is not a valid DNS name"),
            ));
        }
        if let Some(other) = seen_host.insert(hostname.clone(), object.clone()) {
            return Err(invalid(
                object,
                "hostname",
                format!("{hostname} is already used by {other}"),
            ));
        }
        let endpoints = if s.selector.is_empty() {
            vec![]
        } else {
            file.workloads
                .iter()
                .zip(&workloads)
                .filter(|(spec, _)| {
                    spec.namespace == s.namespace
                        && s.selector
                            .iter()
                            .all(|(k, v)| spec.labels.get(k) == Some(v))
                })
                .map(|(_, w)| w.uid.clone())
                .collect()
        };
        services.push(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname,
            addresses: s.addresses.clone(),
            ports,
            endpoints,
            waypoint: waypoint(&object, &s.namespace, &s.waypoint)?,
        });
    }
    Ok(Snapshot::new(workloads, services))
}

fn hostname_of(s: &ServiceSpec) -> String {
    s.hostname
        .clone()
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace))
}

/// A waypoint reference made concrete; `ns` is the referring object's namespace.
fn gateway(
    w: &WaypointSpec,
    ns: &str,
    hostnames: &HashMap<(&str, &str), String>,
) -> Result<GatewayAddress, String> {
    let destination = match (&w.service, w.address) {
        (Some(name), None) => {
            let namespace = w.namespace.as_deref().unwrap_or(ns);
            let hostname = hostnames
                .get(&(namespace, name.as_str()))
                .ok_or_else(|| format!("there is no service {namespace}/{name} in this file"))?;
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: namespace.to_owned(),
                hostname: hostname.clone(),
            })
        }
        (None, Some(ip)) if w.namespace.is_none() => GatewayDestination::Address(ip),
        (None, Some(_)) => return Err("namespace goes with service, not address".into()),
        _ => return Err("needs exactly one of service and address".into()),
    };
    let hbone_port = match w.hbone_port {
        None => mesh_core::hbone::HBONE_PORT,
        Some(0) => return Err("hbonePort 0 is not a valid port".into()),
        Some(p) => p,
    };
    Ok(GatewayAddress {
        destination,
        hbone_port,
    })
}

fn is_valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Loads `path` into `store`; returns an error (and changes nothing) if it is unusable.
pub fn load(path: &Path, store: &Store) -> Result<(), LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    store.replace(parse(path, &text)?);
    Ok(())
}

/// Re-reads `path` whenever it changes. A broken file keeps the last good config in force and
/// logs exactly what is wrong; `on_change` runs after each successful reload. The file's
/// current state is taken as the baseline when this is called, so an edit made between the
/// initial load and the first poll is not missed.
pub fn watch(
    path: PathBuf,
    store: Store,
    poll: Duration,
    reload_errors: prometheus_client::metrics::counter::Counter,
    on_change: impl Fn() + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut last = stamp(&path);
    async move {
        loop {
            tokio::time::sleep(poll).await;
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            match load(&path, &store) {
                Ok(()) => {
                    info!(path = %path.display(), "mesh config reloaded");
                    on_change();
                }
                Err(e) => {
                    reload_errors.inc();
                    error!(error = %e, "mesh config rejected; keeping the last good config");
                }
            }
        }
    }
}

/// What identifies a version of the file: its mtime, length and contents (mtime alone can miss
/// two edits within its granularity).
fn stamp(p: &Path) -> Option<(SystemTime, u64, Vec<u8>)> {
    let meta = std::fs::metadata(p).ok()?;
    let contents = std::fs::read(p).ok()?;
    Some((meta.modified().ok()?, meta.len(), contents))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("mesh.yaml")
    }

    const GOOD: &str = r#"
workloads:
  - name: client
    node: a
    addresses: [198.18.0.1]
    labels: {app: client}
  - name: echo
    namespace: apps
    serviceAccount: echo-sa
    node: b
    addresses: [198.18.0.2]
    labels: {app: echo}
  - name: legacy
    node: b
    protocol: TCP
    addresses: [198.18.0.3]
services:
  - name: echo
    namespace: apps
    addresses: [198.18.200.1]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: echo}
"#;

    #[test]
    fn parses_a_mesh() {
        let s = parse(p(), GOOD).unwrap();
        let echo = s.workload_by_ip("198.18.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            echo.identity.to_string(),
            "spiffe://cluster.local/ns/apps/sa/echo-sa"
        );
        assert_eq!(echo.canonical_name, "echo");
        let legacy = s.workload_by_ip("198.18.0.3".parse().unwrap()).unwrap();
        assert_eq!(legacy.protocol, Protocol::Tcp);
        let svc = s.service_by_host("echo.apps.svc.cluster.local").unwrap();
        assert_eq!(svc.endpoints, vec!["local//v1/Pod/apps/echo".to_string()]);
        assert_eq!(s.local_workloads("b").count(), 2);
    }

    fn err(text: &str) -> String {
        parse(p(), text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let e = err(
            "workloads:\n  - name: x\n    node: a\n    addresses: [198.18.0.1]\n    colour: red\n",
        );
        assert!(e.starts_with("mesh.yaml:"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");

        let e = err("workloads:\n  - name: x\n    node: a\n    addresses: [not-an-ip]\n");
        assert!(e.contains("mesh.yaml") && e.contains("line 4"), "{e}");

        let e = err(
            "workloads:\n  - name: x\n    node: a\n    serviceAccount: 'a b'\n    addresses: [198.18.0.1]\n",
        );
        assert!(
            e.contains("workloads[0] (default/x): field serviceAccount"),
            "{e}"
        );

        let e = err(
            "workloads:\n  - {name: x, node: a, addresses: [198.18.0.1]}\n  - {name: y, node: a, addresses: [198.18.0.1]}\n",
        );
        assert!(
            e.contains("workloads[1] (default/y): field addresses: 198.18.0.1 is already used by workloads[0]"),
            "{e}"
        );

        let e = err("services:\n  - {name: s, addresses: [198.18.9.1], ports: [{port: 0}]}\n");
        assert!(e.contains("services[0] (default/s): field ports"), "{e}");

        let e = err("workloads:\n  - {name: x, addresses: [198.18.0.1]}\n");
        assert!(e.contains("missing field `node`"), "{e}");

        let e = err("trustDomain: 'Bad Domain'\n");
        assert!(e.contains("top level: field trustDomain"), "{e}");

        let e = err(
            "services:\n  - {name: s, hostname: \"a\\nb\", addresses: [198.18.9.1], ports: [{port: 80}]}\n",
        );
        assert!(e.contains("services[0] (default/s): field hostname"), "{e}");

        let e = err(
            "services:\n  - {name: s, addresses: [198.18.9.1], ports: [{port: 80}]}\n  - {name: t, hostname: s.default.svc.cluster.local, addresses: [198.18.9.2], ports: [{port: 80}]}\n",
        );
        assert!(e.contains("services[1] (default/t): field hostname: s.default.svc.cluster.local is already used by services[0]"), "{e}");
    }

    #[test]
    fn waypoints_name_a_service_of_the_file_or_an_address() {
        let yaml = r#"
workloads:
  - {name: waypoint, namespace: infra, serviceAccount: waypoint, node: a, protocol: TCP,
     addresses: [198.18.0.9], labels: {gateway: waypoint}}
  - {name: echo, node: b, addresses: [198.18.0.2], labels: {app: echo},
     waypoint: {service: waypoint, namespace: infra, hbonePort: 15099}}
  - {name: other, node: b, addresses: [198.18.0.3], waypoint: {address: 198.18.0.9}}
services:
  - {name: waypoint, namespace: infra, addresses: [198.18.201.1], ports: [{port: 15008}],
     selector: {gateway: waypoint}}
  - {name: echo, addresses: [198.18.200.1], ports: [{port: 80}], selector: {app: echo},
     waypoint: {service: waypoint, namespace: infra}}
"#;
        let s = parse(p(), yaml).unwrap();
        let by_host = |hbone_port| GatewayAddress {
            destination: GatewayDestination::Hostname(NamespacedHostname {
                namespace: "infra".into(),
                hostname: "waypoint.infra.svc.cluster.local".into(),
            }),
            hbone_port,
        };
        let svc = s.service_by_host("echo.default.svc.cluster.local").unwrap();
        assert_eq!(svc.waypoint, Some(by_host(15008)));
        let echo = s.workload_by_ip("198.18.0.2".parse().unwrap()).unwrap();
        assert_eq!(echo.waypoint, Some(by_host(15099)));
        let other = s.workload_by_ip("198.18.0.3".parse().unwrap()).unwrap();
        assert_eq!(
            other.waypoint.as_ref().map(|g| &g.destination),
            Some(&GatewayDestination::Address("198.18.0.9".parse().unwrap()))
        );

        let e = err(
            "services:\n  - {name: s, addresses: [198.18.9.1], ports: [{port: 80}], waypoint: {service: wp}}\n",
        );
        assert!(
            e.contains("services[0] (default/s): field waypoint: there is no service default/wp in this file"),
            "{e}"
        );
        let e = err("workloads:\n  - {name: x, node: a, addresses: [198.18.0.1], waypoint: {}}\n");
        assert!(
            e.contains(
                "workloads[0] (default/x): field waypoint: needs exactly one of service and address"
            ),
            "{e}"
        );
        let e = err(
            "workloads:\n  - {name: x, node: a, addresses: [198.18.0.1], waypoint: {address: 198.18.0.9, hbonePort: 0}}\n",
        );
        assert!(e.contains("hbonePort 0 is not a valid port"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse(p(), "").unwrap().workloads().count(), 0);
    }

    #[tokio::test]
    async fn a_broken_edit_keeps_the_last_good_config() {
        let dir = std::env::temp_dir().join(format!("ztunnel-local-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let store = Store::default();
        load(&path, &store).unwrap();
        let errors = prometheus_client::metrics::counter::Counter::default();
        let changes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = changes.clone();
        let task = tokio::spawn(watch(
            path.clone(),
            store.clone(),
            Duration::from_millis(20),
            errors.clone(),
            move || {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        ));
        std::fs::write(&path, "workloads: [{name: x}]").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(errors.get(), 1);
        assert_eq!(
            store.snapshot().workloads().count(),
            3,
            "last good config kept"
        );
        std::fs::write(&path, GOOD.replace("198.18.0.3", "198.18.0.4")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            store
                .snapshot()
                .workload_by_ip("198.18.0.4".parse().unwrap())
                .is_some()
        );
        assert_eq!(changes.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! What the waypoint subscribes to (workloads and services, routes, L7 policies) and the
//! immutable [`Config`] built from it after each change.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use mesh_proto::{ADDRESS_TYPE_URL, ROUTE_TYPE_URL, WAYPOINT_POLICY_TYPE_URL, waypoint as pb};
use prost::Message;
use serde_json::{Value, json};
use ztunnel::state::{GatewayDestination, Service, Snapshot, Workload};
use ztunnel::xds::resources::{Typed, body};
use ztunnel::xds::{Applied, ResourceSet, Resources};

use crate::authz::Policy;
use crate::routes::{Route, RouteTable};

/// The types the waypoint asks for.
pub const TYPE_URLS: [&str; 3] = [ADDRESS_TYPE_URL, ROUTE_TYPE_URL, WAYPOINT_POLICY_TYPE_URL];

/// Everything received so far.
#[derive(Debug, Default)]
pub struct WaypointResources {
    addresses: Resources,
    routes: Typed<Arc<Route>>,
    policies: Typed<Arc<Policy>>,
}

fn decode_route(r: &Resource, type_url: &str) -> Result<(String, Arc<Route>), String> {
    let msg = pb::Route::decode(body(r, type_url)?)
        .map_err(|e| format!("not a valid ambient.waypoint.Route: {e}"))?;
    let route = Route::compile(&msg).map_err(|e| e.to_string())?;
    let name = format!("{}/{}/{}", msg.namespace, route.name.kind, msg.name);
    Ok((name, Arc::new(route)))
}

fn decode_policy(r: &Resource, type_url: &str) -> Result<(String, Arc<Policy>), String> {
    let msg = pb::Policy::decode(body(r, type_url)?)
        .map_err(|e| format!("not a valid ambient.waypoint.Policy: {e}"))?;
    let p = Policy::compile(&msg).map_err(|e| e.to_string())?;
    Ok((p.key(), Arc::new(p)))
}

impl ResourceSet for WaypointResources {
    const TYPE_URLS: &'static [&'static str] = &TYPE_URLS;

    fn initial_request(&self, type_url: &str, node: &Node) -> DeltaDiscoveryRequest {
        let initial_resource_versions = match type_url {
            ROUTE_TYPE_URL => self.routes.versions(),
            WAYPOINT_POLICY_TYPE_URL => self.policies.versions(),
            _ => self.addresses.versions(type_url),
        };
        DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions,
            ..Default::default()
        }
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Applied {
        match resp.type_url.as_str() {
            ADDRESS_TYPE_URL => self.addresses.apply(resp),
            ROUTE_TYPE_URL => {
                let (changed, rejected) = self.routes.apply(resp, decode_route);
                Applied::answering(resp, changed, rejected)
            }
            WAYPOINT_POLICY_TYPE_URL => {
                let (changed, rejected) = self.policies.apply(resp, decode_policy);
                Applied::answering(resp, changed, rejected)
            }
            _ => Applied::unsubscribed(resp, &TYPE_URLS),
        }
    }

    fn len(&self, type_url: &str) -> usize {
        match type_url {
            ROUTE_TYPE_URL => self.routes.len(),
            WAYPOINT_POLICY_TYPE_URL => self.policies.len(),
            _ => self.addresses.len(type_url),
        }
    }
}

/// Who this waypoint is, as config refers to it.
#[derive(Debug, Clone)]
pub struct Me {
    pub namespace: String,
    pub name: String,
}

impl Me {
    /// Whether a service's or workload's waypoint is this one.
    fn is(&self, g: &ztunnel::state::GatewayAddress, my_ips: &[IpAddr]) -> bool {
        match &g.destination {
            GatewayDestination::Hostname(h) => {
                h.namespace == self.namespace
                    && h.hostname
                        .strip_prefix(&format!("{}.{}.svc.", self.name, self.namespace))
                        .is_some()
            }
            GatewayDestination::Address(ip) => my_ips.contains(ip),
        }
    }
}

/// What a request arriving for an address is for.
#[derive(Debug, Clone)]
pub enum Target {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

/// The config in force: immutable, replaced whole.
#[derive(Debug, Default)]
pub struct Config {
    pub mesh: Arc<Snapshot>,
    /// Services bound to this waypoint, by VIP.
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Workloads bound to this waypoint (workload waypoints), by address.
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub routes: RouteTable,
    route_list: Vec<Arc<Route>>,
    /// Policies by target: a service hostname, or this waypoint's `gateway:` target.
    policies: HashMap<String, Vec<Arc<Policy>>>,
    gateway_target: String,
    /// The policies for each target, with the waypoint-wide ones first: looked up per request.
    effective: HashMap<String, Arc<[Arc<Policy>]>>,
    gateway_only: Arc<[Arc<Policy>]>,
}

impl Config {
    pub fn build(res: &WaypointResources, me: &Me) -> Self {
        let mesh = Arc::new(res.addresses.snapshot());
        // The waypoint's own addresses (for waypoints named by address).
        let my_ips: Vec<IpAddr> = mesh
            .services()
            .filter(|s| s.namespace == me.namespace && s.name == me.name)
            .flat_map(|s| s.addresses.iter().copied())
            .collect();
        let mut services_by_vip = HashMap::new();
        for s in mesh.services() {
            if s.waypoint.as_ref().is_some_and(|g| me.is(g, &my_ips)) {
                for ip in &s.addresses {
                    services_by_vip.insert(*ip, Arc::clone(s));
                }
            }
        }
        let mut workloads_by_ip = HashMap::new();
        for w in mesh.workloads() {
            if w.waypoint.as_ref().is_some_and(|g| me.is(g, &my_ips)) {
                for ip in &w.addresses {
                    workloads_by_ip.insert(*ip, Arc::clone(w));
                }
            }
        }
        let route_list: Vec<Arc<Route>> = res.routes.values().cloned().collect();
        let namespace_of = |host: &str| mesh.service_by_host(host).map(|s| s.namespace.clone());
        let routes = RouteTable::build(route_list.iter(), namespace_of);
        let gateway_target = format!("gateway:{}/{}", me.namespace, me.name);
        let mut policies: HashMap<String, Vec<Arc<Policy>>> = HashMap::new();
        for p in res.policies.values() {
            for t in &p.targets {
                policies.entry(t.clone()).or_default().push(Arc::clone(p));
            }
        }
        let gateway_only: Arc<[Arc<Policy>]> = policies
            .get(&gateway_target)
            .cloned()
            .unwrap_or_default()
            .into();
        let effective = policies
            .iter()
            .filter(|(t, _)| **t != gateway_target)
            .map(|(t, v)| {
                let all: Vec<Arc<Policy>> = gateway_only.iter().chain(v).cloned().collect();
                (t.clone(), all.into())
            })
            .collect();
        Self {
            mesh,
            services_by_vip,
            workloads_by_ip,
            routes,
            route_list,
            policies,
            gateway_target,
            effective,
            gateway_only,
        }
    }

    /// What a CONNECT to `ip` is for, if this waypoint serves it.
    pub fn target(&self, ip: IpAddr) -> Option<Target> {
        if let Some(s) = self.services_by_vip.get(&ip) {
            return Some(Target::Service(Arc::clone(s)));
        }
        self.workloads_by_ip
            .get(&ip)
            .map(|w| Target::Workload(Arc::clone(w)))
    }

    /// The policies that apply to requests for the service `hostname` (or to a workload, with
    /// `None`): the waypoint-wide ones and the service's own.
    pub fn policies_for(&self, hostname: Option<&str>) -> Arc<[Arc<Policy>]> {
        match hostname.and_then(|h| self.effective.get(h)) {
            Some(p) => Arc::clone(p),
            None => Arc::clone(&self.gateway_only),
        }
    }

    /// For `/config_dump`.
    pub fn dump(&self) -> Value {
        let mut services: Vec<&Arc<Service>> = self.services_by_vip.values().collect();
        services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        services.dedup_by(|a, b| a.hostname == b.hostname);
        let mut workloads: Vec<&Arc<Workload>> = self.workloads_by_ip.values().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        workloads.dedup_by(|a, b| a.uid == b.uid);
        let mut routes: Vec<Value> = self
            .route_list
            .iter()
            .map(|r| {
                json!({
                    "name": r.name.to_string(),
                    "parents": r.parents.iter().map(|(h, p)| if *p == 0 { h.clone() } else { format!("{h}:{p}") }).collect::<Vec<_>>(),
                    "rules": r.rules.len(),
                })
            })
            .collect();
        routes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut policies: Vec<Value> = self
            .policies
            .values()
            .flatten()
            .map(|p| {
                json!({
                    "name": p.key(),
                    "action": if p.deny { "DENY" } else { "ALLOW" },
                    "dryRun": p.dry_run,
                    "targets": p.targets,
                })
            })
            .collect();
        policies.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        policies.dedup();
        json!({
            "gateway": self.gateway_target,
            "services": services.iter().map(|s| &s.hostname).collect::<Vec<_>>(),
            "workloads": workloads.iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect::<Vec<_>>(),
            "routes": routes,
            "policies": policies,
        })
    }
}

/// The config in force, swapped whole; readers take an `Arc` once per request.
#[derive(Clone, Default)]
pub struct ConfigStore {
    inner: Arc<RwLock<Arc<Config>>>,
}

impl ConfigStore {
    pub fn get(&self) -> Arc<Config> {
        Arc::clone(&self.inner.read().expect("config lock poisoned"))
    }

    pub fn replace(&self, c: Config) {
        *self.inner.write().expect("config lock poisoned") = Arc::new(c);
    }
}

//! The testbed: nodes and pods of a YAML directory as Linux network namespaces.
//!
//! ```text
//!   amb-fabric: bridge br0, 198.19.0.254 (istiod-lite), a /32 route per pod via its node
//!      │ veth per node
//!   amb-n-<node>: eth0 198.19.0.<i>, forwarding, a /32 route per pod (local: its veth;
//!      │ veth per pod                              remote: via that pod's node)
//!   amb-p-<ns>.<pod>: eth0 <podIP>/32, default via 169.254.1.1
//! ```
//! Pod-to-pod traffic between nodes crosses the node's `eth0` and the bridge: the link a
//! capture looks at. Only 198.18.0.0/15 is used (pods 198.18.0.0/16, nodes 198.19.0.0/24).
//! A waypoint Gateway adds a pod like any other, which runs the waypoint (see [`waypoints`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
use istiod_lite::model::{Kind, Object};
use istiod_lite::store::State;
use serde::{Deserialize, Serialize};

use crate::netns;
use crate::waypoints::{self, WaypointPlan};

pub const FABRIC: &str = "amb-fabric";
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
/// The address every pod's default route points at: each pod's veth on its node answers it.
const GATEWAY: &str = "169.254.1.1";
pub(crate) const CLUSTER_ID: &str = "Kubernetes";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlan {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: IpAddr,
    /// The YAML gave no address; the testbed chose `ip` (and tells istiod-lite, as a kubelet
    /// would).
    #[serde(default)]
    pub allocated: bool,
    pub netns: String,
    /// The pod's veth as its node sees it.
    pub veth: String,
    pub app: AppPlan,
    /// The pod runs the waypoint of this Gateway (in its namespace) instead of an app; it
    /// is never captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

/// What runs in the pod: the echo server on the ports its containers declare (a port named
/// `grpc…` serves gRPC, `tcp…` raw TCP, anything else HTTP/1.1 and h2c).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPlan {
    pub http: Vec<u16>,
    pub grpc: Vec<u16>,
    pub tcp: Vec<u16>,
}

impl AppPlan {
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.grpc.is_empty() && self.tcp.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub nodes: Vec<NodePlan>,
    /// The YAML's pods and the waypoints' pods.
    pub pods: Vec<PodPlan>,
    /// Service hostnames by VIP, for each pod's /etc/hosts.
    pub hosts: Vec<(IpAddr, String)>,
    #[serde(default)]
    pub waypoints: Vec<WaypointPlan>,
}

fn testbed_range(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(_) => false,
    }
}

impl Plan {
    /// The testbed for the pods in `state`, and a pod for each waypoint Gateway (see
    /// [`waypoints`]). Every pod needs `spec.nodeName`; its `status.podIP`, if given, must be
    /// in 198.18.0.0/16, else one is allocated. Problems are all reported at once.
    pub fn from_state(state: &State) -> anyhow::Result<Self> {
        let mut problems = Vec::new();
        let mut nodes: BTreeMap<String, ()> = BTreeMap::new();
        let mut pods = Vec::new();
        let mut seen_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
        let declared = waypoints::declared(state, &mut problems);
        for node in declared.iter().filter_map(|d| d.node.clone()) {
            nodes.insert(node, ());
        }
        for obj in state.of_kind(Kind::Pod) {
            let Object::Pod(pod) = obj.as_ref() else {
                continue;
            };
            let (ns, name) = (&pod.metadata.namespace, &pod.metadata.name);
            let who = format!("Pod {ns}/{name}");
            if pod.spec.host_network {
                continue;
            }
            if pod.spec.node_name.is_empty() {
                problems.push(format!(
                    "{who}: no spec.nodeName; say which node it runs on"
                ));
                continue;
            }
            // A pod without an address gets one below, once every given one is known.
            let ip = pod.ips().first().copied();
            if let Some(ip) = ip {
                if !testbed_range(ip) || matches!(ip, IpAddr::V4(v) if v.octets()[1] == 19) {
                    problems.push(format!(
                        "{who}: status.podIP {ip} is outside 198.18.0.0/16, the pod range of the local testbed"
                    ));
                    continue;
                }
                if let Some(other) = seen_ips.insert(ip, who.clone()) {
                    problems.push(format!("{who}: status.podIP {ip} is also {other}'s"));
                    continue;
                }
            }
            nodes.insert(pod.spec.node_name.clone(), ());
            let mut app = AppPlan::default();
            for c in &pod.spec.containers {
                for p in &c.ports {
                    if p.protocol.as_deref().is_some_and(|p| p != "TCP") {
                        continue;
                    }
                    let list = if p.name.starts_with("grpc") {
                        &mut app.grpc
                    } else if p.name.starts_with("tcp") {
                        &mut app.tcp
                    } else {
                        &mut app.http
                    };
                    list.push(p.container_port);
                }
            }
            pods.push(PodPlan {
                uid: format!("{CLUSTER_ID}//Pod/{ns}/{name}"),
                namespace: ns.clone(),
                name: name.clone(),
                node: pod.spec.node_name.clone(),
                ip: ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                allocated: ip.is_none(),
                netns: format!("amb-p-{ns}.{name}"),
                veth: String::new(),
                app,
                waypoint: None,
            });
        }
        if nodes.len() > 250 {
            bail!("{} nodes; the testbed supports at most 250", nodes.len());
        }
        let nodes: Vec<NodePlan> = nodes
            .into_keys()
            .enumerate()
            .map(|(i, name)| NodePlan {
                netns: format!("amb-n-{name}"),
                ip: Ipv4Addr::new(198, 19, 0, i as u8 + 1),
                name,
            })
            .collect();
        let taken: BTreeSet<(String, String)> = state
            .of_kind(Kind::Pod)
            .map(|o| (o.metadata().namespace.clone(), o.metadata().name.clone()))
            .collect();
        let waypoint_pods = waypoints::pods(&declared, &nodes, &taken, &mut problems);
        if !problems.is_empty() {
            bail!(
                "the YAML cannot be laid out as a testbed:\n  {}",
                problems.join("\n  ")
            );
        }
        pods.extend(waypoint_pods);
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for (i, p) in pods.iter_mut().enumerate() {
            p.veth = format!("ap{i}");
        }
        // Addresses for pods that gave none: 198.18.<node>.100 upwards, skipping taken ones;
        // the YAML's pods first, so a waypoint added later moves none of them.
        let order: Vec<usize> = (0..pods.len())
            .filter(|&i| pods[i].allocated && pods[i].waypoint.is_none())
            .chain((0..pods.len()).filter(|&i| pods[i].waypoint.is_some()))
            .collect();
        for i in order {
            let pod = &mut pods[i];
            let n = nodes.iter().position(|n| n.name == pod.node).unwrap_or(0) as u8 + 1;
            let free = (100..=250u8)
                .map(|h| IpAddr::V4(Ipv4Addr::new(198, 18, n, h)))
                .find(|ip| !seen_ips.contains_key(ip));
            let Some(ip) = free else {
                bail!(
                    "node {}: no free pod address left in 198.18.{n}.100-250",
                    pod.node
                );
            };
            seen_ips.insert(ip, pod.name.clone());
            pod.ip = ip;
        }
        let mut hosts = Vec::new();
        let mut taken_ips: BTreeSet<IpAddr> = seen_ips.into_keys().collect();
        for obj in state.of_kind(Kind::Service) {
            let Object::Service(svc) = obj.as_ref() else {
                continue;
            };
            let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
            for vip in svc.cluster_ips() {
                taken_ips.insert(vip);
                hosts.push((vip, host_names(ns, name)));
            }
        }
        let waypoints = waypoints::plans(&declared, &pods, &mut taken_ips)?;
        for w in &waypoints {
            hosts.push((w.service_ip, host_names(&w.namespace, &w.name)));
        }
        hosts.sort();
        Ok(Self {
            nodes,
            pods,
            hosts,
            waypoints,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod that runs waypoint `w`.
    pub fn waypoint_pod(&self, w: &WaypointPlan) -> Option<&PodPlan> {
        self.pods
            .iter()
            .find(|p| p.namespace == w.namespace && p.name == w.pod)
    }

    /// A pod by `namespace/name`, or by `name` alone when only one pod has it.
    pub fn find_pod(&self, query: &str) -> anyhow::Result<&PodPlan> {
        let matches: Vec<&PodPlan> = match query.split_once('/') {
            Some((ns, name)) => self
                .pods
                .iter()
                .filter(|p| p.namespace == ns && p.name == name)
                .collect(),
            None => self.pods.iter().filter(|p| p.name == query).collect(),
        };
        match matches.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no pod {query:?}; pods: {}",
                self.pods
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => bail!("{query:?} names pods in several namespaces; say NAMESPACE/NAME"),
        }
    }

    /// Every namespace this plan creates, fabric first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out = vec![FABRIC.to_owned()];
        out.extend(self.nodes.iter().map(|n| n.netns.clone()));
        out.extend(self.pods.iter().map(|p| p.netns.clone()));
        out
    }
}

/// Builds the testbed; on failure what was made is left for [`destroy`].
pub fn create(plan: &Plan) -> anyhow::Result<()> {
    netns::create(FABRIC)?;
    netns::ip(FABRIC, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip(
        FABRIC,
        &[
            "addr",
            "add",
            &format!("{CONTROL_PLANE_IP}/24"),
            "dev",
            "br0",
        ],
    )?;
    netns::ip(FABRIC, &["link", "set", "br0", "up"])?;
    for (i, node) in plan.nodes.iter().enumerate() {
        let ns = &node.netns;
        netns::create(ns)?;
        let uplink = format!("an{i}");
        netns::run(
            "ip",
            &[
                "link", "add", &uplink, "netns", FABRIC, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ],
        )?;
        netns::ip(FABRIC, &["link", "set", &uplink, "master", "br0", "up"])?;
        netns::ip(
            ns,
            &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
        )?;
        netns::ip(ns, &["link", "set", "eth0", "up"])?;
        netns::sysctl(ns, "net.ipv4.ip_forward", "1")?;
        netns::sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")?;
    }
    for pod in &plan.pods {
        let node = plan
            .node(&pod.node)
            .with_context(|| format!("pod {} has no node", pod.name))?;
        netns::create(&pod.netns)?;
        netns::run(
            "ip",
            &[
                "link",
                "add",
                &pod.veth,
                "netns",
                &node.netns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.netns,
            ],
        )?;
        let ip = pod.ip.to_string();
        netns::ip(
            &pod.netns,
            &["addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        )?;
        netns::ip(&pod.netns, &["link", "set", "eth0", "up"])?;
        netns::ip(
            &pod.netns,
            &["route", "add", GATEWAY, "dev", "eth0", "scope", "link"],
        )?;
        netns::ip(
            &pod.netns,
            &["route", "add", "default", "via", GATEWAY, "dev", "eth0"],
        )?;
        netns::ip(
            &node.netns,
            &["addr", "add", &format!("{GATEWAY}/32"), "dev", &pod.veth],
        )?;
        netns::ip(&node.netns, &["link", "set", &pod.veth, "up"])?;
        netns::ip(
            &node.netns,
            &["route", "add", &format!("{ip}/32"), "dev", &pod.veth],
        )?;
        // The control plane answers pods that talk to it (a waypoint does) through their node.
        netns::ip(
            FABRIC,
            &[
                "route",
                "add",
                &format!("{ip}/32"),
                "via",
                &node.ip.to_string(),
            ],
        )?;
        for other in plan.nodes.iter().filter(|n| n.name != pod.node) {
            netns::ip(
                &other.netns,
                &[
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "via",
                    &node.ip.to_string(),
                ],
            )?;
        }
        write_hosts(plan, pod)?;
    }
    Ok(())
}

/// The names a Service's address answers to in /etc/hosts.
fn host_names(ns: &str, name: &str) -> String {
    format!("{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}")
}

/// `/etc/netns/<ns>/hosts`: `ip netns exec` shows it as the pod's /etc/hosts, so service
/// names resolve inside pods.
fn write_hosts(plan: &Plan, pod: &PodPlan) -> anyhow::Result<()> {
    let dir = format!("/etc/netns/{}", pod.netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
    let mut hosts = format!("127.0.0.1 localhost\n{} {}\n", pod.ip, pod.name);
    for (ip, names) in &plan.hosts {
        hosts.push_str(&format!("{ip} {names}\n"));
    }
    std::fs::write(format!("{dir}/hosts"), hosts).with_context(|| format!("writing {dir}/hosts"))
}

/// Removes every namespace (and its /etc/netns entry) the testbed may have made, whatever
/// state a crash left. Returns how many were removed.
pub fn destroy() -> anyhow::Result<usize> {
    let names = netns::list_ours();
    let mut errors = Vec::new();
    for name in &names {
        if let Err(e) = netns::delete(name) {
            errors.push(format!("{name}: {e:#}"));
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
    }
    if !errors.is_empty() {
        bail!("could not remove: {}", errors.join("; "));
    }
    Ok(names.len())
}

/// In-pod redirection: outbound TCP to ztunnel's 15001, inbound TCP to 15006 unless it is
/// HBONE for 15008; ztunnel's own (marked) sockets and traffic within the pod are left alone.
pub fn capture_rules(mark: u32) -> String {
    format!(
        "table inet ambient {{}}
delete table inet ambient
table inet ambient {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" return
    meta mark {mark:#x} return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark:#x} return
    oifname \"lo\" return
    meta l4proto tcp redirect to :15001
  }}
}}
"
    )
}

/// Removes the redirection rules (nothing to do when there are none).
pub const RELEASE_RULES: &str = "table inet ambient {}\ndelete table inet ambient\n";

impl Plan {
    /// Addresses the testbed chose, by (namespace, name), for the copy istiod-lite reads.
    pub fn allocated(&self) -> std::collections::BTreeMap<(String, String), IpAddr> {
        self.pods
            .iter()
            .filter(|p| p.allocated && p.waypoint.is_none())
            .map(|p| ((p.namespace.clone(), p.name.clone()), p.ip))
            .collect()
    }
}

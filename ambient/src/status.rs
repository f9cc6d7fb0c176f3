//! `ambient status`: what the mesh looks like now, gathered from the state file, istiod-lite's
//! debug endpoints and every ztunnel's and waypoint's `/config_dump`, then rendered by a pure
//! function so the output is checked against golden files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::netns;
use crate::up::{
    ISTIOD_DEBUG, MeshState, WAYPOINT_ADMIN, ZTUNNEL_ADMIN, ZTUNNEL_READY, probe_ready,
    waypoint_ready_addr,
};
use crate::zconfig::table;

/// Everything `status` shows, as fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inputs {
    pub state: MeshState,
    /// Namespaces with pods, and whether each is enrolled by its label.
    pub namespaces: BTreeMap<String, bool>,
    /// istiod-lite's `/debug/connections`, or why it could not be read.
    pub istiod: Result<Value, String>,
    /// Per node: readiness (`Ok` or the reason) and `/config_dump`.
    pub ztunnels: BTreeMap<String, ProxyView>,
    /// Per waypoint (`namespace/name`): the same.
    #[serde(default)]
    pub waypoints: BTreeMap<String, ProxyView>,
    /// istiod-lite's `/debug/status` (Gateway conditions), asked only when there are
    /// waypoints.
    #[serde(default)]
    pub gateway_status: Option<Result<Value, String>>,
    /// Seconds since the Unix epoch, for certificate validity.
    pub now: u64,
}

/// What a proxy (a ztunnel or a waypoint) says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub ready: Result<(), String>,
    pub dump: Result<Value, String>,
}

/// Gathers the inputs from the running mesh.
pub fn gather() -> anyhow::Result<Inputs> {
    let state = MeshState::load()?;
    let namespaces = namespace_labels(&state)?;
    let istiod =
        get_json(crate::testbed::FABRIC, ISTIOD_DEBUG, "/debug/connections").map_err(|e| match e {
            Fetch::NotAnswering(e) => format!("{e:#}"),
            other => other.to_string(),
        });
    let mut ztunnels = BTreeMap::new();
    for node in &state.plan.nodes {
        let ready = match netns::http_get(&node.netns, ZTUNNEL_READY, "/healthz/ready") {
            Ok((200, _)) => Ok(()),
            Ok((_, body)) => Err(body.trim().to_owned()),
            Err(e) => Err(format!("not answering ({})", root_cause(&e))),
        };
        let dump = netns::http_get(&node.netns, ZTUNNEL_ADMIN, "/config_dump")
            .map_err(|e| format!("not answering ({})", root_cause(&e)))
            .and_then(|(code, body)| match code {
                200 => serde_json::from_str(&body).map_err(|e| format!("bad JSON: {e}")),
                c => Err(format!("HTTP {c}")),
            });
        ztunnels.insert(node.name.clone(), ProxyView { ready, dump });
    }
    let mut waypoints = BTreeMap::new();
    for w in &state.plan.waypoints {
        let Some(pod) = state.plan.waypoint_pod(w) else {
            continue;
        };
        let ready = probe_ready(&pod.netns, &waypoint_ready_addr(pod));
        let dump = get_json(&pod.netns, WAYPOINT_ADMIN, "/config_dump").map_err(|e| e.to_string());
        waypoints.insert(w.key(), ProxyView { ready, dump });
    }
    let gateway_status = (!waypoints.is_empty()).then(|| {
        get_json(crate::testbed::FABRIC, ISTIOD_DEBUG, "/debug/status").map_err(|e| e.to_string())
    });
    Ok(Inputs {
        state,
        namespaces,
        istiod,
        ztunnels,
        waypoints,
        gateway_status,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

fn root_cause(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}

/// Why a JSON endpoint gave nothing to show.
#[derive(Debug, thiserror::Error)]
enum Fetch {
    #[error("not answering ({})", root_cause(.0))]
    NotAnswering(anyhow::Error),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("bad JSON: {0}")]
    BadJson(serde_json::Error),
}

/// `GET path` at `addr` inside `netns`, as JSON.
fn get_json(netns: &str, addr: &str, path: &str) -> Result<Value, Fetch> {
    match netns::http_get(netns, addr, path) {
        Ok((200, body)) => serde_json::from_str(&body).map_err(Fetch::BadJson),
        Ok((code, _)) => Err(Fetch::Status(code)),
        Err(e) => Err(Fetch::NotAnswering(e)),
    }
}

/// Enrolment of each namespace with pods, read from the YAML as it is now.
fn namespace_labels(state: &MeshState) -> anyhow::Result<BTreeMap<String, bool>> {
    use istiod_lite::model::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, Kind, Object};
    let store = istiod_lite::store::Store::new();
    istiod_lite::source::dir::DirSource::new(&state.config_dir).load(&store)?;
    let st = store.state();
    let mut out: BTreeMap<String, bool> = state
        .plan
        .pods
        .iter()
        .map(|p| (p.namespace.clone(), false))
        .collect();
    for obj in st.of_kind(Kind::Namespace) {
        if let Object::Namespace(ns) = obj.as_ref()
            && let Some(v) = out.get_mut(&ns.metadata.name)
        {
            *v = ns
                .metadata
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .map(String::as_str)
                == Some(DATAPLANE_MODE_AMBIENT);
        }
    }
    Ok(out)
}

/// The status report.
pub fn render(inp: &Inputs) -> String {
    let mut out = String::new();
    let mut problems: Vec<String> = Vec::new();
    let st = &inp.state;
    out.push_str(&format!(
        "Mesh from {} ({} nodes, {} pods){}\n",
        st.config_dir.display(),
        st.plan.nodes.len(),
        st.plan.pods.len(),
        if st.ready { "" } else { ", still starting" }
    ));

    // Control plane.
    let all_proxies: Vec<Value> = match &inp.istiod {
        Ok(v) => v["proxies"].as_array().cloned().unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let proxies: BTreeMap<String, Value> = match &inp.istiod {
        Ok(v) => {
            let list = v["proxies"].as_array().cloned().unwrap_or_default();
            out.push_str(&format!(
                "istiod-lite: serving, config version {}, {} proxies connected\n\n",
                v["version"],
                list.len()
            ));
            // Waypoints report their node too; this map is the ztunnels'.
            list.into_iter()
                .filter(|p| proxy_kind(p) == Some("ztunnel"))
                .map(|p| (p["nodeName"].as_str().unwrap_or_default().to_owned(), p))
                .collect()
        }
        Err(e) => {
            out.push_str(&format!("istiod-lite: NOT ANSWERING ({e})\n\n"));
            problems.push(format!(
                "istiod-lite is not answering: {e}. Proxies keep their last config; check the istiod-lite log."
            ));
            BTreeMap::new()
        }
    };

    // Namespaces.
    let rows = inp
        .namespaces
        .iter()
        .map(|(ns, enrolled)| {
            let pods = st.plan.pods.iter().filter(|p| &p.namespace == ns).count();
            vec![
                ns.clone(),
                if *enrolled { "ambient" } else { "-" }.to_owned(),
                pods.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["NAMESPACE", "DATAPLANE", "PODS"], rows));
    out.push('\n');

    // Pods: what the control plane says (protocol, waypoint) and what the agent did.
    let workloads: BTreeMap<String, Value> = inp
        .ztunnels
        .values()
        .filter_map(|z| z.dump.as_ref().ok())
        .flat_map(|d| d["workloads"].as_array().cloned().unwrap_or_default())
        .map(|w| (w["uid"].as_str().unwrap_or_default().to_owned(), w))
        .collect();
    let mut rows = Vec::new();
    for pod in &st.plan.pods {
        let w = workloads.get(&pod.uid);
        let protocol = w
            .and_then(|w| w["protocol"].as_str())
            .unwrap_or("UNKNOWN")
            .to_owned();
        let waypoint = w
            .and_then(|w| w.get("waypoint"))
            .filter(|v| !v.is_null())
            .map(waypoint_name)
            .unwrap_or_else(|| "None".into());
        let agent = st.agents.get(&pod.node);
        let captured = match agent {
            Some(a) if a.captured.contains(&pod.uid) => "yes".to_owned(),
            Some(a) if a.failed.contains_key(&pod.uid) => {
                problems.push(format!(
                    "pod {}/{} is enrolled but not captured: {}. Its traffic bypasses the mesh; see the ztunnel-{} log.",
                    pod.namespace, pod.name, a.failed[&pod.uid], pod.node
                ));
                "FAILED".to_owned()
            }
            Some(a) if a.pending.contains(&pod.uid) => {
                problems.push(format!(
                    "pod {}/{} is waiting for the ztunnel on {} to take it.",
                    pod.namespace, pod.name, pod.node
                ));
                "waiting".to_owned()
            }
            _ => "no".to_owned(),
        };
        if w.is_none() && !workloads.is_empty() {
            problems.push(format!(
                "pod {}/{} is not in the config ztunnels hold; istiod-lite rejected or has not seen it (see its log and /debug/errors on 198.19.0.254:15014).",
                pod.namespace, pod.name
            ));
        }
        rows.push(vec![
            pod.namespace.clone(),
            pod.name.clone(),
            pod.node.clone(),
            pod.ip.to_string(),
            protocol,
            captured,
            waypoint,
        ]);
    }
    out.push_str(&table(
        &[
            "NAMESPACE",
            "POD",
            "NODE",
            "ADDRESS",
            "PROTOCOL",
            "CAPTURED",
            "WAYPOINT",
        ],
        rows,
    ));
    out.push('\n');

    // ztunnels.
    let mut rows = Vec::new();
    for (node, z) in &inp.ztunnels {
        let ready = match &z.ready {
            Ok(()) => "yes".to_owned(),
            Err(e) => {
                problems.push(format!(
                    "ztunnel on {node} is not ready: {e}. New connections of its pods fail until it is; see logs/ztunnel-{node}.log."
                ));
                "NO".to_owned()
            }
        };
        let (xds, sync, certs) = match &z.dump {
            Ok(d) => {
                let connected = d["xds"]["connected"].as_bool().unwrap_or(false);
                if !connected {
                    problems.push(format!(
                        "ztunnel on {node} is not connected to istiod-lite ({}); it serves its last config.",
                        d["xds"]["lastError"].as_str().unwrap_or("no reason given")
                    ));
                }
                let sync = match proxies.get(node) {
                    Some(p) => sync_state(p),
                    None => "unknown".into(),
                };
                if sync.starts_with("NACK") {
                    problems.push(format!(
                        "ztunnel on {node} rejected config: {sync}. Fix the named resource; the last good config stays in force."
                    ));
                }
                let (valid, total) = cert_counts(d, inp.now);
                if valid < total {
                    problems.push(format!(
                        "ztunnel on {node}: {} of {total} certificates are not valid; check the CA (istiod-lite log).",
                        total - valid
                    ));
                }
                (
                    if connected {
                        "connected"
                    } else {
                        "DISCONNECTED"
                    }
                    .to_owned(),
                    sync,
                    format!("{valid}/{total} valid"),
                )
            }
            Err(e) => ("?".into(), "?".into(), format!("? ({e})")),
        };
        let agent = st.agents.get(node);
        if agent.is_some_and(|a| a.stopped) {
            problems.push(format!(
                "the node agent on {node} stopped after an internal error: enrolment changes are not applied; `ambient down` and `ambient up` again (the supervisor log says more)."
            ));
        }
        let pods = agent.map(|a| a.captured.len()).unwrap_or(0);
        let agent_link = match agent {
            Some(a) if a.ztunnel_connected => "connected",
            Some(_) => {
                problems.push(format!(
                    "the node agent on {node} has no ztunnel connected: captured pods on {node} cannot open connections until it is back."
                ));
                "DISCONNECTED"
            }
            None => "?",
        };
        rows.push(vec![
            node.clone(),
            ready,
            xds,
            sync,
            agent_link.to_owned(),
            pods.to_string(),
            certs,
        ]);
    }
    out.push_str(&table(
        &[
            "NODE",
            "READY",
            "ISTIOD",
            "CONFIG",
            "NODE AGENT",
            "CAPTURED PODS",
            "CERTIFICATES",
        ],
        rows,
    ));
    out.push('\n');

    if !st.plan.waypoints.is_empty() {
        out.push_str(&render_waypoints(inp, &all_proxies, &mut problems));
        out.push('\n');
    }
    if problems.is_empty() {
        out.push_str("No problems found.\n");
    } else {
        out.push_str("PROBLEMS\n");
        for p in problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}

/// The waypoints: where each runs, whether it is ready and follows istiod-lite, whether its
/// Gateway is Programmed, and the services and pods whose traffic it carries.
fn render_waypoints(inp: &Inputs, proxies: &[Value], problems: &mut Vec<String>) -> String {
    let st = &inp.state;
    // Who uses which waypoint, as the ztunnels were told.
    let dumps: Vec<&Value> = inp
        .ztunnels
        .values()
        .filter_map(|z| z.dump.as_ref().ok())
        .collect();
    let mut rows = Vec::new();
    for w in &st.plan.waypoints {
        let key = w.key();
        let pod = st.plan.waypoint_pod(w);
        let view = inp.waypoints.get(&key);
        let ready = match view.map(|v| &v.ready) {
            Some(Ok(())) => "yes".to_owned(),
            Some(Err(e)) => {
                problems.push(format!(
                    "waypoint {key} is not ready: {e}. Requests to the services that use it fail until it is; see logs/{}.",
                    w.log_name()
                ));
                "NO".to_owned()
            }
            None => "?".to_owned(),
        };
        let xds = match view.map(|v| &v.dump) {
            Some(Ok(d)) => {
                let connected = d["xds"]["connected"].as_bool().unwrap_or(false);
                if !connected {
                    problems.push(format!(
                        "waypoint {key} is not connected to istiod-lite ({}); it serves its last config.",
                        d["xds"]["lastError"].as_str().unwrap_or("no reason given")
                    ));
                }
                if connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                }
                .to_owned()
            }
            _ => "?".to_owned(),
        };
        let me = format!("{}.{}", w.name, w.namespace);
        let sync = match proxies
            .iter()
            .find(|p| proxy_kind(p) == Some("router") && proxy_name(p) == Some(me.as_str()))
        {
            Some(p) => sync_state(p),
            None => "unknown".into(),
        };
        if sync.starts_with("NACK") {
            problems.push(format!(
                "waypoint {key} rejected config: {sync}. Fix the named resource; the last good config stays in force."
            ));
        }
        let programmed = match &inp.gateway_status {
            Some(Ok(v)) => match gateway_condition(v, w, "Programmed") {
                Some(c) if c["status"] == "True" => "yes".to_owned(),
                Some(c) => {
                    problems.push(format!(
                        "Gateway {key} is not Programmed ({}: {}).",
                        c["reason"].as_str().unwrap_or("?"),
                        c["message"].as_str().unwrap_or("")
                    ));
                    "NO".to_owned()
                }
                None => "?".to_owned(),
            },
            _ => "?".to_owned(),
        };
        let bound_here = |v: &Value| {
            v.get("waypoint")
                .filter(|v| !v.is_null())
                .map(waypoint_name)
                .is_some_and(|n| n == w.hostname() || n == w.service_ip.to_string())
        };
        let mut users = std::collections::BTreeSet::new();
        for d in &dumps {
            for svc in d["services"].as_array().into_iter().flatten() {
                if bound_here(svc) {
                    users.insert(format!(
                        "{}/{}",
                        svc["namespace"].as_str().unwrap_or("?"),
                        svc["name"].as_str().unwrap_or("?")
                    ));
                }
            }
            for wl in d["workloads"].as_array().into_iter().flatten() {
                if bound_here(wl) {
                    users.insert(format!(
                        "pod {}/{}",
                        wl["namespace"].as_str().unwrap_or("?"),
                        wl["name"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
        rows.push(vec![
            key,
            pod.map(|p| p.node.clone()).unwrap_or_else(|| "?".into()),
            pod.map(|p| p.ip.to_string()).unwrap_or_else(|| "?".into()),
            w.service_ip.to_string(),
            ready,
            xds,
            sync,
            programmed,
            if users.is_empty() {
                "-".to_owned()
            } else {
                users.into_iter().collect::<Vec<_>>().join(", ")
            },
        ]);
    }
    table(
        &[
            "WAYPOINT",
            "NODE",
            "ADDRESS",
            "SERVICE",
            "READY",
            "ISTIOD",
            "CONFIG",
            "PROGRAMMED",
            "USED BY",
        ],
        rows,
    )
}

/// The condition `type_` of `w`'s Gateway in istiod-lite's `/debug/status`.
fn gateway_condition<'a>(
    status: &'a Value,
    w: &crate::waypoints::WaypointPlan,
    type_: &str,
) -> Option<&'a Value> {
    status["status"]
        .as_array()?
        .iter()
        .find(|s| s["kind"] == "Gateway" && s["namespace"] == w.namespace && s["name"] == w.name)?
        ["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// The kind a proxy gave in its node id (`ztunnel~…`, `router~…` for a waypoint).
fn proxy_kind(proxy: &Value) -> Option<&str> {
    proxy["nodeId"].as_str()?.split('~').next()
}

/// The `name.namespace` part of a proxy's node id.
fn proxy_name(proxy: &Value) -> Option<&str> {
    proxy["nodeId"].as_str()?.split('~').nth(2)
}

fn waypoint_name(w: &Value) -> String {
    if let Some(h) = w.get("hostname") {
        return h["hostname"].as_str().unwrap_or("?").to_owned();
    }
    if let Some(a) = w.get("address") {
        return a
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| a.to_string());
    }
    w.to_string()
}

/// `in sync` when every type's last push is acknowledged.
fn sync_state(proxy: &Value) -> String {
    let Some(types) = proxy["types"].as_object() else {
        return "unknown".into();
    };
    for (t, s) in types {
        if let Some(n) = s["lastNack"].as_str() {
            let short = t.rsplit('.').next().unwrap_or(t);
            return format!("NACK of {short}: {n}");
        }
    }
    let pending = types.values().any(|s| !s["pendingNonce"].is_null());
    let behind = types
        .values()
        .any(|s| s["ackedVersion"] != s["sentVersion"]);
    if pending || behind {
        "pushing".into()
    } else {
        "in sync".into()
    }
}

fn cert_counts(dump: &Value, now: u64) -> (usize, usize) {
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    let valid = certs
        .iter()
        .filter(|c| {
            let nb = c["notBefore"].as_u64().unwrap_or(u64::MAX);
            let na = c["notAfter"].as_u64().unwrap_or(0);
            nb <= now && now < na
        })
        .count();
    (valid, certs.len())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testbed::Plan;

    fn plan() -> Plan {
        let yaml = "
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
kind: Pod
apiVersion: v1
metadata: {name: web, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 198.18.1.20}
";
        let objects = serde_yaml::Deserializer::from_str(yaml)
            .map(|de| istiod_lite::model::Object::parse(Value::deserialize(de).unwrap()).unwrap());
        Plan::from_state(&istiod_lite::store::State::from_objects(objects)).unwrap()
    }

    fn proxy(node_id: &str, nack: Option<&str>) -> Value {
        json!({
            "nodeId": node_id,
            "nodeName": "node-a",
            "types": {"istio.workload.Address": {
                "sentVersion": "1", "ackedVersion": "1", "pendingNonce": null, "lastNack": nack,
            }},
        })
    }

    fn inputs(waypoint_ready: Result<(), String>, programmed: &str) -> Inputs {
        let hostname = json!({"hostname": {"namespace": "shop",
            "hostname": "waypoint.shop.svc.cluster.local"}, "hbonePort": 15008});
        let ztunnel_dump = json!({
            "xds": {"connected": true},
            "certificates": [],
            "workloads": [{"uid": "Kubernetes//Pod/shop/web", "namespace": "shop", "name": "web",
                "protocol": "HBONE", "waypoint": null}],
            "services": [
                {"namespace": "shop", "name": "web", "waypoint": hostname},
                {"namespace": "shop", "name": "other", "waypoint": null},
            ],
        });
        Inputs {
            state: MeshState {
                ready: true,
                plan: plan(),
                ..Default::default()
            },
            namespaces: BTreeMap::from([("shop".to_owned(), true)]),
            istiod: Ok(json!({"version": 3, "proxies": [
                proxy("ztunnel~0.0.0.0~node-a.istio-system~istio-system.svc.cluster.local", None),
                proxy("router~0.0.0.0~waypoint.shop~shop.svc.cluster.local", Some("bad route")),
            ]})),
            ztunnels: BTreeMap::from([(
                "node-a".to_owned(),
                ProxyView {
                    ready: Ok(()),
                    dump: Ok(ztunnel_dump),
                },
            )]),
            waypoints: BTreeMap::from([(
                "shop/waypoint".to_owned(),
                ProxyView {
                    ready: waypoint_ready,
                    dump: Ok(json!({"xds": {"connected": true}})),
                },
            )]),
            gateway_status: Some(Ok(json!({"status": [{
                "kind": "Gateway", "namespace": "shop", "name": "waypoint",
                "status": {"conditions": [{"type": "Programmed", "status": programmed,
                    "reason": "AddressNotAssigned", "message": "no ready waypoint pod"}]},
            }]}))),
            now: 0,
        }
    }

    #[test]
    fn waypoints_have_a_section_of_their_own() {
        let out = render(&inputs(Ok(()), "True"));
        let line = out
            .lines()
            .find(|l| l.starts_with("shop/waypoint"))
            .unwrap_or_else(|| panic!("no waypoint row in:\n{out}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "shop/waypoint",
                "node-a",
                "198.18.1.100",
                "198.18.99.10",
                "yes",
                "connected",
                "NACK",
                "of",
                "Address:",
                "bad",
                "route",
                "yes",
                "shop/web",
            ],
            "{out}"
        );
        // The waypoint's NACK is its own, not its node's ztunnel's.
        let ztunnel = out.lines().find(|l| l.starts_with("node-a ")).unwrap();
        assert!(ztunnel.contains("in sync"), "{out}");
        assert!(
            out.contains("waypoint shop/waypoint rejected config"),
            "{out}"
        );
    }

    #[test]
    fn a_waypoint_not_ready_or_programmed_is_a_problem() {
        let out = render(&inputs(
            Err("HTTP 503: waiting for its certificate".into()),
            "False",
        ));
        assert!(
            out.contains(
                "waypoint shop/waypoint is not ready: HTTP 503: waiting for its certificate."
            ),
            "{out}"
        );
        assert!(out.contains("logs/waypoint-shop.waypoint.log"), "{out}");
        assert!(
            out.contains("Gateway shop/waypoint is not Programmed (AddressNotAssigned: no ready waypoint pod)."),
            "{out}"
        );
    }

    #[test]
    fn no_waypoints_no_section() {
        let mut inp = inputs(Ok(()), "True");
        inp.state.plan.waypoints.clear();
        assert!(!render(&inp).contains("WAYPOINT  "));
    }
}

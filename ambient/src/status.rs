//! `ambient status`: what the mesh looks like now, gathered from the state file, istiod-lite's
//! debug endpoint and every ztunnel's `/config_dump`, then rendered by a pure function so the
//! output is checked against golden files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::netns;
use crate::up::{ISTIOD_DEBUG, MeshState, ZTUNNEL_ADMIN, ZTUNNEL_READY};
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
    pub ztunnels: BTreeMap<String, ZtunnelView>,
    /// Seconds since the Unix epoch, for certificate validity.
    pub now: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelView {
    pub ready: Result<(), String>,
    pub dump: Result<Value, String>,
}

/// Gathers the inputs from the running mesh.
pub fn gather() -> anyhow::Result<Inputs> {
    let state = MeshState::load()?;
    let namespaces = namespace_labels(&state)?;
    let istiod = netns::http_get(crate::testbed::FABRIC, ISTIOD_DEBUG, "/debug/connections")
        .map_err(|e| format!("{e:#}"))
        .and_then(|(code, body)| match code {
            200 => serde_json::from_str(&body).map_err(|e| format!("bad JSON: {e}")),
            c => Err(format!("HTTP {c}")),
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
        ztunnels.insert(node.name.clone(), ZtunnelView { ready, dump });
    }
    Ok(Inputs {
        state,
        namespaces,
        istiod,
        ztunnels,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

fn root_cause(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
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
    let proxies: BTreeMap<String, Value> = match &inp.istiod {
        Ok(v) => {
            let list = v["proxies"].as_array().cloned().unwrap_or_default();
            out.push_str(&format!(
                "istiod-lite: serving, config version {}, {} proxies connected\n\n",
                v["version"],
                list.len()
            ));
            list.into_iter()
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

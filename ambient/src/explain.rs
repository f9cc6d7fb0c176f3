//! `ambient explain POD`: the last connection to or from a pod that a policy refused, as the
//! deciding ztunnel recorded it: when, who called whom, which policy and why.

use anyhow::bail;
use serde_json::Value;

use crate::netns;
use crate::up::{MeshState, ZTUNNEL_ADMIN};
use crate::zconfig::time::rfc3339;

pub fn explain(args: &[String]) -> anyhow::Result<String> {
    let [pod] = args else {
        bail!("explain needs one pod: ambient explain NAMESPACE/NAME");
    };
    let state = MeshState::load()?;
    let pod = state.plan.find_pod(pod)?.clone();
    let who = format!("{}/{}", pod.namespace, pod.name);
    // Refusals are decided where the connection arrives, so every node may hold one.
    let mut found: Vec<(String, Value)> = Vec::new();
    let mut unreachable = Vec::new();
    for node in &state.plan.nodes {
        match netns::http_get(&node.netns, ZTUNNEL_ADMIN, "/config_dump") {
            Ok((200, body)) => {
                let dump: Value = serde_json::from_str(&body)?;
                for d in dump["recentDenials"].as_array().into_iter().flatten() {
                    if d["workload"] == who.as_str() || d["sourceWorkload"] == who.as_str() {
                        found.push((node.name.clone(), d.clone()));
                    }
                }
            }
            Ok((code, _)) => unreachable.push(format!("{} (HTTP {code})", node.name)),
            Err(e) => unreachable.push(format!("{} ({})", node.name, e.root_cause())),
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = String::new();
    found.sort_by_key(|(_, d)| d["at"].as_u64().unwrap_or(0));
    match found.last() {
        None => out.push_str(&format!(
            "No connection to or from {who} has been refused by a policy (ztunnels keep the last {}).\n",
            64
        )),
        Some((node, d)) => {
            let at = d["at"].as_u64().unwrap_or(0);
            let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
            let identity = match d["sourceIdentity"].as_str() {
                Some(id) => id.to_owned(),
                None => "no identity (plaintext, not from the mesh)".to_owned(),
            };
            let src_wl = d["sourceWorkload"].as_str().unwrap_or("unknown workload");
            out.push_str(&format!(
                "Last refusal involving {who}: {} ({}s ago), decided by the ztunnel on {node}\n",
                rfc3339(at),
                now.saturating_sub(at)
            ));
            out.push_str(&format!("  from    {} ({src_wl}, {identity})\n", text(&d["source"])));
            out.push_str(&format!(
                "  to      {} ({})\n",
                text(&d["destination"]),
                d["workload"].as_str().unwrap_or("?")
            ));
            out.push_str(&format!("  policy  {}\n", text(&d["policy"])));
            out.push_str(&format!("  reason  {}\n", text(&d["reason"])));
            out.push_str(&format!(
                "{} refusal(s) involving {who} are on record (all of them: `ambient ztunnel-config all -o yaml`, under recentDenials).\n",
                found.len()
            ));
        }
    }
    if !unreachable.is_empty() {
        out.push_str(&format!(
            "Not answering, so not searched: {}\n",
            unreachable.join(", ")
        ));
    }
    Ok(out)
}

//! `ambient ztunnel-config`: fetches each ztunnel's `/config_dump` and renders the view.

use anyhow::bail;

use crate::netns;
use crate::up::{MeshState, ZTUNNEL_ADMIN};
use crate::zconfig::{self, Format, View};

/// The view for one node, or for every node in turn (a heading before each).
pub fn show(view: View, format: Format, node: Option<&str>) -> anyhow::Result<String> {
    let state = MeshState::load()?;
    let nodes: Vec<_> = match node {
        Some(n) => match state.plan.node(n) {
            Some(p) => vec![p.clone()],
            None => bail!(
                "no node {n:?}; nodes: {}",
                state
                    .plan
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => state.plan.nodes.clone(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = String::new();
    for n in &nodes {
        let (code, body) = netns::http_get(&n.netns, ZTUNNEL_ADMIN, "/config_dump")
            .map_err(|e| anyhow::anyhow!("ztunnel on {} is not answering: {e:#}", n.name))?;
        if code != 200 {
            bail!("ztunnel on {} answered HTTP {code}", n.name);
        }
        let dump: serde_json::Value = serde_json::from_str(&body)?;
        let text = zconfig::render(&dump, view, format, now).map_err(anyhow::Error::msg)?;
        if nodes.len() > 1 && format == Format::Table {
            out.push_str(&format!("# ztunnel on {}\n", n.name));
        }
        out.push_str(&text);
        if nodes.len() > 1 && format == Format::Table {
            out.push('\n');
        }
    }
    Ok(out)
}

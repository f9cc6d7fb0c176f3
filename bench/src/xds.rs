//! Control-plane scale: `gen-mesh` writes a large mesh as Kubernetes YAML; `xds-scale`
//! connects many delta ADS subscribers to istiod-lite, times the full initial push, then times
//! single pod changes from the file write to the moment every subscriber has the change (and
//! has ACKed it: the ACK is sent the moment the response is read).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, Node};
use mesh_proto::workload::{Address, address};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The mesh `gen-mesh` writes.
pub struct MeshSize {
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
    pub nodes: usize,
    pub namespaces: usize,
}

/// The pod whose labels `xds-scale` changes, alone in its own file.
const CHURN_FILE: &str = "churn.yaml";
const CHURN_UID: &str = "Kubernetes//Pod/churn/churn-0";

/// Writes `size` as YAML files under `dir` (one per namespace, plus the churn pod). Returns the
/// resource counts every subscriber should end up holding.
pub fn gen_mesh(dir: &Path, size: &MeshSize) -> Result<Value> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let per_ns = |total: usize, ns: usize| {
        total / size.namespaces + usize::from(ns < total % size.namespaces)
    };
    let mut pod_n = 0usize;
    for ns in 0..size.namespaces {
        let mut y = String::new();
        let name = format!("ns-{ns}");
        writeln!(
            y,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient}}}}"
        )?;
        let services = per_ns(size.services, ns).max(1);
        for p in 0..per_ns(size.pods, ns) {
            let app = p % services;
            // 198.18.0.0/15 holds 131072 addresses: plenty for a benchmark mesh.
            let ip = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + 1 + pod_n as u32,
            );
            writeln!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: app-{app}-{p}, namespace: {name}, labels: {{app: app-{app}, version: v1}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{app}, containers: [{{ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}",
                pod_n % size.nodes
            )?;
            pod_n += 1;
        }
        for s in 0..services {
            let vip = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(198, 19, 128, 0)) + (ns * 1000 + s) as u32,
            );
            writeln!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: app-{s}, namespace: {name}}}\nspec: {{clusterIP: {vip}, selector: {{app: app-{s}}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: tcp-db, port: 5432}}]}}"
            )?;
        }
        for p in 0..per_ns(size.policies, ns) {
            let app = format!("app-{}", p % services);
            let y_policy = policy_yaml(&name, p, Some(&app), &format!("sa-{}", (p + 1) % services));
            y.push_str(&y_policy);
        }
        std::fs::write(dir.join(format!("{name}.yaml")), y)?;
    }
    write_churn(dir, 0)?;
    Ok(json!({
        "addresses": size.pods + services_total(size) + 1,
        "authorizations": size.policies,
    }))
}

/// The `p`th AuthorizationPolicy of namespace `ns`, as a `---`-led YAML document: every fourth
/// one DENY, the others ALLOW; selecting `app` (the whole namespace if `None`); one rule from
/// service account `from_sa` of the same namespace to port 8080.
pub fn policy_yaml(ns: &str, p: usize, app: Option<&str>, from_sa: &str) -> String {
    let action = if p.is_multiple_of(4) { "DENY" } else { "ALLOW" };
    let selector = app
        .map(|a| format!("  selector: {{matchLabels: {{app: {a}}}}}\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{p}, namespace: {ns}}}\nspec:\n  action: {action}\n{selector}  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/{from_sa}], namespaces: [{ns}]}}}}]\n    to: [{{operation: {{ports: ['8080']}}}}]\n"
    )
}

fn services_total(size: &MeshSize) -> usize {
    (0..size.namespaces)
        .map(|ns| {
            (size.services / size.namespaces + usize::from(ns < size.services % size.namespaces))
                .max(1)
        })
        .sum()
}

fn write_churn(dir: &Path, version: usize) -> Result<()> {
    let y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: churn, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: churn-0, namespace: churn, labels: {{app: churn, version: v{version}}}}}\nspec: {{nodeName: node-0}}\nstatus: {{podIP: 198.19.255.254}}\n"
    );
    // Write then rename, as a config-management tool would, so the reader never sees half.
    let tmp = dir.join(format!(".{CHURN_FILE}.tmp"));
    std::fs::write(&tmp, y)?;
    std::fs::rename(&tmp, dir.join(CHURN_FILE))?;
    Ok(())
}

/// What a subscriber reports to the driver.
enum Event {
    /// Holds (and has ACKed) at least the expected number of resources of each type.
    Synced(Instant),
    /// Received (and ACKed) revision `version` of the churn pod.
    Saw(usize, Instant),
    Failed(usize, String),
}

pub struct ScaleArgs {
    pub xds: String,
    pub dir: PathBuf,
    pub subscribers: usize,
    pub changes: usize,
    pub expect_addresses: usize,
    pub expect_authorizations: usize,
}

pub async fn xds_scale(a: ScaleArgs) -> Result<Value> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    for i in 0..a.subscribers {
        let tx = tx.clone();
        let url = a.xds.clone();
        let expect = (a.expect_addresses, a.expect_authorizations);
        tokio::spawn(async move {
            if let Err(e) = subscriber(i, url, expect, tx.clone()).await {
                let _ = tx.send(Event::Failed(i, format!("{e:#}")));
            }
        });
    }
    let deadline = Duration::from_secs(60);
    let mut synced = Vec::new();
    while synced.len() < a.subscribers {
        match tokio::time::timeout(deadline, rx.recv()).await {
            Ok(Some(Event::Synced(at))) => synced.push(at - start),
            Ok(Some(Event::Failed(i, e))) => bail!("subscriber {i} failed: {e}"),
            Ok(Some(Event::Saw(..))) => {}
            Ok(None) | Err(_) => bail!(
                "only {} of {} subscribers synced within {deadline:?}",
                synced.len(),
                a.subscribers
            ),
        }
    }
    let full_push = synced.iter().max().copied().unwrap_or_default();

    // One change at a time: write, then wait until every subscriber has it.
    let mut all_acked = Vec::new();
    let mut each = Vec::new();
    for version in 1..=a.changes {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let written = Instant::now();
        write_churn(&a.dir, version)?;
        let mut seen = 0;
        let mut last = Duration::ZERO;
        while seen < a.subscribers {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Event::Saw(v, at))) if v == version => {
                    let d = at.saturating_duration_since(written);
                    each.push(d);
                    last = last.max(d);
                    seen += 1;
                }
                Ok(Some(Event::Failed(i, e))) => bail!("subscriber {i} failed: {e}"),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!(
                    "change {version}: only {seen} of {} subscribers got it within 10 s",
                    a.subscribers
                ),
            }
        }
        all_acked.push(last);
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let pct = |v: &mut Vec<Duration>, p: f64| -> f64 {
        v.sort();
        if v.is_empty() {
            return 0.0;
        }
        let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
        ms(v[idx])
    };
    Ok(json!({
        "mode": "xds-scale",
        "subscribers": a.subscribers,
        "addresses": a.expect_addresses,
        "authorizations": a.expect_authorizations,
        "full_push_ms": ms(full_push),
        "changes": a.changes,
        "change_to_all_acked_ms": {"p50": pct(&mut all_acked.clone(), 0.5), "p99": pct(&mut all_acked, 0.99)},
        "change_to_each_ack_ms": {"p50": pct(&mut each.clone(), 0.5), "p99": pct(&mut each, 0.99)},
    }))
}

async fn subscriber(
    i: usize,
    url: String,
    (want_addr, want_authz): (usize, usize),
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await
        .context("connecting to istiod-lite")?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: format!("ztunnel~0.0.0.0~bench-{i}.istio-system~istio-system.svc.cluster.local"),
        ..Default::default()
    };
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut addrs = std::collections::HashSet::new();
    let mut authz = std::collections::HashSet::new();
    let mut synced = false;
    while let Some(resp) = stream.message().await? {
        let now = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let held = if resp.type_url == ADDRESS_TYPE_URL {
            &mut addrs
        } else {
            &mut authz
        };
        for name in &resp.removed_resources {
            held.remove(name);
        }
        for r in &resp.resources {
            held.insert(r.name.clone());
            if r.name == CHURN_UID
                && let Some(any) = &r.resource
                && let Ok(Address {
                    r#type: Some(address::Type::Workload(w)),
                }) = Address::decode(any.value.as_slice())
                && let Some(v) = w
                    .canonical_revision
                    .strip_prefix('v')
                    .and_then(|v| v.parse().ok())
            {
                let _ = events.send(Event::Saw(v, now));
            }
        }
        if !synced && addrs.len() >= want_addr && authz.len() >= want_authz {
            synced = true;
            let _ = events.send(Event::Synced(now));
        }
    }
    bail!("istiod-lite closed the stream")
}

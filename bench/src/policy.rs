//! L4 authorization cost: `gen-policy-mesh` writes the mesh `bench/policy.sh` measures (a
//! client and a server pod on two nodes, other workloads beside them, a background mesh from
//! [`xds::gen_mesh`]) and, for each variant, the AuthorizationPolicies to swap in.
//!
//! The variants differ only in their policies, so the connection rate through the two
//! ztunnels isolates what holding and evaluating them costs:
//!
//! | variant            | policies                                                   | select the server |
//! |--------------------|------------------------------------------------------------|-------------------|
//! | `none`             | none                                                       | 0                 |
//! | `other-ns`         | N in the background namespaces (1 in 10 namespace-wide)    | 0                 |
//! | `same-ns`          | N in the server's namespace, selecting other workloads     | 0                 |
//! | `applying`         | K ALLOW policies, each allowing the client (second rule)   | K                 |
//! | `same-ns+applying` | both of the above                                          | K                 |
//! | `deny`             | the K policies with the client's principal swapped out     | K (client denied) |

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::xds::{self, MeshSize};

/// The namespace of the client and server pods.
const NS: &str = "bench";
/// Workloads in [`NS`] besides the client and server, on a node without a ztunnel; the
/// `same-ns` policies select them.
const PEERS: usize = 20;
/// The peers' addresses start after this one (inside 198.18.0.0/15, outside the background).
const PEER_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);
/// Where `gen-mesh` puts service VIPs; the client and server must stay out of it.
const VIP_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
/// The file name `bench/policy.sh` swaps each variant in as.
pub const POLICY_FILE: &str = "policies.yaml";

pub struct PolicyMeshArgs {
    pub dir: PathBuf,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    /// The server's port: the policies' `to.operation.ports`.
    pub port: u16,
    /// N: policies in the `other-ns` and `same-ns` variants.
    pub policies: usize,
    /// K: policies that apply to the server.
    pub applying: usize,
    /// The background mesh (its `policies` are ignored: those come with the variants).
    pub background: MeshSize,
}

/// One variant's policy file and what the ztunnels must hold before it is measured.
struct Variant {
    name: &'static str,
    yaml: String,
    /// Every policy in the file (all of them reach every ztunnel).
    policies: usize,
    /// Those that select the server workload.
    server_selected: usize,
    allows_client: bool,
}

/// Writes the mesh under `DIR/mesh` and one policy file per variant under `DIR/variants`;
/// returns the variants as JSON for the script.
pub fn gen_policy_mesh(a: &PolicyMeshArgs) -> Result<Value> {
    for (what, ip) in [("--client-ip", a.client_ip), ("--server-ip", a.server_ip)] {
        let n = u32::from(ip);
        let background = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        ensure!(
            !(background..=background + a.background.pods as u32).contains(&n)
                && !(u32::from(PEER_BASE)..=u32::from(PEER_BASE) + PEERS as u32).contains(&n)
                && n < u32::from(VIP_BASE),
            "{what} {ip} collides with the generated mesh (background pods from 198.18.0.1, \
             peers from {PEER_BASE}, service VIPs from {VIP_BASE})"
        );
    }
    ensure!(
        a.client_ip != a.server_ip,
        "client and server need different addresses"
    );
    let mesh = a.dir.join("mesh");
    let background = MeshSize {
        policies: 0,
        ..a.background
    };
    xds::gen_mesh(&mesh, &background).context("writing the background mesh")?;
    write(&mesh.join("bench.yaml"), &bench_yaml(a)?)?;
    write(&mesh.join(POLICY_FILE), "# no policies\n")?;

    let variants_dir = a.dir.join("variants");
    std::fs::create_dir_all(&variants_dir)
        .with_context(|| format!("creating {}", variants_dir.display()))?;
    let mut out = Vec::new();
    for v in variants(a) {
        let file = variants_dir.join(format!("{}.yaml", v.name));
        write(&file, &v.yaml)?;
        out.push(json!({
            "name": v.name,
            "file": file.display().to_string(),
            "policies": v.policies,
            "server_selected": v.server_selected,
            "allows_client": v.allows_client,
        }));
    }
    Ok(json!({
        "mesh_dir": mesh.display().to_string(),
        "policy_file": mesh.join(POLICY_FILE).display().to_string(),
        "server_uid": format!("Kubernetes//Pod/{NS}/server"),
        "variants": out,
    }))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The bench namespace: client (node-a), server (node-b) and the peers (node-c).
fn bench_yaml(a: &PolicyMeshArgs) -> Result<String> {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
    );
    let mut pod = |name: &str, node: &str, ip: Ipv4Addr, port: Option<u16>| -> Result<()> {
        let containers = port
            .map(|p| format!(", containers: [{{ports: [{{name: tcp, containerPort: {p}}}]}}]"))
            .unwrap_or_default();
        write!(
            y,
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {name}{containers}}}\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n"
        )?;
        Ok(())
    };
    pod("client", "node-a", a.client_ip, None)?;
    pod("server", "node-b", a.server_ip, Some(a.port))?;
    for k in 0..PEERS {
        let ip = Ipv4Addr::from(u32::from(PEER_BASE) + 1 + k as u32);
        pod(&format!("peer-{k}"), "node-c", ip, Some(8080))?;
    }
    Ok(y)
}

fn variants(a: &PolicyMeshArgs) -> Vec<Variant> {
    let (n, k) = (a.policies, a.applying);
    let namespaces = a.background.namespaces;
    let services = (a.background.services / namespaces).max(1);
    let mut other_ns = String::new();
    for p in 0..n {
        let ns = format!("ns-{}", p % namespaces);
        // One in ten namespace-wide: those are indexed by namespace, not by selector.
        let app = (p % 10 != 9).then(|| format!("app-{}", p % services));
        let from = format!("sa-{}", (p + 1) % services);
        other_ns.push_str(&xds::policy_yaml(&ns, p, app.as_deref(), &from));
    }
    let mut same_ns = String::new();
    for p in 0..n {
        let app = format!("peer-{}", p % PEERS);
        let from = format!("peer-{}", (p + 1) % PEERS);
        same_ns.push_str(&xds::policy_yaml(NS, p, Some(&app), &from));
    }
    let applying = (0..k)
        .map(|i| applying_yaml(i, "client", a.port))
        .collect::<String>();
    let deny = (0..k)
        .map(|i| applying_yaml(i, "nobody", a.port))
        .collect::<String>();
    vec![
        Variant {
            name: "none",
            yaml: "# no policies\n".into(),
            policies: 0,
            server_selected: 0,
            allows_client: true,
        },
        Variant {
            name: "other-ns",
            yaml: other_ns,
            policies: n,
            server_selected: 0,
            allows_client: true,
        },
        Variant {
            name: "same-ns",
            yaml: same_ns.clone(),
            policies: n,
            server_selected: 0,
            allows_client: true,
        },
        Variant {
            name: "applying",
            yaml: applying.clone(),
            policies: k,
            server_selected: k,
            allows_client: true,
        },
        Variant {
            name: "same-ns+applying",
            yaml: same_ns + &applying,
            policies: n + k,
            server_selected: k,
            allows_client: true,
        },
        Variant {
            name: "deny",
            yaml: deny,
            policies: k,
            server_selected: k,
            allows_client: k == 0,
        },
    ]
}

/// An ALLOW policy on the server: a first rule for a peer (no match for the client), then one
/// for `client_sa` by principal, namespace and port, so each evaluation walks both rules.
fn applying_yaml(i: usize, client_sa: &str, port: u16) -> String {
    let peer = format!("peer-{}", i % PEERS);
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: allow-client-{i}, namespace: {NS}}}\n\
         spec:\n  action: ALLOW\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n\
         \x20 - from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/{peer}]}}}}]\n\
         \x20   to: [{{operation: {{ports: ['{port}']}}}}]\n\
         \x20 - from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/{client_sa}], namespaces: [{NS}]}}}}]\n\
         \x20   to: [{{operation: {{ports: ['{port}']}}}}]\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: PathBuf) -> PolicyMeshArgs {
        PolicyMeshArgs {
            dir,
            client_ip: Ipv4Addr::new(198, 19, 0, 1),
            server_ip: Ipv4Addr::new(198, 19, 0, 2),
            port: 5201,
            policies: 30,
            applying: 3,
            background: MeshSize {
                pods: 20,
                services: 10,
                policies: 0,
                nodes: 2,
                namespaces: 5,
            },
        }
    }

    #[test]
    fn variant_files_hold_what_they_announce() {
        let dir = std::env::temp_dir().join(format!("policy-mesh-{}", std::process::id()));
        let out = gen_policy_mesh(&args(dir.clone())).unwrap();
        for v in out["variants"].as_array().unwrap() {
            let text = std::fs::read_to_string(v["file"].as_str().unwrap()).unwrap();
            let name = v["name"].as_str().unwrap();
            let count = |s: &str| text.matches(s).count() as u64;
            assert_eq!(
                count("kind: AuthorizationPolicy"),
                v["policies"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                count("selector: {matchLabels: {app: server}}"),
                v["server_selected"].as_u64().unwrap(),
                "{name}"
            );
            let allows = count("sa/client]") == v["server_selected"].as_u64().unwrap();
            assert_eq!(allows, v["allows_client"].as_bool().unwrap(), "{name}");
        }
        let mesh = std::fs::read_to_string(dir.join("mesh/bench.yaml")).unwrap();
        assert!(mesh.contains("podIP: 198.19.0.2"), "{mesh}");
        assert_eq!(
            std::fs::read_dir(dir.join("mesh")).unwrap().count(),
            5 + 3,
            "5 namespaces, churn.yaml, bench.yaml, policies.yaml"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_addresses_inside_the_generated_mesh() {
        let mut a = args(std::env::temp_dir().join("policy-mesh-unused"));
        a.server_ip = Ipv4Addr::new(198, 18, 0, 7);
        let e = gen_policy_mesh(&a).unwrap_err().to_string();
        assert!(e.contains("--server-ip 198.18.0.7 collides"), "{e}");
    }
}

#![allow(clippy::unwrap_used)]
//! ztunnels following a real istiod-lite, in one process on loopback: real sockets, real gRPC
//! (delta xDS and the CA), real mTLS between the ztunnels. istiod-lite reads a directory of
//! Kubernetes YAML, as it does locally; the tests edit that directory and watch what every
//! ztunnel's `/config_dump` shows.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use istiod_lite::app::Istiod;
use istiod_lite::config::{Config as IstiodConfig, SourceConfig};
use mesh_core::SpiffeId;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use ztunnel::ca_client::{CaClient, CaError};
use ztunnel::config::MeshSource;
use ztunnel::testing::{EOF_MARKER, TestMesh, echo_server, http_get, socks_connect};
use ztunnel::{Config, Ztunnel};

/// Longest wait for anything that is not a measured latency.
const WAIT: Duration = Duration::from_secs(10);
/// What a config edit may take to reach every ztunnel.
const PROPAGATION_BUDGET: Duration = Duration::from_secs(1);
/// Upper bound on a whole test, whatever goes wrong.
const TEST_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(5);

const NAMESPACE: &str = "apps";
const SERVICE_HOST: &str = "echo.apps.svc.cluster.local";
const ECHO_PORT: u16 = 8080;

/// istiod-lite's inputs (a config directory, a state directory) and the loopback block the
/// pods live in. Everything is removed with the [`TestMesh`]'s directory.
struct ControlPlane {
    net: TestMesh,
    config_dir: PathBuf,
    state_dir: PathBuf,
}

impl ControlPlane {
    /// Namespace `apps` in ambient; pod `client` (sa `client`) on node-a at .10, pod `server`
    /// (sa `server`, app=echo) on node-b at .20; service `echo` at .200, port 80 → 8080.
    fn new() -> Self {
        let net = TestMesh::new();
        let config_dir = net.dir.join("config");
        let state_dir = net.dir.join("state");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        let cp = Self {
            net,
            config_dir,
            state_dir,
        };
        cp.put("namespace.yaml", &namespace(true));
        cp.put(
            "pods.yaml",
            &[cp.client_pod(), cp.server_pod(cp.ip(20).to_string())].join("---\n"),
        );
        cp.put("service.yaml", &service("echo", cp.ip(200), "echo"));
        cp
    }

    fn ip(&self, host: u8) -> IpAddr {
        self.net.ip(host)
    }

    fn client_pod(&self) -> String {
        pod(
            "client",
            "node-a",
            "client",
            "client",
            &self.ip(10).to_string(),
        )
    }

    fn server_pod(&self, pod_ip: String) -> String {
        pod("server", "node-b", "server", "echo", &pod_ip)
    }

    /// Writes a config file the way an editor or `kubectl`-like tool does: to a hidden file
    /// (istiod-lite skips those), then renamed into place, so no half-written file is read.
    fn put(&self, name: &str, yaml: &str) {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config_dir.join(name)).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.config_dir.join(name)).unwrap();
    }

    /// Starts istiod-lite on `xds` (plaintext xDS and CA; TLS off), debug on any port.
    async fn istiod(&self, xds: SocketAddr) -> Istiod {
        let mut cfg = IstiodConfig::new(SourceConfig::Directory(self.config_dir.clone()));
        cfg.state_dir = self.state_dir.clone();
        cfg.xds_plaintext_addr = Some(xds);
        cfg.xds_tls_addr = None;
        cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        // The directory poll stays at its default (1 s): inotify is what makes edits fast.
        Istiod::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("istiod-lite starts on {xds}: {e:#}"))
    }

    /// The config of a ztunnel on `node` following `istiod`, built from the flags an operator
    /// would pass, with the node's bootstrap token in a file.
    fn ztunnel_config(&self, istiod: &Istiod, node: &str) -> Config {
        let token = self.net.dir.join(format!("token-{node}"));
        std::fs::write(&token, istiod.node_tokens.token_for(node).unwrap()).unwrap();
        let xds = istiod.addrs.xds_plaintext.unwrap();
        let args = format!(
            "--node {node} --xds-address http://{xds} --token-file {} \
             --outbound off --inbound-plaintext off --socks5 127.0.0.1:0 --admin 127.0.0.1:0 \
             --metrics 127.0.0.1:0 --readiness 127.0.0.1:0 --hbone-port {} --no-mark",
            token.display(),
            self.net.hbone_port,
        );
        let mut cfg =
            Config::from_args_and_env(args.split_whitespace().map(str::to_owned), |_| None)
                .unwrap();
        assert!(matches!(cfg.mesh, MeshSource::Xds(_)));
        assert_eq!(
            cfg.ca_address.as_ref().unwrap().authority(),
            xds.to_string()
        );
        cfg.handshake_timeout = Duration::from_millis(500);
        cfg.drain_timeout = Duration::from_millis(200);
        cfg
    }

    /// A ztunnel on `node`, its certificates from istiod-lite's CA.
    async fn ztunnel(&self, istiod: &Istiod, node: &str) -> Ztunnel {
        let cfg = self.ztunnel_config(istiod, node);
        let ca = ztunnel::app::cert_source(&cfg).unwrap();
        Ztunnel::start(cfg, ca).await.unwrap()
    }

    /// istiod-lite and the ztunnels of node-a and node-b, both ready (every type ACKed) and
    /// node-b serving inbound HBONE on the server pod.
    async fn start(&self) -> (Istiod, Ztunnel, Ztunnel) {
        let istiod = self.istiod("127.0.0.1:0".parse().unwrap()).await;
        let a = self.ztunnel(&istiod, "node-a").await;
        let b = self.ztunnel(&istiod, "node-b").await;
        for z in [&a, &b] {
            eventually("the ztunnel is ready", async || {
                http_get(z.addrs.readiness.unwrap(), "/healthz/ready")
                    .await
                    .0
                    == 200
            })
            .await;
        }
        let inbound = SocketAddr::new(self.ip(20), self.net.hbone_port);
        eventually("node-b listens for HBONE on the server pod", async || {
            b.inbound_addrs().contains(&inbound)
        })
        .await;
        (istiod, a, b)
    }

    /// A connection from the client pod, through node-a's SOCKS5, to `dst`.
    async fn dial(&self, a: &Ztunnel, dst: SocketAddr) -> std::io::Result<TcpStream> {
        socks_connect(a.addrs.socks5.unwrap(), self.ip(10), dst).await
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(20), ECHO_PORT)
    }

    fn identity(&self, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", NAMESPACE, sa).unwrap()
    }
}

fn namespace(ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {labels}}}\n")
}

fn pod(name: &str, node: &str, sa: &str, app: &str, pod_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}}}\n\
         status: {{podIP: {pod_ip}}}\n"
    )
}

fn service(name: &str, vip: IpAddr, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {app}}}, \
         ports: [{{port: 80, targetPort: {ECHO_PORT}}}]}}\n"
    )
}

fn uid(pod: &str) -> String {
    format!("Kubernetes//Pod/{NAMESPACE}/{pod}")
}

/// Polls `f` until it holds, failing after [`WAIT`].
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn config_dump(z: &Ztunnel) -> Value {
    let (status, body) = http_get(z.addrs.admin.unwrap(), "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn debug_json(istiod: &Istiod, path: &str) -> Value {
    let (status, body) = http_get(istiod.addrs.debug.unwrap(), path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn workload<'a>(dump: &'a Value, uid: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["uid"] == uid)
}

fn has_service(dump: &Value, hostname: &str) -> bool {
    dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["hostname"] == hostname)
}

fn certificate_identities(dump: &Value) -> Vec<String> {
    dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap().to_owned())
        .collect()
}

/// Time from `start` until each ztunnel's `/config_dump` satisfies `shows`; fails if either
/// has not after [`WAIT`].
async fn until_shown(
    start: Instant,
    what: &str,
    zs: [&Ztunnel; 2],
    shows: impl Fn(&Value) -> bool,
) -> [Duration; 2] {
    let mut seen: [Option<Duration>; 2] = [None, None];
    loop {
        for (i, z) in zs.iter().enumerate() {
            if seen[i].is_none() && shows(&config_dump(z).await) {
                seen[i] = Some(start.elapsed());
            }
        }
        if let [Some(a), Some(b)] = seen {
            return [a, b];
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: not shown by every ztunnel after {WAIT:?} (node-a: {:?}, node-b: {:?})",
            seen[0],
            seen[1]
        );
        tokio::time::sleep(POLL).await;
    }
}

fn assert_within_budget(what: &str, [a, b]: [Duration; 2]) {
    eprintln!("{what}: node-a {a:?}, node-b {b:?}");
    for (node, d) in [("node-a", a), ("node-b", b)] {
        assert!(
            d < PROPAGATION_BUDGET,
            "{what}: took {d:?} to reach {node}'s /config_dump (budget {PROPAGATION_BUDGET:?})"
        );
    }
}

/// Sends `msg`, half-closes, and expects the echo followed by the server's EOF marker.
async fn round_trip(mut s: TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the echo within the deadline")
        .unwrap();
    assert_eq!(got, [msg, EOF_MARKER].concat());
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("the test finishes within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_edits_reach_every_ztunnel_within_a_second() {
    bounded(async {
        let cp = ControlPlane::new();
        let (_istiod, a, b) = cp.start().await;
        let both = [&a, &b];
        for z in both {
            let dump = config_dump(z).await;
            for p in ["client", "server"] {
                assert_eq!(workload(&dump, &uid(p)).unwrap()["protocol"], "HBONE");
            }
            assert!(has_service(&dump, SERVICE_HOST), "{dump}");
        }

        // (a) A pod is added (a new file).
        let start = Instant::now();
        cp.put(
            "extra.yaml",
            &pod("extra", "node-a", "extra", "extra", &cp.ip(11).to_string()),
        );
        let took = until_shown(start, "a new pod", both, |d| {
            workload(d, &uid("extra")).is_some_and(|w| w["addresses"][0] == cp.ip(11).to_string())
        })
        .await;
        assert_within_budget("pod added", took);

        // (b) The namespace leaves ambient: every workload in it is plain TCP.
        let start = Instant::now();
        cp.put("namespace.yaml", &namespace(false));
        let took = until_shown(start, "the namespace relabelled", both, |d| {
            let apps: Vec<_> = d["workloads"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["namespace"] == NAMESPACE)
                .collect();
            apps.len() == 3 && apps.iter().all(|w| w["protocol"] == "TCP")
        })
        .await;
        assert_within_budget("namespace relabelled", took);

        // (c) The service is deleted.
        let start = Instant::now();
        cp.remove("service.yaml");
        let took = until_shown(start, "the service deleted", both, |d| {
            !has_service(d, SERVICE_HOST)
        })
        .await;
        assert_within_budget("service deleted", took);
        for z in both {
            let dump = config_dump(z).await;
            assert_eq!(dump["services"], serde_json::json!([]), "{dump}");
            assert_eq!(dump["workloads"].as_array().unwrap().len(), 3, "{dump}");
            for p in ["client", "server", "extra"] {
                assert!(
                    workload(&dump, &uid(p)).unwrap()["services"]
                        .as_object()
                        .unwrap()
                        .is_empty(),
                    "{p} still backs a deleted service: {dump}"
                );
            }
        }
    })
    .await;
}

/// A long-lived connection carrying a message every 20 ms; any error, short read or corrupted
/// echo ends it with the reason.
struct Chatter {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
    task: JoinHandle<Result<u64, String>>,
}

impl Chatter {
    fn start(mut s: TcpStream) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let stop = stop.clone();
            let echoes = echoes.clone();
            async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("message {n:08} through the mesh\n");
                    s.write_all(msg.as_bytes())
                        .await
                        .map_err(|e| format!("sending message {n}: {e}"))?;
                    let mut back = vec![0u8; msg.len()];
                    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
                        .await
                        .map_err(|_| format!("echo of message {n} not back within 2 s"))?
                        .map_err(|e| format!("reading echo {n}: {e}"))?;
                    if back != msg.as_bytes() {
                        return Err(format!(
                            "echo {n} corrupted: {:?}",
                            String::from_utf8_lossy(&back)
                        ));
                    }
                    n += 1;
                    echoes.store(n, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The end, cleanly: our FIN reaches the server, its marker and FIN come back.
                s.shutdown()
                    .await
                    .map_err(|e| format!("half-closing: {e}"))?;
                let mut tail = Vec::new();
                tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut tail))
                    .await
                    .map_err(|_| "no EOF from the server within 2 s".to_owned())?
                    .map_err(|e| format!("reading the end: {e}"))?;
                if tail != EOF_MARKER {
                    return Err(format!(
                        "the end of the stream was {:?}",
                        String::from_utf8_lossy(&tail)
                    ));
                }
                Ok(n)
            }
        });
        Self { stop, echoes, task }
    }

    fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::Relaxed)
    }

    /// Waits until a few more messages have made the round trip (and none failed).
    async fn still_flowing(&self, when: &str) {
        let from = self.echoes();
        eventually(&format!("messages flow {when}"), async || {
            assert!(
                !self.task.is_finished(),
                "the long-lived connection ended {when}"
            );
            self.echoes() >= from + 5
        })
        .await;
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.await.unwrap() {
            Ok(n) => n,
            Err(e) => panic!("the long-lived connection broke: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_restart_mid_traffic_drops_no_connection() {
    bounded(async {
        let cp = ControlPlane::new();
        let (istiod, a, b) = cp.start().await;
        let _echo = echo_server(cp.server_addr()).await;
        let chatter = Chatter::start(cp.dial(&a, cp.server_addr()).await.unwrap());
        chatter.still_flowing("before the restart").await;
        let dump = config_dump(&a).await;
        assert_eq!(
            dump["pool"][0]["dst"],
            serde_json::json!([cp.identity("server").to_string()])
        );
        let tunnel = dump["pool"][0]["connections"][0]["id"].clone();

        // istiod-lite goes away; both ztunnels notice, keep their config and certificates.
        let xds = istiod.addrs.xds_plaintext.unwrap();
        istiod.shutdown();
        for z in [&a, &b] {
            eventually("the ztunnel reports xDS disconnected", async || {
                let dump = config_dump(z).await;
                !z.xds_status().unwrap().is_connected() && dump["xds"]["connected"] == false
            })
            .await;
            let dump = config_dump(z).await;
            assert_eq!(dump["workloads"].as_array().unwrap().len(), 2, "{dump}");
            let (status, _) = http_get(z.addrs.readiness.unwrap(), "/healthz/ready").await;
            assert_eq!(status, 200, "the last config stays in force: still ready");
        }
        chatter.still_flowing("while istiod-lite is down").await;
        let s = cp.dial(&a, cp.server_addr()).await.unwrap();
        round_trip(s, b"a new connection while istiod-lite is down").await;
        let vip = SocketAddr::new(cp.ip(200), 80);
        let s = cp.dial(&a, vip).await.unwrap();
        round_trip(s, b"through the service VIP as well").await;

        // A new istiod-lite on the same directories and the same port.
        let istiod = cp.istiod(xds).await;
        assert_eq!(istiod.addrs.xds_plaintext, Some(xds));
        for z in [&a, &b] {
            eventually("the ztunnel reconnects", async || {
                z.xds_status().unwrap().is_connected()
            })
            .await;
        }
        eventually(
            "istiod-lite lists both proxies with acknowledged versions",
            async || {
                let conns = debug_json(&istiod, "/debug/connections").await;
                let proxies = conns["proxies"].as_array().unwrap();
                let mut nodes: Vec<_> = proxies
                    .iter()
                    .filter(|p| {
                        [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL].iter().all(|t| {
                            p["types"][*t]["ackedVersion"]
                                .as_u64()
                                .is_some_and(|v| v > 0)
                        })
                    })
                    .map(|p| p["nodeName"].as_str().unwrap_or_default().to_owned())
                    .collect();
                nodes.sort();
                proxies.len() == 2 && nodes == ["node-a", "node-b"]
            },
        )
        .await;
        chatter.still_flowing("after the restart").await;

        // The new istiod-lite's pushes arrive.
        let start = Instant::now();
        cp.put(
            "late.yaml",
            &pod("late", "node-a", "late", "late", &cp.ip(12).to_string()),
        );
        let took = until_shown(start, "a pod added after the restart", [&a, &b], |d| {
            workload(d, &uid("late")).is_some()
        })
        .await;
        eprintln!(
            "pod added after the istiod-lite restart: node-a {:?}, node-b {:?}",
            took[0], took[1]
        );
        chatter.still_flowing("after the change").await;

        let n = chatter.finish().await;
        eprintln!("long-lived connection: {n} messages echoed intact across the restart");
        // The HBONE connection it rode is the one it started on, and still alive.
        let dump = config_dump(&a).await;
        let connections = dump["pool"][0]["connections"].as_array().unwrap();
        assert!(
            connections
                .iter()
                .any(|c| c["id"] == tunnel && c["dead"] == false),
            "{dump:#}"
        );
        for z in [&a, &b] {
            let metrics = z.metrics().encode();
            let reconnects: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("ztunnel_xds_reconnects_total "))
                .unwrap_or_else(|| panic!("no reconnect count in {metrics}"))
                .parse()
                .unwrap();
            assert!(reconnects >= 1, "{metrics}");
        }
        istiod.shutdown();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_cannot_get_a_certificate_for_a_pod_on_another_node() {
    bounded(async {
        let cp = ControlPlane::new();
        let istiod = cp.istiod("127.0.0.1:0".parse().unwrap()).await;
        let cfg = cp.ztunnel_config(&istiod, "node-a");
        let ca = CaClient::new(&cfg, cfg.ca_address.as_ref().unwrap()).unwrap();
        let ttl = Duration::from_secs(3600);

        // The server pod runs only on node-b.
        let server = cp.identity("server");
        let (_key, csr) = mesh_core::certs::new_key_and_csr(&server).unwrap();
        let err = ca.create_certificate(&server, csr, ttl).await.unwrap_err();
        assert!(
            matches!(&err, CaError::Refused { identity, .. } if *identity == server),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "refused to sign for {server}: no pod running as {server} is scheduled on node node-a"
            )),
            "{text}"
        );

        // The client pod runs on node-a.
        let client = cp.identity("client");
        let (_key, csr) = mesh_core::certs::new_key_and_csr(&client).unwrap();
        let chain = ca.create_certificate(&client, csr, ttl).await.unwrap();
        let leaf = mesh_core::tls::parse_pem_certs(&chain[0]).unwrap();
        assert_eq!(
            mesh_core::tls::identity_from_cert(&leaf[0]).unwrap(),
            client
        );
        assert_eq!(chain.last().unwrap(), &istiod.ca.roots_pem());

        // The same through the source the ztunnel itself uses.
        let source = ztunnel::app::cert_source(&cfg).unwrap();
        let (_key, csr) = mesh_core::certs::new_key_and_csr(&server).unwrap();
        let err = source.sign(&server, csr, ttl).await.unwrap_err();
        assert!(err.contains(&server.to_string()) && err.contains("node-a"), "{err}");

        // Through the mesh: each ztunnel holds only its own pods' identities.
        let a = cp.ztunnel(&istiod, "node-a").await;
        let b = cp.ztunnel(&istiod, "node-b").await;
        for z in [&a, &b] {
            eventually("the ztunnel is ready", async || {
                http_get(z.addrs.readiness.unwrap(), "/healthz/ready").await.0 == 200
            })
            .await;
        }
        let inbound = SocketAddr::new(cp.ip(20), cp.net.hbone_port);
        eventually("node-b listens for HBONE on the server pod", async || {
            b.inbound_addrs().contains(&inbound)
        })
        .await;
        let _echo = echo_server(cp.server_addr()).await;
        let s = cp.dial(&a, cp.server_addr()).await.unwrap();
        round_trip(s, b"client on node-a to server on node-b").await;
        // Even asked directly, node-a's certificate manager cannot obtain the server's identity.
        let err = a.state().certs.fetch(&server).await.unwrap_err().to_string();
        assert!(
            err.contains(&server.to_string()) && err.contains("node node-a"),
            "{err}"
        );
        assert_eq!(
            certificate_identities(&config_dump(&a).await),
            [client.to_string()]
        );
        assert_eq!(
            certificate_identities(&config_dump(&b).await),
            [server.to_string()]
        );
        // Three refusals: the CA client, the ztunnel's cert source, its certificate manager.
        let metrics = http_get(istiod.addrs.debug.unwrap(), "/metrics").await.1;
        assert!(
            metrics.contains("istiod_ca_refusals_total{reason=\"not_authorized\"} 3\n"),
            "{metrics}"
        );
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_yaml_keeps_serving_and_is_reported() {
    bounded(async {
        let cp = ControlPlane::new();
        let (istiod, a, b) = cp.start().await;
        let both = [&a, &b];
        let errors = debug_json(&istiod, "/debug/errors").await;
        assert_eq!(errors["errors"], serde_json::json!([]), "{errors}");

        // One change: a file that is not YAML, an unknown kind, and the server pod given an
        // invalid IP beside a new pod in the same file and a new service in another.
        cp.put("broken.yaml", "kind: [unclosed\n");
        cp.put(
            "widget.yaml",
            "apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n",
        );
        cp.put("more.yaml", &service("more", cp.ip(201), "client"));
        cp.put(
            "pods.yaml",
            &[
                cp.client_pod(),
                cp.server_pod("not-an-ip".into()),
                pod("third", "node-a", "third", "third", &cp.ip(13).to_string()),
            ]
            .join("---\n"),
        );
        until_shown(Instant::now(), "the good edits", both, |d| {
            workload(d, &uid("third")).is_some() && has_service(d, "more.apps.svc.cluster.local")
        })
        .await;

        let want = [
            ("/broken.yaml", "file", "YAML", "document 1"),
            (
                "/widget.yaml (document 1)",
                "Widget w",
                "kind",
                "unknown kind \"Widget\"",
            ),
            (
                "/pods.yaml (document 2)",
                "Pod apps/server",
                "status.podIP",
                "invalid IP address",
            ),
        ];
        eventually("every rejected object is reported", async || {
            let errors = debug_json(&istiod, "/debug/errors").await;
            errors["errors"].as_array().unwrap().len() == want.len()
        })
        .await;
        let errors = debug_json(&istiod, "/debug/errors").await;
        for (origin, object, field, message) in want {
            assert!(
                errors["errors"].as_array().unwrap().iter().any(|e| {
                    e["origin"].as_str().unwrap().ends_with(origin)
                        && e["object"] == object
                        && e["field"] == field
                        && e["message"].as_str().unwrap().contains(message)
                }),
                "no error for {origin} / {object} / {field} containing {message:?}: {errors:#}"
            );
        }

        // The server pod keeps its last good version everywhere.
        let server_ip = cp.ip(20).to_string();
        for z in both {
            let dump = config_dump(z).await;
            let server = workload(&dump, &uid("server")).unwrap();
            assert_eq!(
                server["addresses"],
                serde_json::json!([server_ip]),
                "{dump}"
            );
            assert_eq!(server["protocol"], "HBONE");
            assert_eq!(dump["workloads"].as_array().unwrap().len(), 3, "{dump}");
        }
        let inbound = SocketAddr::new(cp.ip(20), cp.net.hbone_port);
        assert!(b.inbound_addrs().contains(&inbound));
        let (status, _) = http_get(istiod.addrs.debug.unwrap(), "/ready").await;
        assert_eq!(status, 200);

        // istiod-lite keeps serving: a good edit afterwards arrives, and clears the error.
        let start = Instant::now();
        cp.put(
            "pods.yaml",
            &[
                cp.client_pod(),
                cp.server_pod(cp.ip(22).to_string()),
                pod("third", "node-a", "third", "third", &cp.ip(13).to_string()),
            ]
            .join("---\n"),
        );
        let took = until_shown(start, "the fixed pod", both, |d| {
            workload(d, &uid("server"))
                .is_some_and(|w| w["addresses"] == serde_json::json!([cp.ip(22).to_string()]))
        })
        .await;
        assert_within_budget("fixed pod after broken config", took);
        let errors = debug_json(&istiod, "/debug/errors").await;
        let left: Vec<_> = errors["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["origin"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(left.len(), 2, "the pod's error is cleared: {errors:#}");
        assert!(left.iter().all(|o| !o.contains("pods.yaml")), "{left:?}");
    })
    .await;
}

/// Over the TLS port (15012): the ztunnels verify istiod-lite's serving certificate against the
/// mesh root, authenticate with their tokens, trust only that pinned root for workload
/// certificates, and carry traffic; a stream without a token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnels_follow_istiod_over_tls_with_tokens() {
    bounded(async {
        let cp = ControlPlane::new();
        let mut icfg = IstiodConfig::new(SourceConfig::Directory(cp.config_dir.clone()));
        icfg.state_dir = cp.state_dir.clone();
        icfg.xds_plaintext_addr = None;
        icfg.xds_tls_addr = Some("127.0.0.1:0".parse().unwrap());
        icfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        let istiod = Istiod::start(icfg).await.unwrap();
        let tls = istiod.addrs.xds_tls.unwrap();
        let root = cp.state_dir.join("ca/root-cert.pem");
        assert!(
            root.exists(),
            "the self-managed root is in the state directory"
        );

        let ztunnel_for = |node: &str, with_token: bool| {
            let token = cp.net.dir.join(format!("tls-token-{node}"));
            std::fs::write(&token, istiod.node_tokens.token_for(node).unwrap()).unwrap();
            let token_flag = if with_token {
                format!("--token-file {}", token.display())
            } else {
                String::new()
            };
            let args = format!(
                "--node {node} --xds-address https://{tls} --xds-root-cert {} {token_flag} \
                 --outbound off --inbound-plaintext off --socks5 127.0.0.1:0 --admin 127.0.0.1:0 \
                 --metrics 127.0.0.1:0 --readiness 127.0.0.1:0 --hbone-port {} --no-mark",
                root.display(),
                cp.net.hbone_port,
            );
            let mut cfg =
                Config::from_args_and_env(args.split_whitespace().map(str::to_owned), |_| None)
                    .unwrap();
            cfg.handshake_timeout = Duration::from_millis(500);
            cfg.drain_timeout = Duration::from_millis(200);
            cfg
        };

        // Without a token the stream is refused and the ztunnel stays unready, saying why.
        let cfg = ztunnel_for("node-a", false);
        let anon = Ztunnel::start(cfg.clone(), ztunnel::app::cert_source(&cfg).unwrap())
            .await
            .unwrap();
        eventually("the refusal is reported", async || {
            config_dump(&anon)
                .await
                .to_string()
                .contains("no bearer token")
        })
        .await;
        assert_ne!(
            http_get(anon.addrs.readiness.unwrap(), "/healthz/ready")
                .await
                .0,
            200
        );
        anon.shutdown().await;

        let start = |node: &'static str| {
            let cfg = ztunnel_for(node, true);
            async move {
                Ztunnel::start(cfg.clone(), ztunnel::app::cert_source(&cfg).unwrap())
                    .await
                    .unwrap()
            }
        };
        let a = start("node-a").await;
        let b = start("node-b").await;
        for z in [&a, &b] {
            eventually("the ztunnel is ready over TLS", async || {
                http_get(z.addrs.readiness.unwrap(), "/healthz/ready")
                    .await
                    .0
                    == 200
            })
            .await;
        }
        let conns = debug_json(&istiod, "/debug/connections").await;
        let who: Vec<&str> = conns["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["authenticatedAs"].as_str())
            .collect();
        assert!(
            who.contains(&"node node-a") && who.contains(&"node node-b"),
            "{conns}"
        );

        let inbound = SocketAddr::new(cp.ip(20), cp.net.hbone_port);
        eventually("node-b listens for HBONE on the server pod", async || {
            b.inbound_addrs().contains(&inbound)
        })
        .await;
        let _echo = echo_server(cp.server_addr()).await;
        let s = cp.dial(&a, SocketAddr::new(cp.ip(200), 80)).await.unwrap();
        round_trip(s, b"over the TLS control plane").await;
    })
    .await;
}

/// An AuthorizationPolicy written as YAML reaches the ztunnels and is enforced on real
/// traffic; editing it takes effect for new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_policy_from_yaml_is_enforced() {
    bounded(async {
        let cp = ControlPlane::new();
        let (_istiod, a, b) = cp.start().await;
        let _echo = echo_server(cp.server_addr()).await;
        round_trip(cp.dial(&a, cp.server_addr()).await.unwrap(), b"before any policy").await;

        let policy = |principal: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only, namespace: {NAMESPACE}}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  rules: [{{from: [{{source: {{principals: [{principal}]}}}}]}}]\n"
            )
        };
        cp.put("policy.yaml", &policy("cluster.local/ns/apps/sa/someone-else"));
        eventually("node-b holds the policy", async || {
            config_dump(&b).await["policies"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        })
        .await;
        let refused = cp.dial(&a, cp.server_addr()).await;
        assert!(refused.is_err(), "the client is not allowed: {refused:?}");
        let metrics = http_get(b.addrs.metrics.unwrap(), "/metrics").await.1;
        assert!(
            metrics.contains(
                "ztunnel_connections_refused_total{direction=\"inbound\",reason=\"policy_denied\"} 1"
            ),
            "{metrics}"
        );

        cp.put("policy.yaml", &policy("cluster.local/ns/apps/sa/client"));
        eventually("the client is allowed again", async || {
            cp.dial(&a, cp.server_addr()).await.is_ok()
        })
        .await;
        round_trip(cp.dial(&a, cp.server_addr()).await.unwrap(), b"allowed by policy").await;
    })
    .await;
}

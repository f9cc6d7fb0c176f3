#![allow(clippy::unwrap_used)]
//! istiod-lite against a real gRPC client: the delta ADS protocol (initial push, ACK, deltas,
//! removals, NACK, reconnect with known versions) and the CA's authentication and authorization.

use std::path::{Path, PathBuf};
use std::time::Duration;

use istiod_lite::app::Istiod;
use istiod_lite::config::{Config, SourceConfig};
use mesh_core::SpiffeId;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: apps, labels: {app: a}}
spec: {nodeName: node-a, serviceAccountName: sa-a}
status: {podIP: 198.18.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: apps, labels: {app: b}}
spec: {nodeName: node-b, serviceAccountName: sa-b}
status: {podIP: 198.18.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: apps}
spec: {clusterIP: 198.19.0.2, selector: {app: b}, ports: [{port: 80}]}
"#;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("istiod-{tag}-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn start(dir: &Path, state: &Path) -> Istiod {
    start_with(dir, state, |_| {}).await
}

async fn start_with(dir: &Path, state: &Path, tweak: impl FnOnce(&mut Config)) -> Istiod {
    let mut cfg = Config::new(SourceConfig::Directory(dir.to_owned()));
    cfg.state_dir = state.to_owned();
    cfg.xds_plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.xds_tls_addr = None;
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.dir_poll = Duration::from_millis(20);
    tweak(&mut cfg);
    Istiod::start(cfg).await.unwrap()
}

async fn channel(istiod: &Istiod) -> Channel {
    let addr = istiod.addrs.xds_plaintext.unwrap();
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One delta ADS stream, driven by hand.
struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    async fn open(ch: Channel) -> Self {
        let (tx, req_rx) = mpsc::channel(8);
        let mut client = AggregatedDiscoveryServiceClient::new(ch);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(req_rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, known: &[(String, String)]) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~0.0.0.0~test.istio-system~istio-system.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            initial_resource_versions: known.iter().cloned().collect(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<_> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn delta_ads_pushes_changes_removals_and_resumes_from_known_versions() {
    let dir = tmpdir("cfg");
    let state = tmpdir("state");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let istiod = start(&dir, &state).await;

    let mut s = Stream::open(channel(&istiod).await).await;
    s.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let first = s.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        names(&first),
        vec![
            "Kubernetes//Pod/apps/a",
            "Kubernetes//Pod/apps/b",
            "apps/b.apps.svc.cluster.local"
        ]
    );
    assert!(
        first
            .resources
            .iter()
            .all(|r| r.resource.as_ref().unwrap().type_url == ADDRESS_TYPE_URL)
    );
    s.ack(&first).await;
    s.subscribe(AUTHORIZATION_TYPE_URL, &[]).await;
    let authz = s.next().await;
    assert_eq!(authz.type_url, AUTHORIZATION_TYPE_URL);
    assert!(
        authz.resources.is_empty(),
        "a new subscription is answered even when empty"
    );
    s.ack(&authz).await;

    // One change: only the changed pod is sent.
    std::fs::write(
        dir.join("mesh.yaml"),
        MESH.replace("198.18.0.2", "198.18.0.3"),
    )
    .unwrap();
    let delta = s.next().await;
    assert_eq!(names(&delta), vec!["Kubernetes//Pod/apps/b"]);
    assert!(delta.removed_resources.is_empty());
    // A NACK is counted and shown; the stream goes on.
    s.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: delta.nonce.clone(),
        error_detail: Some(mesh_proto::rpc::Status {
            code: 3,
            message: "Kubernetes//Pod/apps/b: bad".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    let debug = istiod.addrs.debug.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let conns = http_get(debug, "/debug/connections").await;
        if conns.contains("Kubernetes//Pod/apps/b: bad") {
            assert!(conns.contains("\"nacks\": 1"), "{conns}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NACK never shown: {conns}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http_get(debug, "/metrics").await;
    assert!(
        metrics.contains("pilot_total_xds_rejects_total{type=\"address\"} 1"),
        "{metrics}"
    );

    // A removal is sent as a removal.
    let without_service = MESH.split("---").take(3).collect::<Vec<_>>().join("---");
    std::fs::write(dir.join("mesh.yaml"), without_service).unwrap();
    let removal = s.next().await;
    assert_eq!(
        removal.removed_resources,
        vec!["apps/b.apps.svc.cluster.local"]
    );
    s.ack(&removal).await;

    // A reconnecting proxy says what it holds; it gets the difference only.
    let known: Vec<(String, String)> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(s);
    let mut s = Stream::open(channel(&istiod).await).await;
    s.subscribe(ADDRESS_TYPE_URL, &known).await;
    let resumed = s.next().await;
    assert_eq!(
        names(&resumed),
        vec!["Kubernetes//Pod/apps/b"],
        "pod a unchanged: not resent"
    );
    assert_eq!(
        resumed.removed_resources,
        vec!["apps/b.apps.svc.cluster.local"]
    );

    istiod.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn csr(id: &SpiffeId) -> String {
    let (_key, csr) = mesh_core::certs::new_key_and_csr(id).unwrap();
    csr
}

fn ca_request(
    id: &SpiffeId,
    token: Option<&str>,
    impersonate: bool,
) -> tonic::Request<IstioCertificateRequest> {
    use prost_types::{Struct, Value, value::Kind};
    let metadata = impersonate.then(|| Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr(id),
        validity_duration: 3600,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

#[tokio::test]
async fn the_ca_signs_only_for_pods_on_the_requesting_node() {
    let dir = tmpdir("cfg");
    let state = tmpdir("state");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let istiod = start(&dir, &state).await;
    let mut ca = IstioCertificateServiceClient::new(channel(&istiod).await);
    let token_a = istiod.node_tokens.token_for("node-a").unwrap();
    let id_a = SpiffeId::new("cluster.local", "apps", "sa-a").unwrap();
    let id_b = SpiffeId::new("cluster.local", "apps", "sa-b").unwrap();

    let chain = ca
        .create_certificate(ca_request(&id_a, Some(&token_a), true))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2, "leaf and root");
    let leaf = mesh_core::tls::parse_pem_certs(&chain[0]).unwrap();
    assert_eq!(mesh_core::tls::identity_from_cert(&leaf[0]).unwrap(), id_a);
    assert_eq!(chain[1], istiod.ca.roots_pem());

    let err = ca
        .create_certificate(ca_request(&id_b, Some(&token_a), true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains(
            "no pod running as spiffe://cluster.local/ns/apps/sa/sa-b is scheduled on node node-a"
        ),
        "{}",
        err.message()
    );
    let err = ca
        .create_certificate(ca_request(&id_a, None, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = ca
        .create_certificate(ca_request(&id_a, Some("node:node-a:forged"), true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The identity asked for must be the one in the CSR.
    let mut req = ca_request(&id_a, Some(&token_a), true);
    req.get_mut().csr = csr(&id_b);
    let err = ca.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // After a restart the trust root is the same.
    let root = istiod.ca.roots_pem();
    istiod.shutdown();
    let again = start(&dir, &state).await;
    assert_eq!(again.ca.roots_pem(), root);
    again.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}

/// Applies a response to what a proxy holds: name → version.
fn apply(held: &mut std::collections::BTreeMap<String, String>, r: &DeltaDiscoveryResponse) {
    for n in &r.removed_resources {
        held.remove(n);
    }
    for res in &r.resources {
        held.insert(res.name.clone(), res.version.clone());
    }
}

/// Receives and ACKs until `held` stops changing for a while.
async fn drain(s: &mut Stream, held: &mut std::collections::BTreeMap<String, String>) -> usize {
    let mut responses = 0;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(500), s.rx.message())
        .await
        .map(|m| m.unwrap())
    {
        apply(held, &r);
        s.ack(&r).await;
        responses += 1;
    }
    responses
}

#[tokio::test]
async fn a_large_push_is_split_and_converges_even_when_config_changes_midway() {
    let dir = tmpdir("cfg");
    let state = tmpdir("state");
    let pod = |i: usize, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i:05}, namespace: apps, labels: {{app: a}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-a}}\nstatus: {{podIP: {ip}}}\n",
            i % 7
        )
    };
    let ip = |i: usize| format!("198.18.{}.{}", i / 250, i % 250 + 1);
    let n = 600;
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for i in 0..n {
        yaml.push_str(&pod(i, &ip(i)));
    }
    std::fs::write(dir.join("mesh.yaml"), &yaml).unwrap();
    let istiod = start_with(&dir, &state, |c| c.max_response_bytes = 16 * 1024).await;

    let mut s = Stream::open(channel(&istiod).await).await;
    s.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let first = s.next().await;
    assert!(
        first.resources.len() < n,
        "{} of {n} resources in one response: not split",
        first.resources.len()
    );
    let mut held = std::collections::BTreeMap::new();
    apply(&mut held, &first);

    // Before the proxy answers: change a pod it has, remove one it has not got yet, add one.
    let version = istiod.snapshot().version;
    let edited = yaml
        .replace(&pod(0, &ip(0)), &pod(0, "198.19.0.1"))
        .replace(&pod(n - 1, &ip(n - 1)), "")
        + &pod(n, "198.19.0.2");
    std::fs::write(dir.join("mesh.yaml"), edited).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while istiod.snapshot().version == version {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.ack(&first).await;
    let more = drain(&mut s, &mut held).await;
    assert!(more >= 1);

    // A fresh proxy gets the same set, versions included.
    let mut fresh = Stream::open(channel(&istiod).await).await;
    fresh.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let mut want = std::collections::BTreeMap::new();
    drain(&mut fresh, &mut want).await;
    assert_eq!(want.len(), n);
    assert!(want.contains_key(&format!("Kubernetes//Pod/apps/pod-{n:05}")));
    assert!(!want.contains_key(&format!("Kubernetes//Pod/apps/pod-{:05}", n - 1)));
    assert_eq!(held, want, "the split push converged on the current config");

    // Removing most pods at once: the removals are split too, and the proxy converges.
    let mut few = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for i in 0..20 {
        few.push_str(&pod(i, &ip(i)));
    }
    std::fs::write(dir.join("mesh.yaml"), few).unwrap();
    let mut removals = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held.len() != 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged: {}",
            held.len()
        );
        let r = s.next().await;
        assert!(
            r.encoded_len() <= 16 * 1024 + 1024,
            "a response of {} bytes",
            r.encoded_len()
        );
        removals += usize::from(!r.removed_resources.is_empty());
        apply(&mut held, &r);
        s.ack(&r).await;
    }
    assert!(
        removals > 1,
        "the removals were split over {removals} responses"
    );

    istiod.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}

#[tokio::test]
async fn misbehaving_proxies_do_not_disturb_others() {
    let dir = tmpdir("cfg");
    let state = tmpdir("state");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let istiod = start(&dir, &state).await;
    let ch = channel(&istiod).await;

    // One proxy subscribes and never answers; another sends nonsense.
    let mut silent = Stream::open(ch.clone()).await;
    silent.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let _ = silent.next().await;
    let mut rude = Stream::open(ch.clone()).await;
    rude.send(DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/no.such.Type".into(),
        ..Default::default()
    })
    .await;
    rude.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: "never-sent".into(),
        ..Default::default()
    })
    .await;
    rude.subscribe(
        ADDRESS_TYPE_URL,
        &[("no/such".into(), "not-a-version".into())],
    )
    .await;
    // What it claimed to hold but does not exist is removed; everything else is sent.
    let r = rude.next().await;
    assert_eq!(r.removed_resources, vec!["no/such"]);
    assert_eq!(r.resources.len(), 3);

    // A CSR that is not a CSR is refused with a reason, not a crash.
    let mut ca = IstioCertificateServiceClient::new(ch.clone());
    let mut req = ca_request(
        &SpiffeId::new("cluster.local", "apps", "sa-a").unwrap(),
        Some(&istiod.node_tokens.token_for("node-a").unwrap()),
        true,
    );
    req.get_mut().csr =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let err = ca.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A well-behaved proxy still gets its config and every change.
    let mut good = Stream::open(ch).await;
    good.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let first = good.next().await;
    assert_eq!(first.resources.len(), 3);
    good.ack(&first).await;
    std::fs::write(
        dir.join("mesh.yaml"),
        MESH.replace("198.18.0.1", "198.18.0.9"),
    )
    .unwrap();
    let delta = good.next().await;
    assert_eq!(names(&delta), vec!["Kubernetes//Pod/apps/a"]);
    drop(rude);
    drop(silent);

    istiod.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}

#[tokio::test]
async fn a_tls_connection_that_never_authenticates_is_closed() {
    use tokio::io::AsyncReadExt;
    let dir = tmpdir("cfg");
    let state = tmpdir("state");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let istiod = start_with(&dir, &state, |c| {
        c.xds_tls_addr = Some("127.0.0.1:0".parse().unwrap());
        c.auth_deadline = Duration::from_millis(200);
    })
    .await;
    let roots = istiod.ca.roots().clone();
    let mut store = rustls::RootCertStore::empty();
    for d in roots.ders() {
        store.add(d.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(istiod.addrs.xds_tls.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("the serving certificate verifies against the mesh root");
    // Say nothing: the server gives up on the connection after the deadline.
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle connection was still open after 5 s"
    );

    istiod.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}

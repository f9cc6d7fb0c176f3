//! A ztunnel following a scripted delta-xDS server: the subscription it opens, ACKs, a NACK
//! that names the bad resource while the good one is applied, readiness, and a reconnect that
//! lists what the ztunnel already holds.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::Stream;
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, security, workload};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use ztunnel::Ztunnel;
use ztunnel::config::{ControlPlaneAddr, MeshSource};
use ztunnel::testing::{TestMesh, http_get};

const WAIT: Duration = Duration::from_secs(10);

type Responses = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// One stream the server accepted: what the client sent, and a handle to answer it.
/// Dropping `responses` ends the stream.
struct Accepted {
    metadata: MetadataMap,
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: Responses,
}

struct ScriptedAds {
    accepted: mpsc::UnboundedSender<Accepted>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for ScriptedAds {
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let metadata = request.metadata().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.accepted.send(Accepted {
            metadata,
            requests: request.into_inner(),
            responses: tx,
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }
}

async fn serve_ads() -> (SocketAddr, mpsc::UnboundedReceiver<Accepted>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = AggregatedDiscoveryServiceServer::new(ScriptedAds { accepted: tx });
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, rx)
}

async fn next_stream(rx: &mut mpsc::UnboundedReceiver<Accepted>) -> Accepted {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the ztunnel opened a stream in time")
        .expect("the server runs")
}

async fn next_request(s: &mut Accepted) -> DeltaDiscoveryRequest {
    tokio::time::timeout(WAIT, s.requests.message())
        .await
        .expect("the ztunnel sent a request in time")
        .expect("the request stream is healthy")
        .expect("the request stream is open")
}

/// Polls `f` until it holds, failing after [`WAIT`].
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wl(uid: &str, node: &str, ip: Vec<u8>) -> Resource {
    let w = workload::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
        node: node.into(),
        addresses: vec![ip],
        tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let a = workload::Address {
        r#type: Some(workload::address::Type::Workload(w)),
    };
    Resource {
        name: uid.into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: a.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn push(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        ..Default::default()
    }
}

fn octets(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

async fn start(mesh: &TestMesh, xds: SocketAddr) -> Ztunnel {
    let mut cfg = mesh.config("node-a", mesh.dir.join("unused.yaml"));
    let addr: ControlPlaneAddr = format!("http://{xds}").parse().unwrap();
    cfg.mesh = MeshSource::Xds(addr);
    cfg.token_file = Some(mesh.write("token", "test-jwt\n"));
    Ztunnel::start(cfg, mesh.ca.clone()).await.unwrap()
}

#[tokio::test]
async fn acks_nacks_and_resumes_with_what_it_holds() {
    let mesh = TestMesh::new();
    let (addr, mut streams) = serve_ads().await;
    let zt = start(&mesh, addr).await;
    let ready_addr = zt.addrs.readiness.unwrap();
    let admin = zt.addrs.admin.unwrap();
    let (status, body) = http_get(ready_addr, "/healthz/ready").await;
    assert_eq!(status, 503, "{body}");

    // The subscription: both types, wildcard, node set, nothing held yet.
    let mut s = next_stream(&mut streams).await;
    assert_eq!(s.metadata.get("authorization").unwrap(), "Bearer test-jwt");
    assert_eq!(s.metadata.get("clusterid").unwrap(), "Kubernetes");
    for type_url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let r = next_request(&mut s).await;
        assert_eq!(r.type_url, type_url);
        assert!(r.resource_names_subscribe.is_empty());
        assert!(r.initial_resource_versions.is_empty());
        assert!(r.response_nonce.is_empty());
        let node = r.node.unwrap();
        assert_eq!(
            node.id,
            "ztunnel~0.0.0.0~node-a.istio-system~istio-system.svc.cluster.local"
        );
    }

    // A local workload: ACKed, and served (an inbound HBONE listener on its address).
    let local_ip = mesh.ip(10);
    s.responses
        .send(Ok(push(
            ADDRESS_TYPE_URL,
            "a1",
            vec![wl("w-local", "node-a", octets(local_ip))],
        )))
        .unwrap();
    let ack = next_request(&mut s).await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (ADDRESS_TYPE_URL, "a1")
    );
    assert!(ack.error_detail.is_none());
    assert!(ack.node.is_none());
    let want = SocketAddr::new(local_ip, mesh.hbone_port);
    assert_eq!(zt.inbound_addrs(), vec![want]);
    // Not ready until policies were ACKed too, and not on the first part of a split push.
    assert_eq!(http_get(ready_addr, "/healthz/ready").await.0, 503);
    let mut part = push(AUTHORIZATION_TYPE_URL, "p0", vec![]);
    part.system_version_info = format!("1{}", mesh_proto::PARTIAL_PUSH_SUFFIX);
    s.responses.send(Ok(part)).unwrap();
    let ack = next_request(&mut s).await;
    assert_eq!(ack.response_nonce, "p0");
    assert!(ack.error_detail.is_none());
    assert_eq!(http_get(ready_addr, "/healthz/ready").await.0, 503);
    let policy = security::Authorization {
        name: "deny-all".into(),
        namespace: "default".into(),
        action: security::Action::Deny as i32,
        ..Default::default()
    };
    s.responses
        .send(Ok(push(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![Resource {
                name: "default/deny-all".into(),
                version: "3".into(),
                resource: Some(prost_types::Any {
                    type_url: AUTHORIZATION_TYPE_URL.into(),
                    value: policy.encode_to_vec(),
                }),
                ..Default::default()
            }],
        )))
        .unwrap();
    let ack = next_request(&mut s).await;
    assert_eq!(ack.response_nonce, "p1");
    assert!(ack.error_detail.is_none());
    let (status, body) = http_get(ready_addr, "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // A malformed workload beside a good one: NACK naming the bad one, the good one applied.
    s.responses
        .send(Ok(push(
            ADDRESS_TYPE_URL,
            "a2",
            vec![
                wl("w-bad", "node-b", vec![10, 0, 0, 0, 1]),
                wl("w-good", "node-b", vec![10, 0, 0, 2]),
            ],
        )))
        .unwrap();
    let nack = next_request(&mut s).await;
    assert_eq!(nack.response_nonce, "a2");
    let detail = nack.error_detail.unwrap();
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("w-bad: field addresses[0]"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("w-good"), "{}", detail.message);
    let snap = zt.state().store.snapshot();
    assert!(snap.workload_by_ip("10.0.0.2".parse().unwrap()).is_some());
    assert_eq!(snap.workloads().count(), 2);
    let (_, dump) = http_get(admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let types = &dump["xds"]["types"];
    assert_eq!(dump["xds"]["connected"], true);
    assert_eq!(types[ADDRESS_TYPE_URL]["resources"], 2);
    assert_eq!(types[ADDRESS_TYPE_URL]["lastAckedNonce"], "a1");
    assert!(
        types[ADDRESS_TYPE_URL]["lastNack"]
            .as_str()
            .unwrap()
            .contains("w-bad")
    );
    assert_eq!(types[AUTHORIZATION_TYPE_URL]["lastAckedNonce"], "p1");
    assert_eq!(dump["policies"][0]["name"], "deny-all");
    assert_eq!(dump["policies"][0]["action"], "DENY");
    assert!(
        zt.metrics()
            .encode()
            .contains("ztunnel_xds_nacks_sent_total 1\n")
    );

    // The server drops the stream: the config stays, and the new stream lists what is held.
    drop(s);
    let mut s = next_stream(&mut streams).await;
    let r = next_request(&mut s).await;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        r.initial_resource_versions,
        [
            ("w-good".to_string(), "1".to_string()),
            ("w-local".to_string(), "1".to_string()),
        ]
        .into()
    );
    let r = next_request(&mut s).await;
    assert_eq!(r.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(
        r.initial_resource_versions,
        [("default/deny-all".to_string(), "3".to_string())].into()
    );
    assert_eq!(zt.state().store.snapshot().workloads().count(), 2);
    assert_eq!(http_get(ready_addr, "/healthz/ready").await.0, 200);
    let metrics = zt.metrics().encode();
    assert!(
        metrics.contains("ztunnel_xds_reconnects_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ztunnel_xds_connection_terminations_total{reason=\"stream_closed\"} 1\n"),
        "{metrics}"
    );

    // A removal on the new stream: the local workload goes, and so does its listener.
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE_URL.into(),
            nonce: "a3".into(),
            removed_resources: vec!["w-local".into()],
            ..Default::default()
        }))
        .unwrap();
    let ack = next_request(&mut s).await;
    assert_eq!(ack.response_nonce, "a3");
    assert!(ack.error_detail.is_none());
    assert!(zt.inbound_addrs().is_empty());
    zt.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_control_plane_leaves_it_unready_and_says_why() {
    let mesh = TestMesh::new();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let zt = start(&mesh, addr).await;
    let admin = zt.addrs.admin.unwrap();
    let xds = zt.xds_status().unwrap().clone();
    eventually("the connection failure is reported", async || {
        let (_, dump) = http_get(admin, "/config_dump").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["xds"]["lastError"]
            .as_str()
            .is_some_and(|e| e.starts_with(&format!("cannot reach istiod-lite at http://{addr}")))
    })
    .await;
    assert!(!xds.is_connected());
    let (status, body) = http_get(zt.addrs.readiness.unwrap(), "/healthz/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains(ADDRESS_TYPE_URL), "{body}");
    // It keeps trying, with back-off.
    eventually("a retry", async || {
        zt.metrics()
            .encode()
            .contains("ztunnel_xds_connection_terminations_total{reason=\"connect_failed\"} 2\n")
    })
    .await;
    zt.shutdown().await;
}

//! Waypoints on loopback, with real ztunnels, sockets and mTLS: a connection to a service or
//! workload that has a waypoint is carried to that waypoint (a stand-in here that records what
//! it is asked for and forwards as a waypoint would), and a workload with a waypoint takes
//! connections only from the waypoint's pods.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_core::SpiffeId;
use mesh_core::certs::CertManager;
use mesh_core::hbone::{self, Connect, Dialer, Pool, PoolConfig, PoolKey, ServerConfig, StreamIo};
use mesh_core::testing::{h2_connect, issue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::Ztunnel;
use ztunnel::state::Snapshot;
use ztunnel::testing::{EOF_MARKER, TestMesh, echo_server, http_get, socks_connect};

const CLIENT: u8 = 10;
const SERVER: u8 = 20;
const SERVER2: u8 = 21;
const WAYPOINT: u8 = 50;
const ECHO_VIP: u8 = 200;
const WAYPOINT_VIP: u8 = 201;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// The client on node-a; `server` (with a waypoint of its own) and `server2` (without) behind
/// the service `echo`, whose VIP has the waypoint; the waypoint's pod, not captured, and its
/// service. The waypoint takes HBONE on the test's HBONE port at its own address.
fn mesh_yaml(mesh: &TestMesh) -> String {
    let ip = |h| mesh.ip(h);
    format!(
        r#"workloads:
  - {{name: client, serviceAccount: client, node: node-a, addresses: [{c}]}}
  - name: server
    serviceAccount: server
    node: node-b
    addresses: [{s}]
    labels: {{app: echo}}
    waypoint: {{service: waypoint, hbonePort: {port}}}
  - {{name: server2, serviceAccount: server, node: node-b, addresses: [{s2}], labels: {{app: echo}}}}
  - name: waypoint
    serviceAccount: waypoint
    node: node-w
    protocol: TCP
    healthy: true
    addresses: [{w}]
    labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
services:
  - name: echo
    addresses: [{vip}]
    ports: [{{port: 80, targetPort: 8080}}]
    selector: {{app: echo}}
    waypoint: {{service: waypoint, hbonePort: {port}}}
  - name: waypoint
    addresses: [{wvip}]
    ports: [{{port: 15008}}]
    selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
"#,
        c = ip(CLIENT),
        s = ip(SERVER),
        s2 = ip(SERVER2),
        w = ip(WAYPOINT),
        vip = ip(ECHO_VIP),
        wvip = ip(WAYPOINT_VIP),
        port = mesh.hbone_port,
    )
}

/// What the stand-in waypoint was asked for on one CONNECT.
#[derive(Debug, Clone)]
struct Seen {
    authority: String,
    peer: SpiffeId,
    forwarded: String,
    traceparent: bool,
}

/// A waypoint stand-in on the waypoint pod's address: it presents `presents`, records every
/// CONNECT and forwards it over HBONE, as the waypoint, from the waypoint pod's address: the
/// echo VIP to `server`, a pod address to that pod.
struct FakeWaypoint {
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeWaypoint {
    async fn start(mesh: &TestMesh, presents: SpiffeId) -> Self {
        let addr = SocketAddr::new(mesh.ip(WAYPOINT), mesh.hbone_port);
        let listener = TcpListener::bind(addr).await.unwrap();
        let tls = issue(&mesh.ca, &presents).server_config().unwrap();
        let certs = CertManager::new(mesh.ca.clone(), Duration::from_secs(3600));
        let pool = Arc::new(Pool::new(PoolConfig::default(), certs, Dialer::default()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ctx = Arc::new(Forwarding {
            pool,
            seen: seen.clone(),
            vip: SocketAddr::new(mesh.ip(ECHO_VIP), 80),
            server: SocketAddr::new(mesh.ip(SERVER), 8080),
            from: mesh.ip(WAYPOINT),
            hbone_port: mesh.hbone_port,
        });
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, ctx) = (tls.clone(), ctx.clone());
                tokio::spawn(async move {
                    let never = std::future::pending::<()>();
                    let _ = hbone::serve_connection(
                        tcp,
                        tls,
                        &ServerConfig::default(),
                        never,
                        move |c| ctx.clone().forward(c),
                    )
                    .await;
                });
            }
        });
        Self { seen, _task: task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct Forwarding {
    pool: Arc<Pool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    vip: SocketAddr,
    server: SocketAddr,
    from: std::net::IpAddr,
    hbone_port: u16,
}

impl Forwarding {
    async fn forward(self: Arc<Self>, c: Connect) {
        let authority = c.request.uri().to_string();
        let header = |name: &str| {
            c.request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        self.seen.lock().unwrap().push(Seen {
            authority: authority.clone(),
            peer: c.peer_identity.clone(),
            forwarded: header("forwarded"),
            traceparent: !header("traceparent").is_empty(),
        });
        let Ok(mut dst) = authority.parse::<SocketAddr>() else {
            return c.refuse(StatusCode::BAD_REQUEST, "authority is not ip:port");
        };
        if dst == self.vip {
            dst = self.server;
        }
        let key = PoolKey {
            src: id("waypoint"),
            dst: vec![id("server")],
            addr: SocketAddr::new(dst.ip(), self.hbone_port),
            src_ip: Some(self.from),
        };
        let upstream = match self.pool.connect(&key, connect_req(&dst.to_string())).await {
            Ok(s) => s,
            Err(e) => return c.refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        };
        let Ok(stream) = c.accept() else { return };
        let mut down = StreamIo::new(stream);
        let mut up = upstream.into_io();
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    }
}

struct WaypointMesh {
    mesh: TestMesh,
    a: Ztunnel,
    b: Ztunnel,
    _echo: Vec<tokio::task::JoinHandle<()>>,
}

impl WaypointMesh {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Lets `edit` change the mesh description before the ztunnels read it.
    async fn with(edit: impl FnOnce(&mut String)) -> Self {
        let mesh = TestMesh::new();
        let mut yaml = mesh_yaml(&mesh);
        edit(&mut yaml);
        let path = mesh.write("mesh.yaml", &yaml);
        let a = mesh
            .ztunnel_with(mesh.config("node-a", path.clone()), mesh.ca.clone())
            .await;
        let b = mesh
            .ztunnel_with(mesh.config("node-b", path), mesh.ca.clone())
            .await;
        let echo = vec![
            echo_server(SocketAddr::new(mesh.ip(SERVER), 8080)).await,
            echo_server(SocketAddr::new(mesh.ip(SERVER2), 8080)).await,
        ];
        Self {
            mesh,
            a,
            b,
            _echo: echo,
        }
    }

    fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.mesh.ip(host), port)
    }

    async fn dial(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        socks_connect(self.a.addrs.socks5.unwrap(), self.mesh.ip(CLIENT), dst).await
    }
}

fn connect_req(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

/// Sends a little, half-closes, and checks the echo and the echo server's EOF marker.
async fn round_trip(mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) {
    s.write_all(b"through the waypoint").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the echo comes back")
        .unwrap();
    assert_eq!(got, [&b"through the waypoint"[..], EOF_MARKER].concat());
}

async fn metrics(z: &Ztunnel) -> String {
    http_get(z.addrs.metrics.unwrap(), "/metrics").await.1
}

/// Waits until `z`'s metrics have a line starting with `prefix` and containing every one of
/// `labels`, and returns it.
async fn metric_line(z: &Ztunnel, prefix: &str, labels: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(z).await;
        if let Some(l) = m
            .lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
        {
            return l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix} line with {labels:?} in:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_connection_to_a_service_with_a_waypoint_goes_through_the_waypoint() {
    let t = WaypointMesh::new().await;
    let waypoint = FakeWaypoint::start(&t.mesh, id("waypoint")).await;
    round_trip(t.dial(t.addr(ECHO_VIP, 80)).await.unwrap()).await;

    let seen = waypoint.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, t.addr(ECHO_VIP, 80).to_string());
    assert_eq!(seen[0].peer, id("client"));
    let for_client = format!("for=\"{}:", t.mesh.ip(CLIENT));
    assert!(
        seen[0].forwarded.starts_with(&for_client)
            && seen[0]
                .forwarded
                .ends_with(";host=echo.default.svc.cluster.local"),
        "{seen:?}"
    );
    assert!(seen[0].traceparent);

    // The client's ztunnel pooled a connection to the waypoint pod, expecting its identity.
    let pool = t.a.state().pool.stats();
    assert_eq!(pool.len(), 1, "{pool:?}");
    assert_eq!(pool[0].addr, t.addr(WAYPOINT, t.mesh.hbone_port));
    assert_eq!(
        pool[0].dst,
        vec!["spiffe://cluster.local/ns/default/sa/waypoint".to_string()]
    );
    metric_line(
        &t.a,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "destination_workload=\"waypoint\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/waypoint\"",
            "destination_service=\"echo.default.svc.cluster.local\"",
        ],
    )
    .await;
    // The server's ztunnel took the waypoint's connection and saw it as the waypoint's.
    metric_line(
        &t.b,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"waypoint\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/waypoint\"",
            "destination_workload=\"echo\"",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_connection_to_a_pod_with_a_waypoint_goes_through_it_and_names_the_pod() {
    let t = WaypointMesh::new().await;
    let waypoint = FakeWaypoint::start(&t.mesh, id("waypoint")).await;
    round_trip(t.dial(t.addr(SERVER, 8080)).await.unwrap()).await;
    let seen = waypoint.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, t.addr(SERVER, 8080).to_string());
    assert_eq!(seen[0].peer, id("client"));
    assert!(!seen[0].forwarded.contains("host="), "{seen:?}");

    // A pod behind the same service without a waypoint of its own is reached directly: the
    // service's waypoint is for traffic to the service.
    round_trip(t.dial(t.addr(SERVER2, 8080)).await.unwrap()).await;
    assert_eq!(waypoint.seen().len(), 1);
}

#[tokio::test]
async fn a_waypoint_that_presents_another_identity_is_refused() {
    let t = WaypointMesh::new().await;
    let _imposter = FakeWaypoint::start(&t.mesh, id("imposter")).await;
    let err =
        ztunnel::proxy::outbound::connect(t.a.state(), t.addr(CLIENT, 40000), t.addr(ECHO_VIP, 80))
            .await
            .err()
            .expect("the imposter must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("HBONE to waypoint pod default/waypoint")
            && msg.contains(
                "peer presented identity spiffe://cluster.local/ns/default/sa/imposter but expected spiffe://cluster.local/ns/default/sa/waypoint"
            ),
        "{msg}"
    );
    let e = t.dial(t.addr(ECHO_VIP, 80)).await.unwrap_err();
    assert!(e.to_string().contains("reply code 5"), "{e}");
}

#[tokio::test]
async fn a_waypoint_that_cannot_be_reached_fails_closed() {
    let t = WaypointMesh::with(|y| *y = y.replace("healthy: true", "healthy: false")).await;
    let waypoint = FakeWaypoint::start(&t.mesh, id("waypoint")).await;
    let connect = |dst| ztunnel::proxy::outbound::connect(t.a.state(), t.addr(CLIENT, 40000), dst);
    let msg = connect(t.addr(ECHO_VIP, 80))
        .await
        .err()
        .unwrap()
        .to_string();
    assert_eq!(msg, "waypoint default/waypoint has no ready endpoint");
    let msg = connect(t.addr(SERVER, 8080))
        .await
        .err()
        .unwrap()
        .to_string();
    assert_eq!(msg, "waypoint default/waypoint has no ready endpoint");
    let e = t.dial(t.addr(ECHO_VIP, 80)).await.unwrap_err();
    assert!(e.to_string().contains("reply code 4"), "{e}");

    // A waypoint address nothing in the mesh has.
    let store = &t.a.state().store;
    let snap = store.snapshot();
    let workloads = snap.workloads().map(|w| (**w).clone()).collect();
    let services = snap
        .services()
        .map(|s| {
            let mut s = (**s).clone();
            if let Some(gw) = &mut s.waypoint {
                gw.destination = ztunnel::state::GatewayDestination::Address(t.mesh.ip(99));
            }
            s
        })
        .collect();
    store.replace(Snapshot::new(workloads, services));
    let msg = connect(t.addr(ECHO_VIP, 80))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "waypoint {} is not a known service or workload",
            t.mesh.ip(99)
        )),
        "{msg}"
    );

    // Nothing went around the waypoint, and every refusal is counted by why.
    assert!(waypoint.seen().is_empty());
    let m = metrics(&t.a).await;
    for (reason, n) in [("no_healthy_waypoint", 3), ("unknown_waypoint", 1)] {
        let line = format!(
            "ztunnel_connections_refused_total{{direction=\"outbound\",reason=\"{reason}\"}} {n}"
        );
        assert!(m.contains(&line), "{line} missing in:\n{m}");
    }
}

async fn status_of(send: &h2::client::SendRequest<Bytes>, authority: &str) -> (StatusCode, String) {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(connect_req(authority), false).unwrap();
    let resp = resp.await.unwrap();
    let reason = resp
        .headers()
        .get(hbone::REASON_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status(), reason)
}

#[tokio::test]
async fn a_workload_with_a_waypoint_accepts_connections_only_from_the_waypoint() {
    let t = WaypointMesh::new().await;
    let server = t.addr(SERVER, t.mesh.hbone_port).to_string();
    let server_app = t.addr(SERVER, 8080).to_string();

    // Straight to the server's ztunnel as the client: refused, naming the waypoint.
    let client = issue(&t.mesh.ca, &id("client"));
    let send = h2_connect(&client, id("server"), server.parse().unwrap())
        .await
        .unwrap();
    let (status, why) = status_of(&send, &server_app).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        why.starts_with(
            "traffic to default/server must pass through waypoint default/waypoint; spiffe://cluster.local/ns/default/sa/client from "
        ),
        "{why}"
    );

    // The waypoint's identity from an address that is not the waypoint pod's: refused too.
    let stolen = issue(&t.mesh.ca, &id("waypoint"));
    let send = h2_connect(&stolen, id("server"), server.parse().unwrap())
        .await
        .unwrap();
    let (status, why) = status_of(&send, &server_app).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");

    // The waypoint pod itself: accepted, and the bytes reach the app.
    let certs = CertManager::new(t.mesh.ca.clone(), Duration::from_secs(3600));
    let pool = Pool::new(PoolConfig::default(), certs, Dialer::default());
    let as_waypoint = PoolKey {
        src: id("waypoint"),
        dst: vec![id("server")],
        addr: server.parse().unwrap(),
        src_ip: Some(t.mesh.ip(WAYPOINT)),
    };
    let stream = pool
        .connect(&as_waypoint, connect_req(&server_app))
        .await
        .unwrap();
    round_trip(stream.into_io()).await;

    // A pod without a waypoint of its own still takes the client directly, although its
    // service has one: nothing in a connection to a pod address says the service was meant.
    let direct = pool
        .connect(
            &PoolKey {
                src: id("client"),
                dst: vec![id("server")],
                addr: t.addr(SERVER2, t.mesh.hbone_port),
                src_ip: Some(t.mesh.ip(CLIENT)),
            },
            connect_req(&t.addr(SERVER2, 8080).to_string()),
        )
        .await
        .unwrap();
    round_trip(direct.into_io()).await;

    // Both refusals are counted, logged for `ambient explain` and kept in the config dump.
    let m = metrics(&t.b).await;
    assert!(
        m.contains(
            "ztunnel_connections_refused_total{direction=\"inbound\",reason=\"waypoint_bypassed\"} 2"
        ),
        "{m}"
    );
    let (_, body) = http_get(t.b.addrs.admin.unwrap(), "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let denials = dump["recentDenials"].as_array().unwrap();
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert_eq!(denials[0]["policy"], "waypoint default/waypoint");
    assert_eq!(denials[0]["workload"], "default/server");
    assert_eq!(
        denials[0]["sourceIdentity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(denials[0]["destination"], server_app);
    // And the config dump shows where each waypoint is.
    let server_wl = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "server")
        .unwrap();
    assert_eq!(
        server_wl["waypoint"]["hostname"]["hostname"],
        "waypoint.default.svc.cluster.local"
    );
}

#[tokio::test]
async fn giving_a_workload_a_waypoint_closes_connections_that_went_around_it() {
    let t = WaypointMesh::new().await;
    let certs = CertManager::new(t.mesh.ca.clone(), Duration::from_secs(3600));
    let pool = Pool::new(PoolConfig::default(), certs, Dialer::default());
    let key = PoolKey {
        src: id("client"),
        dst: vec![id("server")],
        addr: t.addr(SERVER2, t.mesh.hbone_port),
        src_ip: Some(t.mesh.ip(CLIENT)),
    };
    let mut open = pool
        .connect(&key, connect_req(&t.addr(SERVER2, 8080).to_string()))
        .await
        .unwrap()
        .into_io();
    open.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    open.read_exact(&mut buf).await.unwrap();

    // server2 gets the waypoint too.
    let yaml = mesh_yaml(&t.mesh).replace(
        "labels: {app: echo}}",
        &format!(
            "labels: {{app: echo}}, waypoint: {{service: waypoint, hbonePort: {}}}}}",
            t.mesh.hbone_port
        ),
    );
    t.mesh.write("mesh.yaml", &yaml);
    let mut rest = Vec::new();
    // Closed by the server's ztunnel (the echo app never saw a FIN, so it sent nothing more).
    let _ = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
        .await
        .expect("the connection is closed once the waypoint applies");
    assert!(rest.is_empty(), "{rest:?}");
    let (_, body) = http_get(t.b.addrs.admin.unwrap(), "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let denial = &dump["recentDenials"][0];
    assert_eq!(denial["policy"], "waypoint default/waypoint");
    assert_eq!(denial["workload"], "default/server2");
    assert!(
        denial["reason"]
            .as_str()
            .unwrap()
            .starts_with("closed after a config change: traffic to default/server2 must pass through waypoint default/waypoint"),
        "{denial}"
    );
}

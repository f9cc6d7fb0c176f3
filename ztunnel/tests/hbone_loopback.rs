//! client → ztunnel A (SOCKS5) → HBONE → ztunnel B → server, on loopback, with real sockets
//! and real mTLS.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_core::SpiffeId;
use mesh_core::devca::DevCa;
use mesh_core::testing::{h2_connect, issue, issue_trusting};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::Ztunnel;
use ztunnel::testing::{EOF_MARKER, TestMesh, echo_server, http_get, socks_connect};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

struct TwoNodes {
    mesh: TestMesh,
    a: Ztunnel,
    b: Ztunnel,
    _echo: Vec<tokio::task::JoinHandle<()>>,
}

impl TwoNodes {
    async fn new() -> Self {
        let mesh = TestMesh::new();
        let a = mesh.ztunnel("node-a").await;
        let b = mesh.ztunnel("node-b").await;
        let echo = vec![
            echo_server(SocketAddr::new(mesh.ip(20), 8080)).await,
            echo_server(SocketAddr::new(mesh.ip(21), 8080)).await,
        ];
        Self {
            mesh,
            a,
            b,
            _echo: echo,
        }
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.mesh.ip(200), 80)
    }

    async fn dial(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        socks_connect(self.a.addrs.socks5.unwrap(), self.mesh.ip(10), dst).await
    }

    async fn metrics(z: &Ztunnel) -> String {
        http_get(z.addrs.metrics.unwrap(), "/metrics").await.1
    }
}

/// Writes `len` patterned bytes, half-closes, and checks the echo plus the EOF marker.
async fn round_trip(mut s: TcpStream, len: usize) {
    let pattern = |i: usize| (i % 251) as u8;
    let (mut r, mut w) = s.split();
    let writer = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = buf.len().min(len - sent);
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + j);
            }
            w.write_all(&buf[..n]).await.unwrap();
            sent += n;
        }
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = 0usize;
        let mut tail = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if got < len {
                    assert_eq!(b, pattern(got), "byte {got} corrupted");
                    got += 1;
                } else {
                    tail.push(b);
                }
            }
        }
        assert_eq!(got, len, "short echo");
        assert_eq!(tail, EOF_MARKER, "server did not see our half-close");
    };
    tokio::join!(writer, reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_both_ways_with_half_close() {
    let t = TwoNodes::new().await;
    for len in [1, 64 * 1024, 100 * 1024 * 1024] {
        let s = t.dial(t.vip()).await.unwrap();
        round_trip(s, len).await;
    }
    // Direct to a pod address as well as through the service VIP.
    let s = t.dial(SocketAddr::new(t.mesh.ip(21), 8080)).await.unwrap();
    round_trip(s, 10).await;

    // Records are written as each connection closes, just after the client sees EOF.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mb = loop {
        let m = TwoNodes::metrics(&t.b).await;
        let closed = m
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>();
        if closed == 4 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dst_line = |name: &str| {
        mb.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains("reporter=\"destination\"")
                    && l.contains(
                        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
                    )
                    && l.contains(
                        "destination_principal=\"spiffe://cluster.local/ns/default/sa/server\"",
                    )
                    && l.contains("source_workload=\"client\"")
                    && l.contains("destination_workload=\"echo\"")
                    && l.contains("destination_workload_namespace=\"default\"")
                    && l.contains("destination_service=\"echo.default.svc.cluster.local\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
            .unwrap_or_else(|| panic!("no {name} line with the expected labels in:\n{mb}"))
            .to_owned()
    };
    let value = |line: String| -> u64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    assert_eq!(value(dst_line("istio_tcp_connections_opened_total")), 3);
    assert_eq!(value(dst_line("istio_tcp_connections_closed_total")), 3);
    let total = 1 + 64 * 1024 + 100 * 1024 * 1024;
    assert_eq!(value(dst_line("istio_tcp_sent_bytes_total")), total as u64);
    assert_eq!(
        value(dst_line("istio_tcp_received_bytes_total")),
        (total + 3 * EOF_MARKER.len()) as u64
    );

    let ma = TwoNodes::metrics(&t.a).await;
    let source_opened = |dst_workload: &str, service: &str, n: u64| {
        ma.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("destination_workload=\"{dst_workload}\""))
                && l.contains(&format!("destination_service=\"{service}\""))
                && l.ends_with(&format!(" {n}"))
        })
    };
    assert!(
        source_opened("echo", "echo.default.svc.cluster.local", 3),
        "source-side metrics for the VIP connections missing:\n{ma}"
    );
    assert!(
        source_opened("server2", "unknown", 1),
        "source-side metrics for the direct pod connection missing:\n{ma}"
    );
}

#[tokio::test]
async fn config_dump_and_readiness_answer() {
    let t = TwoNodes::new().await;
    let s = t.dial(t.vip()).await.unwrap();
    round_trip(s, 100).await;
    let (status, body) = http_get(t.b.addrs.readiness.unwrap(), "/healthz/ready").await;
    assert_eq!(status, 200);
    assert_eq!(body, "ready\n");
    let (status, body) = http_get(t.b.addrs.admin.unwrap(), "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["node"], "node-b");
    assert_eq!(
        dump["localWorkloads"],
        serde_json::json!([
            "local//v1/Pod/default/server",
            "local//v1/Pod/default/server2"
        ])
    );
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert_eq!(dump["certificates"][0]["state"], "Valid");
    assert_eq!(
        dump["listeners"]["inboundHbone"].as_array().unwrap().len(),
        2
    );
    let (_, body) = http_get(t.a.addrs.admin.unwrap(), "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["pool"][0]["src"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(dump["pool"][0]["connections"][0]["dead"], false);
}

/// A refusal must leave the proxy serving everyone else.
async fn still_serving(t: &TwoNodes) {
    let s = t
        .dial(t.vip())
        .await
        .expect("proxy still serves after a refusal");
    round_trip(s, 1000).await;
}

/// Starts node A with the standard mesh and node B from `b_yaml` signed by `b_ca`, then asks A
/// for a connection from the client to the server pod and returns why it was refused.
async fn refused_by_a(
    mesh: &TestMesh,
    b_yaml: &str,
    b_ca: Arc<DevCa>,
) -> (Ztunnel, Ztunnel, String) {
    let a_cfg = mesh.write("a.yaml", &mesh.default_yaml());
    let b_cfg = mesh.write("b.yaml", b_yaml);
    let a = mesh
        .ztunnel_with(mesh.config("node-a", a_cfg), mesh.ca.clone())
        .await;
    let b = mesh.ztunnel_with(mesh.config("node-b", b_cfg), b_ca).await;
    let result = ztunnel::proxy::outbound::connect(
        a.state(),
        SocketAddr::new(mesh.ip(10), 40000),
        SocketAddr::new(mesh.ip(20), 8080),
    )
    .await;
    let Err(err) = result else {
        panic!("the connection must be refused");
    };
    (a, b, err.to_string())
}

#[tokio::test]
async fn refuses_a_peer_from_another_root() {
    let mesh = TestMesh::new();
    let other_root = Arc::new(DevCa::generate().unwrap());
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let (_a, b, msg) = refused_by_a(&mesh, &mesh.default_yaml(), other_root.clone()).await;
    assert!(
        msg.contains("TLS handshake") && msg.contains("invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );

    // And B refuses a client certificate from A's root, even from a client that trusts B.
    let cert = issue_trusting(&mesh.ca, &id("client"), &other_root);
    let server = SocketAddr::new(mesh.ip(20), mesh.hbone_port);
    let refused = match h2_connect(&cert, id("server"), server).await {
        Err(_) => true,
        // TLS 1.3 lets the client finish before the server has checked its certificate; the
        // refusal then arrives as the connection closing.
        Ok(send) => match send.ready().await {
            Err(_) => true,
            Ok(mut ready) => {
                let (resp, _s) = ready
                    .send_request(connect_req(&format!("{}:8080", mesh.ip(20))), false)
                    .unwrap();
                resp.await.is_err()
            }
        },
    };
    assert!(refused, "B accepted a client from another root");
    let m = http_get(b.addrs.metrics.unwrap(), "/metrics").await.1;
    assert!(
        m.contains(
            "ztunnel_connections_refused_total{direction=\"inbound\",reason=\"handshake_failed\"} 2"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn refuses_a_peer_with_the_wrong_identity() {
    let mesh = TestMesh::new();
    // A expects the server pod to run as sa/server; B actually runs it as sa/imposter.
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let (a, _b, msg) = refused_by_a(
        &mesh,
        &mesh.yaml_with_server_sa("imposter"),
        mesh.ca.clone(),
    )
    .await;
    assert!(
        msg.contains("peer presented identity spiffe://cluster.local/ns/default/sa/imposter but expected spiffe://cluster.local/ns/default/sa/server"),
        "{msg}"
    );
    // Through SOCKS the client sees a refusal, not a hang.
    let e = socks_connect(
        a.addrs.socks5.unwrap(),
        mesh.ip(10),
        SocketAddr::new(mesh.ip(20), 8080),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("reply code 5"), "{e}");
}

fn connect_req(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

async fn status_of(
    send: &mut h2::client::SendRequest<Bytes>,
    req: Request<()>,
) -> (StatusCode, String) {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    let reason = resp
        .headers()
        .get("x-mesh-reason")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status(), reason)
}

#[tokio::test]
async fn refuses_bad_connect_requests_with_clear_statuses() {
    let t = TwoNodes::new().await;
    let cert = issue(&t.mesh.ca, &id("client"));
    let server = SocketAddr::new(t.mesh.ip(20), t.mesh.hbone_port);
    let mut send = h2_connect(&cert, id("server"), server).await.unwrap();
    let ip = |h| t.mesh.ip(h);

    // An address this ztunnel does not serve.
    let (s, why) = status_of(&mut send, connect_req(&format!("{}:8080", ip(99)))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(why.contains("no workload at"), "{why}");

    // A workload it serves, but not the one this connection arrived for.
    let (s, why) = status_of(&mut send, connect_req(&format!("{}:8080", ip(21)))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("does not match"), "{why}");

    // Malformed authority.
    let (s, why) = status_of(&mut send, connect_req("echo.default:8080")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("not ip:port"), "{why}");

    // Not CONNECT.
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}:8080/", ip(20)))
        .body(())
        .unwrap();
    let (s, _) = status_of(&mut send, get).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Oversized headers (the limit is 16 KiB).
    let mut big = connect_req(&format!("{}:8080", ip(20)));
    big.headers_mut()
        .insert("x-big", "a".repeat(20 * 1024).parse().unwrap());
    let (s, _) = status_of(&mut send, big).await;
    assert_eq!(s, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // A port nothing listens on: 503 only after the upstream connect fails.
    let (s, why) = status_of(&mut send, connect_req(&format!("{}:1", ip(20)))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(why.contains("connecting to"), "{why}");

    // The same connection still carries a good request.
    let (s, _) = status_of(&mut send, connect_req(&format!("{}:8080", ip(20)))).await;
    assert_eq!(s, StatusCode::OK);
    still_serving(&t).await;

    let m = TwoNodes::metrics(&t.b).await;
    assert!(
        m.contains(
            "ztunnel_connections_refused_total{direction=\"inbound\",reason=\"bad_request\"} 3"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_tls_is_dropped() {
    let t = TwoNodes::new().await;
    let mut idle = TcpStream::connect(SocketAddr::new(t.mesh.ip(20), t.mesh.hbone_port))
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("server must drop a stalled handshake, not hold it forever");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // Handshake timeout in tests is 500 ms.
    assert!(start.elapsed() < Duration::from_secs(3));
    still_serving(&t).await;
}

#[tokio::test]
async fn refuses_unknown_sources_and_loops() {
    let t = TwoNodes::new().await;
    // A source address that is not a local workload.
    let e = socks_connect(t.a.addrs.socks5.unwrap(), t.mesh.ip(77), t.vip())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reply code 2"), "{e}");
    // ztunnel's own listener as destination.
    let e = t.dial(t.a.addrs.socks5.unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("reply code 2"), "{e}");
    // A service port the service does not expose.
    let e = t
        .dial(SocketAddr::new(t.mesh.ip(200), 81))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reply code 4"), "{e}");
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_share_a_few_pooled_connections() {
    let t = Arc::new(TwoNodes::new().await);
    let n = 1000;
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let t = t.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = t
                .dial(t.vip())
                .await
                .unwrap_or_else(|e| panic!("conn {i}: {e}"));
            let msg = format!("hello {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg.as_bytes());
            // Hold every connection open at once.
            barrier.wait().await;
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, EOF_MARKER);
        }));
    }
    barrier.wait().await;
    let pool = t.a.state().pool.stats();
    assert_eq!(pool.len(), 1, "one key: client → server");
    let conns = &pool[0].connections;
    let streams: usize = conns.iter().map(|c| c.active_streams).sum();
    assert_eq!(streams, n, "every connection holds a stream: {conns:?}");
    assert!(conns.iter().all(|c| c.active_streams <= 100));
    assert!(
        (10..=12).contains(&conns.len()),
        "expected ~10 pooled connections for 1000 streams, got {}",
        conns.len()
    );
    for task in tasks {
        task.await.unwrap();
    }
    // The proxy finishes its side of each connection just after the client sees EOF; under a
    // loaded test run that can take a moment for a thousand of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.a.state().active_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "connections still active after close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = t.a.state().pool.stats();
    for c in &pool[0].connections {
        assert_eq!(c.active_streams, 0);
        assert!(!c.dead, "dead connection left in the pool");
    }
}

#[tokio::test]
async fn connections_to_a_dead_peer_leave_the_pool() {
    let mesh = TestMesh::new();
    let a = mesh.ztunnel("node-a").await;
    let b = mesh.ztunnel("node-b").await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let socks = a.addrs.socks5.unwrap();
    let dst = SocketAddr::new(mesh.ip(20), 8080);
    round_trip(socks_connect(socks, mesh.ip(10), dst).await.unwrap(), 10).await;
    assert_eq!(a.state().pool.stats().len(), 1);

    b.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !a.state().pool.stats().is_empty() {
        assert!(Instant::now() < deadline, "dead connection still pooled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With B gone, a new connection fails cleanly rather than using a stale one.
    let e = socks_connect(socks, mesh.ip(10), dst).await.unwrap_err();
    assert!(e.to_string().contains("reply code 5"), "{e}");

    // B comes back: traffic flows again over a fresh connection.
    let _b = mesh.ztunnel("node-b").await;
    round_trip(socks_connect(socks, mesh.ip(10), dst).await.unwrap(), 10).await;
}

#[tokio::test]
async fn an_upstream_reset_reaches_the_client_as_a_reset_not_an_end() {
    let t = TwoNodes::new().await;
    // A server that reads a little, then aborts the connection (RST).
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(t.mesh.ip(20), 9090))
        .await
        .unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let mut s = t.dial(SocketAddr::new(t.mesh.ip(20), 9090)).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the reset must arrive promptly");
    let e = r.expect_err("a reset upstream must not look like a clean end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    still_serving(&t).await;
}

#[tokio::test]
async fn a_draining_peer_finishes_streams_in_flight() {
    let mesh = TestMesh::new();
    let a = mesh.ztunnel("node-a").await;
    let path = mesh.write("mesh.yaml", &mesh.default_yaml());
    let mut b_cfg = mesh.config("node-b", path);
    b_cfg.drain_timeout = Duration::from_secs(5);
    let b = mesh.ztunnel_with(b_cfg, mesh.ca.clone()).await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let socks = a.addrs.socks5.unwrap();
    let dst = SocketAddr::new(mesh.ip(20), 8080);

    let mut held = socks_connect(socks, mesh.ip(10), dst).await.unwrap();
    held.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();

    // B starts draining: it sends GOAWAY and stops accepting.
    let draining = tokio::spawn(b.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A new connection meanwhile must not disturb the one in flight.
    let _ = socks_connect(socks, mesh.ip(10), dst).await;

    held.write_all(b"during").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, EOF_MARKER);
    tokio::time::timeout(Duration::from_secs(3), draining)
        .await
        .expect("B finishes draining once its last stream is done")
        .unwrap();
}

#[tokio::test]
async fn a_client_cannot_invent_service_labels() {
    let t = TwoNodes::new().await;
    let cert = issue(&t.mesh.ca, &id("client"));
    let server = SocketAddr::new(t.mesh.ip(20), t.mesh.hbone_port);
    let mut send = h2_connect(&cert, id("server"), server).await.unwrap();
    let mut req = connect_req(&format!("{}:8080", t.mesh.ip(20)));
    req.headers_mut().insert(
        "forwarded",
        "for=\"1.2.3.4:5\";host=made-up.example".parse().unwrap(),
    );
    let (s, _) = status_of(&mut send, req).await;
    assert_eq!(s, StatusCode::OK);
    let m = TwoNodes::metrics(&t.b).await;
    assert!(!m.contains("made-up.example"), "{m}");
    assert!(m.contains("destination_service=\"unknown\""), "{m}");
}

/// Sends raw bytes to the SOCKS5 port from the client workload's address and returns what came
/// back before the proxy closed the connection.
async fn raw_socks(t: &TwoNodes, bytes: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(t.mesh.ip(10), 0)).unwrap();
    let mut s = socket.connect(t.a.addrs.socks5.unwrap()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy must answer or close, not hang");
    out
}

#[tokio::test]
async fn malformed_socks_requests_are_refused_cleanly() {
    let t = TwoNodes::new().await;
    let vip = t.mesh.ip(200).to_string();
    let octets: Vec<u8> = vip.split('.').map(|o| o.parse().unwrap()).collect();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("SOCKS4", vec![4, 1, 0, 80, 127, 0, 0, 1, 0], vec![]),
        ("no methods we support", vec![5, 1, 2], vec![5, 0xff]),
        ("truncated greeting", vec![5, 3, 0], vec![]),
        (
            "BIND instead of CONNECT",
            [vec![5, 1, 0, 5, 2, 0, 1], octets.clone(), vec![0, 80]].concat(),
            vec![5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        (
            "unknown address type",
            vec![5, 1, 0, 5, 1, 0, 9, 1, 2, 3],
            vec![5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        (
            "name that is not a mesh service",
            [
                vec![5, 1, 0, 5, 1, 0, 3, 11],
                b"example.com".to_vec(),
                vec![0, 80],
            ]
            .concat(),
            vec![5, 0, 5, 4, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        (
            "truncated request",
            vec![5, 1, 0, 5, 1, 0, 1, 127],
            vec![5, 0],
        ),
    ];
    for (what, request, expected) in cases {
        assert_eq!(raw_socks(&t, &request).await, expected, "{what}");
    }
    // A mesh service by name works.
    let name = b"echo.default.svc.cluster.local";
    let mut req = vec![5, 1, 0, 5, 1, 0, 3, name.len() as u8];
    req.extend_from_slice(name);
    req.extend_from_slice(&80u16.to_be_bytes());
    let reply = raw_socks(&t, &req).await;
    assert_eq!(&reply[..4], &[5, 0, 5, 0], "{reply:?}");
    assert!(reply.ends_with(EOF_MARKER), "{reply:?}");
    still_serving(&t).await;
}

#[tokio::test]
async fn a_workload_address_that_cannot_be_bound_is_reported_and_others_still_served() {
    let mesh = TestMesh::new();
    // 198.18.250.1 is not configured on this host, so its listener cannot be opened. Nothing is
    // sent to it.
    let yaml = mesh.default_yaml().replace(
        "services:",
        "  - {name: ghost, node: node-b, addresses: [198.18.250.1]}\nservices:",
    );
    let path = mesh.write("mesh.yaml", &yaml);
    let a = mesh
        .ztunnel_with(mesh.config("node-a", path.clone()), mesh.ca.clone())
        .await;
    let b = mesh
        .ztunnel_with(mesh.config("node-b", path), mesh.ca.clone())
        .await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;

    let failures = b.bind_failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].workload, "default/ghost");
    assert_eq!(
        failures[0].addr,
        SocketAddr::new("198.18.250.1".parse().unwrap(), mesh.hbone_port)
    );
    let (_, dump) = http_get(b.addrs.admin.unwrap(), "/config_dump").await;
    assert!(dump.contains("198.18.250.1"), "{dump}");
    let s = socks_connect(
        a.addrs.socks5.unwrap(),
        mesh.ip(10),
        SocketAddr::new(mesh.ip(200), 80),
    )
    .await
    .unwrap();
    round_trip(s, 100).await;
}

#[tokio::test]
async fn a_client_and_server_on_the_same_node_still_talk_hbone() {
    let mesh = TestMesh::new();
    let yaml = mesh.default_yaml().replace(
        "services:",
        &format!(
            "  - {{name: neighbour, serviceAccount: neighbour, node: node-b, addresses: [{}]}}\nservices:",
            mesh.ip(11)
        ),
    );
    let path = mesh.write("mesh.yaml", &yaml);
    let b = mesh
        .ztunnel_with(mesh.config("node-b", path), mesh.ca.clone())
        .await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let s = socks_connect(
        b.addrs.socks5.unwrap(),
        mesh.ip(11),
        SocketAddr::new(mesh.ip(200), 80),
    )
    .await
    .unwrap();
    round_trip(s, 64 * 1024).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = http_get(b.addrs.metrics.unwrap(), "/metrics").await.1;
        let seen = m.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/neighbour\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no mTLS record on the node:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

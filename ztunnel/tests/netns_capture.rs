//! End to end in network namespaces: two nodes joined by a veth link, the client's traffic
//! captured by nftables into ztunnel's outbound listener (original destination recovered with
//! SO_ORIGINAL_DST), carried over HBONE, and a plaintext client from outside the mesh redirected
//! into the inbound plaintext listener. Runs the real ztunnel binary. Needs root.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::testing::netns::{Netns, require_root_tools, run};
use ztunnel::testing::{EOF_MARKER, echo_server, http_get};

const CLIENT: &str = "198.18.0.1";
const SERVER: &str = "198.18.0.2";
const LEGACY: &str = "198.18.0.5";
const VIP: &str = "198.18.100.1";

const MESH: &str = r#"workloads:
  - {name: client, serviceAccount: client, node: node-a, addresses: [198.18.0.1], labels: {app: client}}
  - {name: legacy, node: node-a, protocol: TCP, addresses: [198.18.0.5]}
  - {name: echo, serviceAccount: echo, node: node-b, addresses: [198.18.0.2], labels: {app: echo}}
services:
  - {name: echo, addresses: [198.18.100.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}}
"#;

/// Outbound TCP from the node goes to ztunnel, except ztunnel's own (marked) sockets, loopback,
/// and the workload that is not in the mesh.
const CAPTURE_OUTBOUND: &str = "table ip mesh {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark 0x539 return
    ip daddr 127.0.0.0/8 return
    ip saddr 198.18.0.5 return
    meta l4proto tcp redirect to :15001
  }
}";

/// Inbound TCP that is not HBONE goes to ztunnel's plaintext listener.
const CAPTURE_INBOUND: &str = "table ip mesh {
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
}";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

async fn round_trip(mut s: TcpStream, payload: &[u8]) {
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, [payload, EOF_MARKER].concat());
}

#[test]
fn captured_traffic_crosses_nodes_over_hbone() {
    require_root_tools();
    let tag = std::process::id() % 100_000;
    let a = Netns::create(&format!("zt{tag}a"));
    let b = Netns::create(&format!("zt{tag}b"));
    let (va, vb) = (format!("zt{tag}va"), format!("zt{tag}vb"));
    run(
        "ip",
        &[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ],
    );
    a.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", &va]);
    a.ip(&["addr", "add", &format!("{LEGACY}/24"), "dev", &va]);
    b.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &vb]);
    a.ip(&["link", "set", &va, "up"]);
    b.ip(&["link", "set", &vb, "up"]);
    // Service VIPs are routed towards the other node; the capture rule takes them first.
    a.ip(&["route", "add", "198.18.100.0/24", "dev", &va]);
    a.nft(CAPTURE_OUTBOUND);
    b.nft(CAPTURE_INBOUND);

    let dir = std::env::temp_dir().join(format!("zt-netns-{tag}-{}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, MESH).unwrap();
    let ztunnel = |ns: &Netns, node: &str| {
        let child = ns
            .command(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["--node", node, "--config"])
            .arg(&config)
            .arg("--dev-ca-dir")
            .arg(dir.join("ca"))
            .args(["--inbound-plaintext", "0.0.0.0:15006", "--socks5", "off"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ztunnel starts");
        Killed(child)
    };
    let _za = ztunnel(&a, "node-a");
    let _zb = ztunnel(&b, "node-b");
    for ns in [&a, &b] {
        ns.block_on(|| async {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if TcpStream::connect("127.0.0.1:15021").await.is_ok() {
                    let (status, _) = http_get(addr("127.0.0.1", 15021), "/healthz/ready").await;
                    if status == 200 {
                        return;
                    }
                }
                assert!(Instant::now() < deadline, "ztunnel never became ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    b.spawn(|| async {
        let _server = echo_server(addr(SERVER, 8080)).await;
        std::future::pending::<()>().await;
    });
    std::thread::sleep(Duration::from_millis(200));

    // An unmodified client: it connects to the service VIP and to the pod address, knowing
    // nothing of the mesh.
    a.block_on(|| async {
        for dst in [addr(VIP, 80), addr(SERVER, 8080)] {
            let s = TcpStream::connect(dst)
                .await
                .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
            round_trip(s, format!("hello {dst}").as_bytes()).await;
        }
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        round_trip(TcpStream::connect(addr(VIP, 80)).await.unwrap(), &big).await;
        // A workload outside the mesh talks plain TCP; node B's capture sends it through the
        // inbound plaintext listener.
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(addr(LEGACY, 0)).unwrap();
        let s = sock.connect(addr(SERVER, 8080)).await.unwrap();
        round_trip(s, b"plain").await;
    });
    // Records are written as each connection closes: wait until node B has closed all four.
    let metrics_b = b.block_on(|| async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = http_get(addr("127.0.0.1", 15020), "/metrics").await.1;
            let closed: u64 = m
                .lines()
                .filter(|l| l.starts_with("istio_tcp_connections_closed_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if closed >= 4 || Instant::now() > deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let metrics_a = a.block_on(|| async { http_get(addr("127.0.0.1", 15020), "/metrics").await.1 });
    let has = |m: &str, needles: &[&str], value: &str| {
        m.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && needles.iter().all(|n| l.contains(n))
                && l.ends_with(value)
        })
    };
    assert!(
        has(
            &metrics_b,
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"",
                "destination_service=\"echo.default.svc.cluster.local\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
            " 2"
        ),
        "node B did not record the two mTLS connections to the service:\n{metrics_b}"
    );
    assert!(
        has(
            &metrics_b,
            &[
                "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
                "destination_service=\"unknown\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
            " 1"
        ),
        "node B did not record the mTLS connection to the pod address:\n{metrics_b}"
    );
    assert!(
        has(
            &metrics_b,
            &[
                "reporter=\"destination\"",
                "source_workload=\"legacy\"",
                "connection_security_policy=\"unknown\"",
            ],
            " 1"
        ),
        "node B did not record the plaintext connection:\n{metrics_b}"
    );
    assert!(
        has(
            &metrics_a,
            &[
                "reporter=\"source\"",
                "destination_service=\"echo.default.svc.cluster.local\""
            ],
            " 2"
        ),
        "node A did not record the captured connections:\n{metrics_a}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

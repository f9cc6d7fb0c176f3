//! One structured access-log event per connection, on both sides, naming the client's proven
//! SPIFFE identity. Its own test binary: it installs the process-wide log subscriber.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::testing::{EOF_MARKER, TestMesh, echo_server, socks_connect};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_count(logs: &Captured) -> usize {
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .count()
}

#[tokio::test]
async fn both_sides_log_the_connection_with_identities_and_bytes() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .init();

    let mesh = TestMesh::new();
    let a = mesh.ztunnel("node-a").await;
    let _b = mesh.ztunnel("node-b").await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    let mut s = socks_connect(
        a.addrs.socks5.unwrap(),
        mesh.ip(10),
        SocketAddr::new(mesh.ip(200), 80),
    )
    .await
    .unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, [b"hello".as_slice(), EOF_MARKER].concat());
    // Each side logs as it finishes its part of the connection, just after the client's EOF.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while logs_count(&logs) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["target"] == "access")
        .collect();
    let side = |dir: &str| {
        events
            .iter()
            .find(|e| e["direction"] == dir)
            .unwrap_or_else(|| panic!("no {dir} access event in:\n{text}"))
    };
    let inbound = side("inbound");
    assert_eq!(inbound["message"], "connection complete");
    assert_eq!(
        inbound["src.identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(inbound["src.workload"], "default/client");
    assert_eq!(
        inbound["dst.identity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert_eq!(inbound["dst.addr"], format!("{}:8080", mesh.ip(20)));
    assert_eq!(inbound["dst.service"], "echo.default.svc.cluster.local");
    assert_eq!(inbound["bytes_sent"], 5);
    assert_eq!(inbound["bytes_recv"], 5 + EOF_MARKER.len());
    assert!(inbound["duration_ms"].is_u64());

    let outbound = side("outbound");
    assert_eq!(outbound["src.workload"], "default/client");
    assert_eq!(outbound["dst.workload"], "default/server");
    assert_eq!(outbound["bytes_sent"], 5);
    assert_eq!(events.len(), 2, "exactly one event per side:\n{text}");
}

//! A two-node mesh on loopback for integration tests and benches: a shared development CA,
//! a mesh description, ztunnels with every port picked by the kernel, an echo server and a
//! SOCKS5 client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::devca::DevCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{Config, Ztunnel};

pub mod netns;

/// What the echo server appends once it has seen the client's FIN, proving half-close works:
/// the client can still read after it stopped writing.
pub const EOF_MARKER: &[u8] = b"<server saw EOF>";

/// A scratch mesh in its own 127.x.y.0/24 block, so tests can run side by side.
pub struct TestMesh {
    pub dir: PathBuf,
    pub ca: Arc<DevCa>,
    pub net: [u8; 2],
    pub hbone_port: u16,
}

impl TestMesh {
    pub fn new() -> Self {
        let net = [fastrand::u8(1..=250), fastrand::u8(1..=250)];
        let dir = std::env::temp_dir().join(format!("ztunnel-test-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        Self {
            dir,
            ca: Arc::new(DevCa::generate().expect("CA generation works")),
            net,
            hbone_port: fastrand::u16(20000..60000),
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.net[0], self.net[1], host))
    }

    /// Client (sa client) on node-a at .10; server (sa server) on node-b at .20 and .21
    /// (two pods); service echo at VIP .200, port 80 → 8080.
    pub fn default_yaml(&self) -> String {
        self.yaml_with_server_sa("server")
    }

    pub fn yaml_with_server_sa(&self, sa: &str) -> String {
        format!(
            r#"workloads:
  - name: client
    serviceAccount: client
    node: node-a
    addresses: [{c}]
    labels: {{app: client}}
  - name: server
    serviceAccount: {sa}
    node: node-b
    addresses: [{s}]
    labels: {{app: echo}}
  - name: server2
    serviceAccount: {sa}
    node: node-b
    addresses: [{s2}]
services:
  - name: echo
    addresses: [{vip}]
    ports: [{{port: 80, targetPort: 8080}}]
    selector: {{app: echo}}
"#,
            c = self.ip(10),
            s = self.ip(20),
            s2 = self.ip(21),
            vip = self.ip(200),
        )
    }

    pub fn write(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, yaml).expect("temp dir is writable");
        path
    }

    /// Config for a ztunnel on `node` reading `config`, every listener on an ephemeral port.
    pub fn config(&self, node: &str, config: PathBuf) -> Config {
        let any: Option<SocketAddr> = Some("127.0.0.1:0".parse().expect("valid"));
        let mut cfg = Config::new(node, config);
        cfg.dev_ca_dir = None;
        cfg.outbound_addr = None;
        cfg.inbound_plaintext_addr = None;
        cfg.socks5_addr = any;
        cfg.admin_addr = any;
        cfg.metrics_addr = any;
        cfg.readiness_addr = any;
        cfg.hbone_port = self.hbone_port;
        cfg.socket_mark = None;
        cfg.config_poll = Duration::from_millis(50);
        cfg.handshake_timeout = Duration::from_millis(500);
        cfg.drain_timeout = Duration::from_millis(200);
        cfg
    }

    pub async fn ztunnel(&self, node: &str) -> Ztunnel {
        let path = self.write("mesh.yaml", &self.default_yaml());
        self.ztunnel_with(self.config(node, path), self.ca.clone())
            .await
    }

    pub async fn ztunnel_with(&self, cfg: Config, ca: Arc<DevCa>) -> Ztunnel {
        Ztunnel::start(cfg, ca).await.expect("ztunnel starts")
    }
}

impl Default for TestMesh {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An echo server: returns every byte, and after the client's FIN sends [`EOF_MARKER`] and
/// closes.
pub async fn echo_server(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.expect("echo address is free");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(EOF_MARKER).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

/// Opens a connection through SOCKS5 at `socks`, from `src_ip`, to `dst`. Fails with the
/// SOCKS reply code if the proxy refuses.
pub async fn socks_connect(
    socks: SocketAddr,
    src_ip: IpAddr,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src_ip, 0))?;
    let mut s = socket.connect(socks).await?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0]).await?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    if m != [5, 0] {
        return Err(std::io::Error::other(format!(
            "SOCKS method refused: {m:?}"
        )));
    }
    let mut req = vec![5, 1, 0];
    match dst {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 reply code {}",
            reply[1]
        )));
    }
    Ok(s)
}

/// Fetches `path` from an HTTP/1.1 endpoint; returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("endpoint is up");
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

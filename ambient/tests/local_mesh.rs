#![allow(clippy::unwrap_used)]
//! The local mesh end to end, as a user runs it: `ambient up` on a copy of
//! examples/local-mesh (network namespaces, in-pod capture, real binaries), then what a user
//! would check by hand: unmodified programs reach services by VIP and pod IP, the link
//! between nodes carries only TLS to 15008, a namespace outside the mesh talks plain TCP,
//! enrolment and release of running pods, a ztunnel restart, `status` and `ztunnel-config`
//! against golden files, and `down`. Needs root; one mesh per machine, so one test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ambient::netns;

mod common;

use common::{Mesh, ONE_MESH, wait_until};

/// What only this file's tests need of a mesh.
impl Mesh {
    /// `ambient exec POD -- ambient echo-client ARGS`, as a user types it (`ambient` on no
    /// PATH: exec finds itself).
    fn echo(&self, pod: &str, args: &[&str]) -> Output {
        let mut all = vec![
            "exec",
            pod,
            "--",
            "ambient",
            "echo-client",
            "--timeout",
            "5",
        ];
        all.extend_from_slice(args);
        self.cmd(&all)
    }

    fn echo_ok(&self, pod: &str, args: &[&str]) -> String {
        let out = self.echo(pod, args);
        assert!(
            out.status.success(),
            "echo-client {} from {pod} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dump(&self, node: &str) -> serde_json::Value {
        let (code, body) =
            netns::http_get(&format!("amb-n-{node}"), "127.0.0.1:15000", "/config_dump").unwrap();
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// Pods whose capture is complete: ztunnel holds them and their node agent has applied
    /// their redirection (the agent's view reaches the state file within a quarter second).
    fn captured(&self, node: &str) -> Vec<String> {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.state.join("state.json")).unwrap())
                .unwrap();
        let redirected = state["agents"][node]["captured"].clone();
        self.dump(node)["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "captured")
            .filter(|p| {
                redirected
                    .as_array()
                    .is_some_and(|r| r.iter().any(|uid| *uid == p["uid"]))
            })
            .map(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    fn expect_captured(&self, node: &str, want: &[&str]) {
        let got = self.captured(node);
        if got != want {
            let log = std::fs::read_to_string(self.state.join(format!("logs/ztunnel-{node}.log")))
                .unwrap_or_default();
            let state = std::fs::read_to_string(self.state.join("state.json")).unwrap_or_default();
            panic!(
                "{node} captures {got:?}, not {want:?}\npods: {}\nstate: {state}\nztunnel log:\n{log}",
                self.dump(node)["pods"]
            );
        }
    }

    fn set_legacy_label(&self, enrolled: bool) {
        let path = self.config.join("namespaces.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let from =
            "  name: legacy                          # not enrolled: plain TCP, not captured";
        let to = "  name: legacy\n  labels: {istio.io/dataplane-mode: ambient}";
        let text = if enrolled {
            assert!(text.contains(from));
            text.replace(from, to)
        } else {
            assert!(text.contains(to));
            text.replace(to, from)
        };
        std::fs::write(&path, text).unwrap();
    }

    /// Output normalised for golden files: the config directory and version numbers vary.
    fn normalised(&self, text: &str) -> String {
        let dir = self.config.display().to_string();
        let mut out = text.replace(&dir, "<DIR>");
        let mut cleaned = String::new();
        for line in out.lines() {
            if let Some(i) = line.find("config version ") {
                let rest: String = line[i + 15..]
                    .chars()
                    .skip_while(char::is_ascii_digit)
                    .collect();
                cleaned.push_str(&format!("{}config version N{rest}\n", &line[..i]));
            } else {
                cleaned.push_str(line);
                cleaned.push('\n');
            }
        }
        out = cleaned;
        out
    }

    /// Waits until `args`' output (normalised) equals the golden file, then checks it.
    fn golden(&self, args: &[&str], name: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/local_mesh")
            .join(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.normalised(&self.ok(args));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&path, &got).unwrap();
                return;
            }
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`ambient {}` differs from {}:\n--- want\n{want}--- got\n{got}",
                args.join(" "),
                path.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// An HTTP/1.1 keep-alive connection made from inside a pod: one request per call.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn open(pod_netns: &str, addr: &str) -> Self {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let s = netns::within(pod_netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self(s)
    }

    fn get(&mut self, path: &str) -> String {
        write!(self.0, "GET {path} HTTP/1.1\r\nhost: web\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(self.0.read(&mut byte).unwrap(), 1, "connection closed");
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("content-length");
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }
}

/// `ambient up --detach` on a fresh copy of examples/local-mesh.
fn start_mesh(tag: &str) -> Mesh {
    assert!(
        Command::new("tcpdump").arg("--version").output().is_ok(),
        "tcpdump is missing (scripts/setup.sh installs it)"
    );
    Mesh::start("local-mesh", tag)
}

#[test]
fn local_mesh_end_to_end() {
    let _turn = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start_mesh("e2e");
    let tmp = mesh.tmp.clone();
    mesh.expect_captured("node-a", &["shop/api-1", "shop/client"]);
    mesh.expect_captured("node-b", &["shop/web-1"]);

    // An unmodified client reaches the service by name (VIP) and the pod by IP, while the
    // link between the nodes is watched.
    let pcap = tmp.join("link.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            "amb-n-node-a",
            "tcpdump",
            "-Z",
            "root",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut line = [0u8; 1];
        let mut seen = Vec::new();
        let stderr = tcpdump.stderr.as_mut().unwrap();
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            assert_eq!(stderr.read(&mut line).unwrap(), 1, "tcpdump did not start");
            seen.push(line[0]);
        }
    }
    let secret = format!("secret-{}", fastrand::u64(..));
    let header = format!("x-payload: {secret}");
    for url in [
        "http://web.shop.svc.cluster.local/by-vip",
        "http://198.18.2.20:8080/by-pod-ip",
    ] {
        let body = mesh.echo_ok("shop/client", &["-H", &header, url]);
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["pod"], "web-1", "{body}");
        assert_eq!(reply["namespace"], "shop", "{body}");
        assert!(
            body.contains(&secret),
            "the echo server did not see the request: {body}"
        );
    }
    // gRPC to the API on node-a (same node) by VIP.
    let body = mesh.echo_ok(
        "shop/client",
        &["--grpc", "api.shop.svc.cluster.local:9090", "--data", "hi"],
    );
    assert!(body.contains("api-1"), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let raw = std::fs::read(&pcap).unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains(&secret),
        "application bytes are visible on the link between the nodes"
    );
    let read = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    let decoded = String::from_utf8_lossy(&read.stdout).into_owned();
    assert!(
        decoded.lines().any(|l| l.contains("198.18.2.20.15008:")),
        "no HBONE (port 15008) on the link ({} bytes captured; {}):\n{decoded}",
        raw.len(),
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(
        !decoded
            .lines()
            .any(|l| l.contains(".8080:") || l.contains(".80:")),
        "plain application traffic on the link:\n{decoded}"
    );

    mesh.golden(&["status"], "status-up.txt");
    mesh.golden(
        &["ztunnel-config", "workloads", "--node", "node-a"],
        "workloads-up.txt",
    );
    mesh.golden(
        &["ztunnel-config", "services", "--node", "node-a"],
        "services.txt",
    );

    // A namespace outside the mesh: plain TCP, not captured.
    let body = mesh.echo_ok(
        "legacy/batch",
        &["--tcp", "198.18.2.30:5432", "--data", "ping"],
    );
    assert!(body.contains("echo legacy/db-1"), "{body}");
    assert!(
        body.contains("from 198.18.1.100"),
        "the database saw someone else: {body}"
    );

    // Enrol `legacy` live, while a connection between pods it does not concern stays open.
    let mut held = KeepAlive::open("amb-p-shop.client", "198.18.100.10:80");
    assert!(held.get("/before").contains("web-1"));
    mesh.set_legacy_label(true);
    wait_until("legacy pods captured", Duration::from_secs(10), || {
        mesh.captured("node-a").contains(&"legacy/batch".to_owned())
            && mesh.captured("node-b").contains(&"legacy/db-1".to_owned())
    });
    // Captured now: the service VIP works (no kube-proxy here; only ztunnel resolves VIPs).
    let body = mesh.echo_ok(
        "legacy/batch",
        &["--tcp", "198.18.100.12:5432", "--data", "ping"],
    );
    assert!(body.contains("echo legacy/db-1"), "{body}");
    assert!(
        held.get("/during").contains("web-1"),
        "an unrelated connection broke"
    );
    mesh.golden(&["status"], "status-legacy-enrolled.txt");
    mesh.golden(
        &["ztunnel-config", "workloads", "--node", "node-b"],
        "workloads-legacy-enrolled.txt",
    );

    // Release it again.
    mesh.set_legacy_label(false);
    wait_until("legacy pods released", Duration::from_secs(10), || {
        !mesh.captured("node-b").contains(&"legacy/db-1".to_owned())
    });
    let body = mesh.echo_ok(
        "legacy/batch",
        &["--tcp", "198.18.2.30:5432", "--data", "ping"],
    );
    assert!(body.contains("echo legacy/db-1"), "{body}");
    assert!(
        held.get("/after").contains("web-1"),
        "an unrelated connection broke"
    );
    drop(held);

    // Restart node-b's ztunnel: new connections work within 2 s of it being ready.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mesh.state.join("state.json")).unwrap())
            .unwrap();
    let old = state["processes"]["ztunnel/node-b"].as_u64().unwrap();
    Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .unwrap();
    wait_until("node-b's ztunnel to go", Duration::from_secs(5), || {
        !matches!(
            netns::http_get("amb-n-node-b", "127.0.0.1:15021", "/healthz/ready"),
            Ok((200, _))
        )
    });
    wait_until(
        "node-b's ztunnel to be ready again",
        Duration::from_secs(30),
        || {
            matches!(
                netns::http_get("amb-n-node-b", "127.0.0.1:15021", "/healthz/ready"),
                Ok((200, _))
            )
        },
    );
    let ready_at = Instant::now();
    loop {
        let out = mesh.echo(
            "shop/client",
            &["http://web.shop.svc.cluster.local/after-restart"],
        );
        if out.status.success() {
            break;
        }
        assert!(
            ready_at.elapsed() < Duration::from_secs(2),
            "no connection within 2 s of the restarted ztunnel being ready: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    mesh.golden(&["status"], "status-after-restart.txt");

    // Down removes everything; a second down has nothing to do.
    let out = mesh.cmd(&["down"]);
    assert!(out.status.success());
    assert!(
        netns::list_ours().is_empty(),
        "namespaces left: {:?}",
        netns::list_ours()
    );
    let out = mesh.cmd(&["down"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to tear down"));
}

const WEB_FROM_SHOP_ONLY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [shop]}}]
";

const SHOP_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

/// Zero-trust L4 policy with real traffic: an ALLOW-from-namespace policy holds (and closes
/// an open connection it no longer allows), STRICT refuses plaintext from outside the mesh,
/// a client certificate from another root is refused, and `ambient explain` says why.
#[test]
fn policies_hold_for_real_traffic() {
    let _turn = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start_mesh("policy");
    let web = "http://198.18.2.20:8080/";

    // `legacy` is outside the mesh: its plaintext reaches web-1 through the inbound capture,
    // allowed while no policy says otherwise. Keep one such connection open.
    mesh.echo_ok("legacy/batch", &[web]);
    let mut held = KeepAlive::open("amb-p-legacy.batch", "198.18.2.20:8080");
    assert!(held.get("/before").contains("web-1"));

    std::fs::write(mesh.config.join("policy.yaml"), WEB_FROM_SHOP_ONLY).unwrap();
    wait_until(
        "the policy to reach node-b",
        Duration::from_secs(10),
        || {
            mesh.dump("node-b")["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "web-from-shop"))
        },
    );
    // The open connection is closed, a new one refused, the shop client still served.
    let mut buf = [0u8; 1];
    write!(held.0, "GET /after HTTP/1.1\r\nhost: web\r\n\r\n").ok();
    let read = held.0.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection the new policy denies stayed open: {read:?}"
    );
    let out = mesh.echo("legacy/batch", &[web]);
    assert!(
        !out.status.success(),
        "legacy reached web-1 past the policy"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reset"),
        "plaintext should be refused with a reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mesh.echo_ok("shop/client", &[web]).contains("web-1"));

    let why = mesh.ok(&["explain", "shop/web-1"]);
    assert!(why.contains("policy  shop/web-from-shop"), "{why}");
    assert!(why.contains("198.18.1.100"), "{why}");
    assert!(why.contains("legacy/batch"), "{why}");
    assert!(why.contains("no identity"), "{why}");

    // Over HBONE, identity is what counts: a valid mesh certificate for legacy's service
    // account gets a 401 that names the policy, whatever address it comes from.
    let mesh_ca = mesh_core::devca::DevCa::load_or_create(&mesh.state.join("istiod/ca")).unwrap();
    let legacy_cert = mesh_core::testing::issue(&mesh_ca, &spiffe("legacy", "default"));
    let answer = hbone_connect("amb-p-legacy.batch", legacy_cert, spiffe("shop", "web"));
    match answer {
        Ok((401, reason)) => assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("shop/web-from-shop")),
            "401 without the policy named: {reason:?}"
        ),
        other => panic!("legacy's identity was not refused with 401: {other:?}"),
    }

    // STRICT in shop: plaintext is refused even with no ALLOW policy.
    std::fs::remove_file(mesh.config.join("policy.yaml")).unwrap();
    std::fs::write(mesh.config.join("strict.yaml"), SHOP_STRICT).unwrap();
    wait_until(
        "STRICT in place of the policy on node-b",
        Duration::from_secs(10),
        || {
            let names: Vec<String> = mesh.dump("node-b")["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            names.iter().any(|n| n.contains("static_strict"))
                && !names.iter().any(|n| n == "web-from-shop")
        },
    );
    let out = mesh.echo("legacy/batch", &[web]);
    assert!(!out.status.success(), "STRICT let plaintext through");
    assert!(mesh.echo_ok("shop/client", &[web]).contains("web-1"));
    let why = mesh.ok(&["explain", "shop/web-1"]);
    assert!(why.contains("static_strict"), "{why}");

    // A client certificate from another root never gets through the TLS handshake.
    let foreign = mesh_core::devca::DevCa::generate().unwrap();
    let cert = mesh_core::testing::issue_trusting(&foreign, &spiffe("shop", "client"), &mesh_ca);
    let answer = hbone_connect("amb-p-legacy.batch", cert, spiffe("shop", "web"));
    let refused = answer.is_err();
    assert!(
        refused,
        "web-1's ztunnel accepted a client certificate from another root: {answer:?}"
    );
}

fn spiffe(ns: &str, sa: &str) -> mesh_core::SpiffeId {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
        .parse()
        .unwrap()
}

/// An HBONE CONNECT to web-1's app port from inside `netns`, presenting `cert`: the status
/// and `x-mesh-reason`, or why the connection failed (TLS refused, reset).
fn hbone_connect(
    netns: &str,
    cert: mesh_core::tls::WorkloadCert,
    server: mesh_core::SpiffeId,
) -> Result<(u16, Option<String>), String> {
    netns::within(netns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let addr = "198.18.2.20:15008".parse().unwrap();
                let send = mesh_core::testing::h2_connect(&cert, server, addr)
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                let mut ready = send.ready().await.map_err(|e| format!("h2: {e}"))?;
                let req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri("198.18.2.20:8080")
                    .body(())
                    .unwrap();
                let (resp, _stream) = ready
                    .send_request(req, false)
                    .map_err(|e| format!("CONNECT: {e}"))?;
                let resp = resp.await.map_err(|e| format!("CONNECT: {e}"))?;
                let reason = resp
                    .headers()
                    .get("x-mesh-reason")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Ok((resp.status().as_u16(), reason))
            })
    })
    .unwrap()
}

//! A local mesh for end-to-end tests: `ambient up --detach` on a copy of an example, torn down
//! when dropped (logs kept when the test failed).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ambient::echo::{self, HttpReply, Mode, Reply};
use ambient::netns;

pub const BIN: &str = env!("CARGO_BIN_EXE_ambient");

pub struct Mesh {
    pub tmp: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

/// One mesh per machine: the end-to-end tests take turns (nextest runs their binaries in one
/// test group as well).
pub static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Mesh {
    /// `ambient up --detach` on a fresh copy of `examples/<example>`.
    pub fn start(example: &str, tag: &str) -> Mesh {
        Self::start_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples")
                .join(example),
            tag,
        )
    }

    /// `ambient up --detach` on a fresh copy of the YAML files in `dir`.
    pub fn start_dir(dir: &Path, tag: &str) -> Mesh {
        ambient::up::require_root()
            .expect("this end-to-end test needs root, ip and nft (CI runs it as root)");
        for tool in ["istiod-lite", "ztunnel", "waypoint"] {
            let p = Path::new(BIN).parent().unwrap().join(tool);
            assert!(
                p.exists(),
                "{} is missing: build the workspace (cargo build --workspace) before this test",
                p.display()
            );
        }
        let tmp = std::env::temp_dir().join(format!("ambient-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let config = tmp.join("mesh");
        copy_dir(dir, &config);
        let mesh = Mesh {
            state: tmp.join("state"),
            config,
            tmp,
        };
        let _ = mesh.cmd(&["down"]);
        let out = mesh.cmd(&["up", mesh.config.to_str().unwrap(), "--detach"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ambient up failed:\n{err}");
        assert!(err.contains("The mesh is up"), "{err}");
        assert!(
            err.contains("ambient status"),
            "says where to look next: {err}"
        );
        mesh
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        let bin_dir = Path::new(BIN).parent().unwrap();
        Command::new(BIN)
            .args(args)
            .env("AMBIENT_STATE_DIR", &self.state)
            .env("AMBIENT_BIN_DIR", bin_dir)
            .env("RUST_LOG", "warn,access=info")
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "ambient {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The log of `name` (`istiod-lite`, `ztunnel-NODE`, `waypoint-NS.NAME`, …).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join(format!("logs/{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.cmd(&["down"]);
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.state.join("logs").display());
        } else {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The netns of pod `ns/name`.
pub fn pod_netns(pod: &str) -> String {
    format!("amb-p-{}", pod.replacen('/', ".", 1))
}

/// One HTTP request from inside `pod` to `url` (an address, not a name: names resolve only
/// under `ambient exec`), with `headers` (a `host` header sets the authority).
pub fn http(
    pod: &str,
    mode: Mode,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply, String> {
    let mut req = echo::Request::new(mode, url).map_err(|e| e.to_string())?;
    for (k, v) in headers {
        req.headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    send(pod, req).and_then(|r| match r {
        Reply::Http(h) => Ok(h),
        other => Err(format!("not an HTTP reply: {other:?}")),
    })
}

/// Many requests from inside `pod`, one after another, each on a new connection.
pub fn http_many(
    pod: &str,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Vec<Result<HttpReply, String>> {
    let mut req = echo::Request::new(Mode::Http1, url).unwrap();
    for (k, v) in headers {
        req.headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    netns::within(&pod_netns(pod), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(match echo::request(&req).await {
                    Ok(Reply::Http(h)) => Ok(h),
                    Ok(other) => Err(format!("not an HTTP reply: {other:?}")),
                    Err(e) => Err(e.to_string()),
                });
            }
            out
        })
    })
    .unwrap()
}

/// One request of any mode from inside `pod`.
pub fn send(pod: &str, req: echo::Request) -> Result<Reply, String> {
    netns::within(&pod_netns(pod), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(echo::request(&req)).map_err(|e| e.to_string())
    })
    .map_err(|e| e.to_string())?
}

/// From inside `pod`: an HTTP/1.1 `Upgrade: websocket` request for `path` to `addr` with Host
/// `host`, then, once the response head is in, `data` over the upgraded connection, half-closed.
/// Returns the response head and every byte that came back after it.
pub fn upgrade_exchange(
    pod: &str,
    addr: &str,
    host: &str,
    path: &str,
    data: &[u8],
) -> Result<(String, Vec<u8>), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    let data = data.to_vec();
    netns::within(&pod_netns(pod), move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut buf) {
                Ok(0) => return Err(format!("closed before the response head: {got:?}")),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("reading the response head: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&got[..end]).into_owned();
        let mut rest = got[end..].to_vec();
        s.write_all(&data).map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        s.read_to_end(&mut rest)
            .map_err(|e| format!("reading the echo: {e}"))?;
        Ok((head, rest))
    })
    .map_err(|e| e.to_string())?
}

#![allow(clippy::unwrap_used)]
//! The Gateway API mesh (GAMMA) scenarios in `conformance/scenarios`, run against a local mesh
//! of `conformance/base` with real ztunnels, istiod-lite and a waypoint. Each scenario's
//! resources are written into the mesh's directory (istiod-lite follows it), its requests are
//! sent from client pods, and its resources are removed again. Every failed expectation of
//! every scenario is reported at the end.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ambient::echo::{self, Mode, Reply};
use common::{Mesh, ONE_MESH};
use serde::Deserialize;

const MESH_NS: &str = "gateway-conformance-mesh";

#[derive(Debug, Deserialize)]
struct Scenario {
    name: String,
    #[allow(dead_code)]
    upstream: String,
    #[allow(dead_code)]
    intent: String,
    #[serde(default)]
    apply: String,
    requests: Vec<Req>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    #[serde(default = "default_client")]
    from: String,
    /// A Service of the mesh namespace, or `pod/NAME`.
    to: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// `package.Service/Method`: a gRPC call instead of HTTP.
    #[serde(default)]
    grpc: Option<String>,
    #[serde(default = "one")]
    count: usize,
    expect: Expect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: u16,
    #[serde(default)]
    backend: Option<Backends>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    request_headers: BTreeMap<String, String>,
    #[serde(default)]
    absent_request_headers: Vec<String>,
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
    #[serde(default)]
    absent_response_headers: Vec<String>,
    #[serde(default)]
    location: Option<String>,
    /// Backend pod → percent of `count` requests.
    #[serde(default)]
    weights: BTreeMap<String, f64>,
    #[serde(default)]
    tolerance: f64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Backends {
    One(String),
    Any(Vec<String>),
}

impl Backends {
    fn allows(&self, pod: &str) -> bool {
        match self {
            Backends::One(b) => b == pod,
            Backends::Any(list) => list.iter().any(|b| b == pod),
        }
    }
}

fn default_client() -> String {
    format!("{MESH_NS}/client")
}
fn default_port() -> u16 {
    80
}
fn default_path() -> String {
    "/".to_owned()
}
fn one() -> usize {
    1
}

/// Addresses of the base's Services and Pods, by name.
fn addresses(base: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(base) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match v["kind"].as_str() {
            Some("Service") => {
                out.insert(name, v["spec"]["clusterIP"].as_str().unwrap().to_owned());
            }
            Some("Pod") if v["metadata"]["namespace"] == MESH_NS => {
                out.insert(
                    format!("pod/{name}"),
                    v["status"]["podIP"].as_str().unwrap().to_owned(),
                );
            }
            _ => {}
        }
    }
    out
}

/// Route names (`ns/kind/name`, as the waypoint lists them) a scenario applies.
fn routes_of(apply: &str) -> Vec<String> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(apply) {
        let Ok(v) = serde_yaml::Value::deserialize(doc) else {
            continue;
        };
        let kind = match v["kind"].as_str() {
            Some("HTTPRoute") => "httproute",
            Some("GRPCRoute") => "grpcroute",
            _ => continue,
        };
        out.push(format!(
            "{}/{kind}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or("default"),
            v["metadata"]["name"].as_str().unwrap_or_default()
        ));
    }
    out.sort();
    out
}

fn waypoint_routes() -> Option<Vec<String>> {
    let ns = ambient::netns::list_ours()
        .into_iter()
        .find(|n| n.starts_with(&format!("amb-p-{MESH_NS}.waypoint")))?;
    let (code, body) = ambient::netns::http_get(&ns, "127.0.0.1:15000", "/config_dump").ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut names: Vec<String> = v["config"]["routes"]
        .as_array()?
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Some(names)
}

/// What came back for one request: status, answering pod, path and headers it saw, response
/// headers.
struct Seen {
    status: u16,
    pod: Option<String>,
    path: Option<String>,
    request_headers: BTreeMap<String, String>,
    response_headers: BTreeMap<String, String>,
}

fn send(req: &Req, addrs: &BTreeMap<String, String>) -> Result<Seen, String> {
    let ip = addrs
        .get(&req.to)
        .ok_or_else(|| format!("{} is not in the base", req.to))?;
    // A Service by its name; a pod by its address, as a client of a pod would.
    let host = if req.to.starts_with("pod/") {
        ip.clone()
    } else {
        req.to.clone()
    };
    let mut r = match &req.grpc {
        Some(method) => echo::Request::new(Mode::Grpc, &format!("{ip}:{}/{method}", req.port)),
        None => echo::Request::new(
            Mode::Http1,
            &format!("http://{ip}:{}{}", req.port, req.path),
        ),
    }
    .map_err(|e| e.to_string())?;
    let host_header = if req.port == 80 {
        host
    } else {
        format!("{host}:{}", req.port)
    };
    if req.grpc.is_none() {
        r.headers.insert("host", host_header.parse().unwrap());
    }
    for (k, v) in &req.headers {
        let name = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).unwrap();
        // A scenario's Host replaces the default one; other headers are added.
        if name == http::header::HOST {
            r.headers.insert(name, v.parse().unwrap());
        } else {
            r.headers.append(name, v.parse().unwrap());
        }
    }
    if req.grpc.is_some() {
        r.data = Some("conformance".into());
    }
    match common::send(&req.from, r)? {
        Reply::Http(h) => {
            let echo = h.echo().ok();
            Ok(Seen {
                status: h.status.as_u16(),
                pod: echo.as_ref().map(|e| e.pod.clone()),
                path: echo.as_ref().map(|e| e.path.clone()),
                request_headers: echo
                    .map(|e| {
                        e.headers
                            .into_iter()
                            .map(|(k, v)| (k, v.join(",")))
                            .collect()
                    })
                    .unwrap_or_default(),
                response_headers: h
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                    .collect(),
            })
        }
        Reply::Grpc(g) => Ok(Seen {
            status: 200,
            pod: Some(g.pod),
            path: None,
            request_headers: g.metadata,
            response_headers: BTreeMap::new(),
        }),
        Reply::Tcp(_) => Err("a TCP reply to an HTTP request".into()),
    }
}

/// Checks one request's expectations; returns what failed.
fn check(req: &Req, addrs: &BTreeMap<String, String>) -> Vec<String> {
    let what = format!(
        "{} from {} to {}:{}{}",
        req.grpc.as_deref().unwrap_or("GET"),
        req.from,
        req.to,
        req.port,
        if req.grpc.is_some() { "" } else { &req.path }
    );
    let e = &req.expect;
    let mut failures = Vec::new();
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..req.count {
        let seen = match send(req, addrs) {
            Ok(s) => s,
            Err(err) => {
                failures.push(format!("{what}: {err}"));
                break;
            }
        };
        if seen.status != e.status {
            failures.push(format!(
                "{what}: status {}, expected {}",
                seen.status, e.status
            ));
            break;
        }
        if let Some(pod) = &seen.pod {
            *by_pod.entry(pod.clone()).or_default() += 1;
        }
        if let Some(b) = &e.backend
            && !seen.pod.as_deref().is_some_and(|p| b.allows(p))
        {
            failures.push(format!(
                "{what}: answered by {:?}, expected {b:?}",
                seen.pod
            ));
        }
        if let Some(p) = &e.path
            && seen.path.as_deref() != Some(p.as_str())
        {
            failures.push(format!(
                "{what}: backend saw path {:?}, expected {p:?}",
                seen.path
            ));
        }
        for (k, v) in &e.request_headers {
            // Repeated values: gRPC metadata joins them with ", ", HTTP with ",".
            let norm = |v: &str| v.split(',').map(str::trim).collect::<Vec<_>>().join(",");
            if seen.request_headers.get(k).map(|s| norm(s)) != Some(norm(v)) {
                failures.push(format!(
                    "{what}: backend saw {k}: {:?}, expected {v:?}",
                    seen.request_headers.get(k)
                ));
            }
        }
        for k in &e.absent_request_headers {
            if seen.request_headers.contains_key(k) {
                failures.push(format!(
                    "{what}: backend saw {k}, which should have been removed"
                ));
            }
        }
        for (k, v) in &e.response_headers {
            if seen.response_headers.get(k) != Some(v) {
                failures.push(format!(
                    "{what}: response {k}: {:?}, expected {v:?}",
                    seen.response_headers.get(k)
                ));
            }
        }
        for k in &e.absent_response_headers {
            if seen.response_headers.contains_key(k) {
                failures.push(format!("{what}: response has {k}, which it should not"));
            }
        }
        if let Some(l) = &e.location
            && seen.response_headers.get("location") != Some(l)
        {
            failures.push(format!(
                "{what}: location {:?}, expected {l:?}",
                seen.response_headers.get("location")
            ));
        }
        if !failures.is_empty() {
            break;
        }
    }
    if failures.is_empty() && !e.weights.is_empty() {
        for (pod, want) in &e.weights {
            let got = *by_pod.get(pod).unwrap_or(&0) as f64 * 100.0 / req.count as f64;
            if (got - want).abs() > e.tolerance {
                failures.push(format!(
                    "{what}: {pod} took {got:.1}% of {} requests, expected {want}% ± {}",
                    req.count, e.tolerance
                ));
            }
        }
        let stray: Vec<&String> = by_pod
            .keys()
            .filter(|p| !e.weights.contains_key(*p))
            .collect();
        if !stray.is_empty() {
            failures.push(format!("{what}: answered by {stray:?} too"));
        }
    }
    failures
}

#[test]
fn gamma_scenarios_pass_against_the_local_mesh() {
    let _turn = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance");
    let base = std::fs::read_to_string(root.join("base/mesh.yaml")).unwrap();
    let addrs = addresses(&base);
    let mut scenarios: Vec<(String, Scenario)> = std::fs::read_dir(root.join("scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let s: Scenario =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), s)
        })
        .collect();
    scenarios.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(scenarios.len() >= 18, "{} scenarios", scenarios.len());

    let mesh = Mesh::start_dir(&root.join("base"), "conformance");
    common::wait_until("the waypoint", Duration::from_secs(30), || {
        waypoint_routes().is_some()
    });
    let mut report = Vec::new();
    for (file, s) in &scenarios {
        let path = mesh.config.join("scenario.yaml");
        std::fs::write(&path, &s.apply).unwrap();
        let want = routes_of(&s.apply);
        let deadline = Instant::now() + Duration::from_secs(10);
        while waypoint_routes().as_ref() != Some(&want) {
            if Instant::now() > deadline {
                report.push(format!(
                    "{} ({file}): the waypoint never held routes {want:?} (has {:?})",
                    s.name,
                    waypoint_routes()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let failures: Vec<String> = s.requests.iter().flat_map(|r| check(r, &addrs)).collect();
        eprintln!(
            "{:<45} {}",
            s.name,
            if failures.is_empty() { "pass" } else { "FAIL" }
        );
        report.extend(
            failures
                .into_iter()
                .map(|f| format!("{} ({file}): {f}", s.name)),
        );
        std::fs::remove_file(&path).unwrap();
        common::wait_until(
            "the scenario's routes to go",
            Duration::from_secs(10),
            || waypoint_routes().is_some_and(|r| r.is_empty()),
        );
    }
    assert!(
        report.is_empty(),
        "conformance failures:\n{}",
        report.join("\n")
    );
    drop(mesh);
}

#![allow(clippy::unwrap_used)]
//! istiod-lite in Kubernetes mode, end to end: `Istiod::start` with a Kubernetes source pointed
//! at a compact in-process stand-in API server. It lists every kind, keeps watches open (and
//! delivers scripted events), answers TokenReviews and records status patches. The test reads
//! the result where an operator would: the debug endpoints, the CA over gRPC, and the status
//! written back to the API server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use istiod_lite::app::Istiod;
use istiod_lite::config::{Config, KubeSettings, SourceConfig};
use istiod_lite::model::Kind;
use mesh_core::SpiffeId;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The token istiod-lite itself presents to the API server.
const ISTIOD_TOKEN: &str = "istiod-sa-token";
/// A projected token of the ztunnel pod on node-a, audience istio-ca.
const ZTUNNEL_TOKEN: &str = "ztunnel-node-a-token";
const ZTUNNEL_POD: &str = "ztunnel-x7k2p";
const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const GATEWAY_STATUS: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/apps/gateways/waypoint/status";
const ROUTE_STATUS: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/apps/httproutes/web-route/status";

/// What the stand-in holds and has seen.
#[derive(Default)]
struct ApiState {
    /// List items by collection path (`/api/v1/pods`).
    items: HashMap<String, Vec<Value>>,
    /// Open watches by collection path.
    watches: HashMap<String, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// TokenReview request bodies.
    reviews: Vec<Value>,
    /// Status patches: path, content type, body.
    patches: Vec<(String, String, Value)>,
    /// Requests that came without istiod-lite's bearer token (answered 401).
    unauthorized: Vec<String>,
}

/// A stand-in Kubernetes API server on loopback.
struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
}

impl ApiServer {
    async fn start(objects: Vec<Value>) -> Self {
        let mut state = ApiState::default();
        for kind in Kind::ALL {
            state.items.insert(collection(kind), Vec::new());
        }
        for o in objects {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.to_string() == o["kind"])
                .unwrap();
            state.items.get_mut(&collection(kind)).unwrap().push(o);
        }
        let state = Arc::new(Mutex::new(state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    /// Sends one watch event to every open watch of `kind`, waiting for one to be open.
    async fn event(&self, kind: Kind, type_: &str, object: Value) {
        let path = collection(kind);
        eventually(&format!("a watch on {path}"), || {
            self.state
                .lock()
                .unwrap()
                .watches
                .get(&path)
                .is_some_and(|w| !w.is_empty())
        })
        .await;
        let line = Bytes::from(json!({"type": type_, "object": object}).to_string() + "\n");
        let mut s = self.state.lock().unwrap();
        let watches = s.watches.get_mut(&path).unwrap();
        watches.retain(|w| w.send(line.clone()).is_ok());
        assert!(!watches.is_empty(), "every watch on {path} was closed");
    }

    /// The body of the last status patch sent to `path`.
    fn last_patch(&self, path: &str) -> Option<(String, Value)> {
        let s = self.state.lock().unwrap();
        s.patches
            .iter()
            .rev()
            .find(|(p, _, _)| p == path)
            .map(|(_, ct, body)| (ct.clone(), body.clone()))
    }
}

async fn handle(
    state: Arc<Mutex<ApiState>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let is_watch = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=1"));
    let mut s = state.lock().unwrap();
    let bearer = parts.headers.get("authorization").map(|v| v.as_bytes());
    if bearer != Some(format!("Bearer {ISTIOD_TOKEN}").as_bytes()) {
        s.unauthorized.push(format!("{} {path}", parts.method));
        return Ok(reply(StatusCode::UNAUTHORIZED, json!({"kind": "Status"})));
    }
    let json_body = || serde_json::from_slice::<Value>(&body).unwrap_or_default();
    Ok(match parts.method {
        Method::GET if is_watch => {
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            s.watches.entry(path).or_default().push(tx);
            let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok(Frame::data(chunk)), rx))
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(UnsyncBoxBody::new(StreamBody::new(chunks)))
                .unwrap()
        }
        // A route as the API server holds it, with another controller's status entry.
        Method::GET if path == ROUTE_STATUS.trim_end_matches("/status") => reply(
            StatusCode::OK,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "web-route", "namespace": "apps", "resourceVersion": "7"},
                "status": {"parents": [{"parentRef": {"name": "edge"},
                    "controllerName": "example.com/other-controller", "conditions": []}]}}),
        ),
        Method::GET => match s.items.get(&path) {
            // List items carry no kind or apiVersion, as from a real API server.
            Some(items) => {
                let items: Vec<Value> = items
                    .iter()
                    .map(|i| {
                        let mut i = i.clone();
                        let m = i.as_object_mut().unwrap();
                        m.remove("kind");
                        m.remove("apiVersion");
                        i
                    })
                    .collect();
                let list = json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"}, "items": items});
                reply(StatusCode::OK, list)
            }
            None => reply(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "code": 404}),
            ),
        },
        Method::POST if path == REVIEWS => {
            let review = json_body();
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let for_ca = review["spec"]["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "istio-ca"));
            let status = if token == ZTUNNEL_TOKEN && for_ca {
                json!({"authenticated": true, "audiences": ["istio-ca"],
                    "user": {"username": "system:serviceaccount:istio-system:ztunnel",
                        "uid": "sa-uid-1",
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:istio-system"],
                        "extra": {
                            "authentication.kubernetes.io/pod-name": [ZTUNNEL_POD],
                            "authentication.kubernetes.io/pod-uid": ["pod-uid-1"]}}})
            } else {
                json!({"authenticated": false, "user": {}, "error": "invalid bearer token"})
            };
            s.reviews.push(review.clone());
            let mut answer = review;
            answer["status"] = status;
            reply(StatusCode::CREATED, answer)
        }
        Method::PATCH if path.ends_with("/status") => {
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            s.patches.push((path, content_type, json_body()));
            reply(StatusCode::OK, json!({}))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "code": 404}),
        ),
    })
}

fn reply(code: StatusCode, v: Value) -> Response<Body> {
    let body = Full::new(Bytes::from(v.to_string())).map_err(|e| match e {});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(UnsyncBoxBody::new(body))
        .unwrap()
}

/// `/api/v1/pods`, `/apis/gateway.networking.k8s.io/v1/httproutes`: where a kind is listed.
fn collection(kind: Kind) -> String {
    let version = kind.versions()[0];
    match kind.group() {
        "" => format!("/api/{version}/{}", kind.plural()),
        group => format!("/apis/{group}/{version}/{}", kind.plural()),
    }
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": "1", "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, sa: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "resourceVersion": "1", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn cluster() -> Vec<Value> {
    let waypoint_label = json!({"gateway.networking.k8s.io/gateway-name": "waypoint"});
    vec![
        namespace("apps", json!({"istio.io/dataplane-mode": "ambient"})),
        namespace("istio-system", json!({})),
        pod(
            "apps",
            "web-0",
            "node-a",
            "web",
            "198.18.0.10",
            json!({"app": "web"}),
        ),
        pod(
            "apps",
            "db-0",
            "node-b",
            "db",
            "198.18.1.10",
            json!({"app": "db"}),
        ),
        pod(
            "apps",
            "waypoint-0",
            "node-b",
            "waypoint",
            "198.18.1.20",
            waypoint_label.clone(),
        ),
        pod(
            "istio-system",
            ZTUNNEL_POD,
            "node-a",
            "ztunnel",
            "198.18.2.1",
            json!({"app": "ztunnel"}),
        ),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "apps", "resourceVersion": "1"},
            "spec": {"clusterIP": "198.19.0.10", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "waypoint", "namespace": "apps", "resourceVersion": "1"},
            "spec": {"clusterIP": "198.19.0.20", "selector": waypoint_label,
                "ports": [{"name": "mesh", "port": 15008}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "apps", "resourceVersion": "1",
                "generation": 2},
            "spec": {"gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web-route", "namespace": "apps", "resourceVersion": "1",
                "generation": 3},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
    ]
}

/// A temporary directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(format!("istiod-kube-mode-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(server: &ApiServer, dir: &TempDir) -> Istiod {
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, format!("{ISTIOD_TOKEN}\n")).unwrap();
    let mut cfg = Config::new(SourceConfig::Kubernetes(KubeSettings {
        api_url: Some(format!("http://{}", server.addr)),
        token_file: Some(token_file),
        ca_file: None,
    }));
    cfg.state_dir = dir.0.join("state");
    cfg.xds_plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.xds_tls_addr = None;
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    Istiod::start(cfg).await.unwrap()
}

/// Polls `ok` until it holds, failing the test after a few seconds.
async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A debug endpoint's JSON.
async fn debug_json(istiod: &Istiod, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(istiod.addrs.debug.unwrap())
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

/// Polls `/debug/config` until `ok` holds for it; returns that config.
async fn config_until(istiod: &Istiod, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let config = debug_json(istiod, "/debug/config").await;
        if ok(&config) {
            return config;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; /debug/config: {config:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn workload<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

/// The status (`"True"`/`"False"`) of the condition of `type_` in `conditions`.
fn condition<'a>(conditions: &'a Value, type_: &str) -> Option<&'a str> {
    conditions.as_array()?.iter().find(|c| c["type"] == type_)?["status"].as_str()
}

fn ca_request(id: &SpiffeId, token: &str) -> tonic::Request<IstioCertificateRequest> {
    use prost_types::{Struct, Value, value::Kind};
    let (_key, csr) = mesh_core::certs::new_key_and_csr(id).unwrap();
    let metadata = Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        )]
        .into(),
    };
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(metadata),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn kubernetes_mode_serves_config_signs_for_node_proxies_and_writes_status() {
    let server = ApiServer::start(cluster()).await;
    let dir = TempDir::new();
    let istiod = start(&server, &dir).await;

    // (a) The pods are workloads (HBONE in the ambient namespace) and the Service is a service.
    let config = config_until(&istiod, "every pod as a workload", |c| {
        ["web-0", "db-0", "waypoint-0", ZTUNNEL_POD]
            .iter()
            .all(|n| workload(c, n).is_some())
            && workload(c, "web-0").unwrap()["services"]
                .as_object()
                .is_some_and(|s| !s.is_empty())
    })
    .await;
    let web = workload(&config, "web-0").unwrap();
    assert_eq!(web["namespace"], "apps");
    assert_eq!(web["node"], "node-a");
    assert_eq!(web["addresses"], json!(["198.18.0.10"]));
    assert_eq!(web["protocol"], "HBONE");
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/apps/sa/web");
    assert_eq!(
        web["services"]["apps/web.apps.svc.cluster.local"],
        json!([{"port": 80, "targetPort": 8080}])
    );
    let db = workload(&config, "db-0").unwrap();
    assert_eq!(
        (&db["node"], &db["protocol"]),
        (&json!("node-b"), &json!("HBONE"))
    );
    assert_eq!(
        workload(&config, ZTUNNEL_POD).unwrap()["protocol"],
        "TCP",
        "istio-system is not enrolled"
    );
    let services = config["services"].as_array().unwrap();
    let svc = services
        .iter()
        .find(|s| s["name"] == "apps/web.apps.svc.cluster.local")
        .unwrap_or_else(|| panic!("no web service: {config:#}"));
    assert_eq!(svc["addresses"], json!(["198.19.0.10"]));
    assert_eq!(svc["ports"], json!([{"port": 80, "targetPort": 8080}]));

    // (c) The CA: the ztunnel's token (reviewed by the API server) gets certificates for pods on
    // its own node, not for pods elsewhere; an unknown token gets nothing.
    let channel = Channel::from_shared(format!("http://{}", istiod.addrs.xds_plaintext.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ca = IstioCertificateServiceClient::new(channel);
    let web_id = SpiffeId::new("cluster.local", "apps", "web").unwrap();
    let db_id = SpiffeId::new("cluster.local", "apps", "db").unwrap();
    let chain = ca
        .create_certificate(ca_request(&web_id, ZTUNNEL_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let leaf = mesh_core::tls::parse_pem_certs(&chain[0]).unwrap();
    assert_eq!(
        mesh_core::tls::identity_from_cert(&leaf[0]).unwrap(),
        web_id
    );
    assert_eq!(chain.last().unwrap(), &istiod.ca.roots_pem());

    let err = ca
        .create_certificate(ca_request(&db_id, ZTUNNEL_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(
            "no pod running as spiffe://cluster.local/ns/apps/sa/db is scheduled on node node-a"
        ),
        "{}",
        err.message()
    );
    let err = ca
        .create_certificate(ca_request(&web_id, "stolen-or-expired"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("invalid bearer token"),
        "{}",
        err.message()
    );
    {
        let s = server.state.lock().unwrap();
        let tokens: Vec<&Value> = s.reviews.iter().map(|r| &r["spec"]["token"]).collect();
        assert_eq!(
            tokens,
            [ZTUNNEL_TOKEN, "stolen-or-expired"],
            "an accepted token is reviewed once and remembered; a refused one is not"
        );
        for r in &s.reviews {
            assert_eq!(r["kind"], "TokenReview");
            assert_eq!(r["spec"]["audiences"], json!(["istio-ca"]));
        }
    }

    // (d) Status is written back as merge patches of the status subresource. Early snapshots
    // may see the Gateway before its Service; the latest patch is the settled one.
    eventually("the waypoint Gateway's status", || {
        server.last_patch(GATEWAY_STATUS).is_some_and(|(_, b)| {
            condition(&b["status"]["conditions"], "Programmed") == Some("True")
        })
    })
    .await;
    let (content_type, body) = server.last_patch(GATEWAY_STATUS).unwrap();
    assert_eq!(content_type, "application/merge-patch+json");
    let conditions = &body["status"]["conditions"];
    assert_eq!(condition(conditions, "Accepted"), Some("True"), "{body:#}");
    assert_eq!(conditions[0]["observedGeneration"], 2);
    assert_eq!(body["status"]["addresses"][0]["value"], "198.19.0.20");

    eventually("the HTTPRoute's status", || {
        server.last_patch(ROUTE_STATUS).is_some_and(|(_, b)| {
            let c = &b["status"]["parents"][1]["conditions"];
            condition(c, "Accepted") == Some("True") && condition(c, "ResolvedRefs") == Some("True")
        })
    })
    .await;
    let (content_type, body) = server.last_patch(ROUTE_STATUS).unwrap();
    assert_eq!(content_type, "application/merge-patch+json");
    // Another controller's entry is kept; the write is conditional on the version read.
    assert_eq!(body["metadata"]["resourceVersion"], "7", "{body:#}");
    let parents = body["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{body:#}");
    assert_eq!(parents[0]["controllerName"], "example.com/other-controller");
    let parent = &parents[1];
    assert_eq!(
        parent["parentRef"],
        json!({"group": "", "kind": "Service", "name": "web", "port": 80})
    );
    assert_eq!(parent["controllerName"], "istio.io/gateway-controller");
    assert_eq!(parent["conditions"][0]["observedGeneration"], 3);

    // (b) Removing the namespace's ambient label (a watch event) takes its pods out of HBONE.
    server
        .event(
            Kind::Namespace,
            "MODIFIED",
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "apps", "resourceVersion": "2", "labels": {}}}),
        )
        .await;
    config_until(&istiod, "web-0 out of the mesh", |c| {
        workload(c, "web-0").is_some_and(|w| w["protocol"] == "TCP")
            && workload(c, "db-0").is_some_and(|w| w["protocol"] == "TCP")
    })
    .await;

    let errors = debug_json(&istiod, "/debug/errors").await;
    assert_eq!(errors["errors"], json!([]), "{errors:#}");
    assert_eq!(
        server.state.lock().unwrap().unauthorized,
        Vec::<String>::new(),
        "every request carried istiod-lite's token"
    );
    istiod.shutdown();
}

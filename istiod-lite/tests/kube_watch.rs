#![allow(clippy::unwrap_used)]
//! The Kubernetes source against an in-process stand-in API server that speaks the real
//! protocol: paginated lists whose items carry no kind, chunked newline-delimited watch streams,
//! bookmarks, 410s as events and as responses, connections cut mid-event, TLS.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use istiod_lite::model::{Kind, Object, ObjectKey};
use istiod_lite::source::Source;
use istiod_lite::source::kube::{KubeClient, KubeConfig, KubeError, KubeSource};
use istiod_lite::store::Store;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
type Chunk = Result<Bytes, std::io::Error>;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// `GET /api/v1/pods`, or `WATCH /api/v1/pods` for a watch.
    route: String,
    query: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

enum Reply {
    Json(u16, Value),
    /// A watch: chunks are written as they arrive; an `Err` cuts the connection, dropping the
    /// sender ends the response cleanly.
    Stream(mpsc::UnboundedReceiver<Chunk>),
}

#[derive(Default)]
struct Script {
    seen: Vec<Seen>,
    /// Replies by route, first in first out. Unscripted lists are empty, unscripted watches
    /// stay open and quiet.
    replies: HashMap<String, VecDeque<Reply>>,
    /// Path prefixes answered with 404, as for a CRD that is not installed.
    missing: Vec<&'static str>,
    /// Keeps unscripted watches open.
    quiet: Vec<mpsc::UnboundedSender<Chunk>>,
}

struct ApiServer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    tls: bool,
    dir: PathBuf,
}

/// The feeding end of one scripted watch.
struct WatchFeed(mpsc::UnboundedSender<Chunk>);

/// Aborts the source when the test ends, passing or not.
struct Running(JoinHandle<anyhow::Result<()>>);

impl ApiServer {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let dir = std::env::temp_dir().join(format!("kube-watch-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "istiod-token-1\n").unwrap();
        let server = Self {
            addr,
            script: script.clone(),
            tls: tls.is_some(),
            dir,
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (script, tls) = (script.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(script.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                        None => http.serve_connection(TokioIo::new(tcp), svc).await,
                    };
                });
            }
        });
        server
    }

    fn config(&self) -> KubeConfig {
        let scheme = if self.tls { "https" } else { "http" };
        KubeConfig::new(format!("{scheme}://{}", self.addr))
            .with_token_file(self.dir.join("token"))
            .with_request_timeout(Duration::from_secs(5))
    }

    fn client(&self) -> KubeClient {
        KubeClient::new(self.config()).unwrap()
    }

    /// Runs the source for every kind against this server.
    fn run_source(&self, store: &Store) -> Running {
        let source = Box::new(KubeSource::new(self.client()));
        Running(tokio::spawn(source.run(store.clone())))
    }

    fn reply(&self, route: &str, reply: Reply) {
        let mut s = self.script.lock().unwrap();
        s.replies.entry(route.into()).or_default().push_back(reply);
    }

    /// Scripts the next watch on `path`.
    fn watch(&self, path: &str) -> WatchFeed {
        let (tx, rx) = mpsc::unbounded_channel();
        self.reply(&format!("WATCH {path}"), Reply::Stream(rx));
        WatchFeed(tx)
    }

    fn missing(&self, prefix: &'static str) {
        self.script.lock().unwrap().missing.push(prefix);
    }

    fn seen(&self, route: &str) -> Vec<Seen> {
        let s = self.script.lock().unwrap();
        s.seen
            .iter()
            .filter(|r| r.route == route)
            .cloned()
            .collect()
    }

    /// Waits for the `n`th (from 1) request on `route`.
    async fn nth(&self, route: &str, n: usize) -> Seen {
        eventually(&format!("request {n} on {route}"), || {
            self.seen(route).len() >= n
        })
        .await;
        self.seen(route).swap_remove(n - 1)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl WatchFeed {
    fn event(&self, type_: &str, object: Value) {
        let line = json!({ "type": type_, "object": object }).to_string() + "\n";
        self.raw(line.as_bytes());
    }

    fn raw(&self, bytes: &[u8]) {
        let _ = self.0.send(Ok(Bytes::copy_from_slice(bytes)));
    }

    /// Cuts the connection without ending the response.
    fn cut(self) {
        let _ = self.0.send(Err(std::io::Error::other("connection cut")));
    }

    /// Ends the response cleanly, as the server does at `timeoutSeconds`.
    fn end(self) {}
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle(
    script: Arc<Mutex<Script>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes().to_vec());
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let is_watch = query.split('&').any(|p| p == "watch=1");
    let verb = if is_watch {
        "WATCH"
    } else {
        parts.method.as_str()
    };
    let route = format!("{verb} {path}");
    let reply = {
        let mut s = script.lock().unwrap();
        s.seen.push(Seen {
            route: route.clone(),
            query,
            headers: parts.headers,
            body: body.unwrap_or_default(),
        });
        let scripted = s.replies.get_mut(&route).and_then(VecDeque::pop_front);
        match scripted {
            Some(r) => r,
            None if s.missing.iter().any(|p| path.starts_with(p)) => Reply::Json(
                404,
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ),
            None if is_watch => {
                let (tx, rx) = mpsc::unbounded_channel();
                s.quiet.push(tx);
                Reply::Stream(rx)
            }
            None if verb == "GET" => Reply::Json(200, list("List", "1", None, vec![])),
            None => Reply::Json(404, status(404, "NotFound", "not scripted")),
        }
    };
    let resp = Response::builder().header("content-type", "application/json");
    Ok(match reply {
        Reply::Json(code, v) => {
            let body = Full::new(Bytes::from(v.to_string())).map_err(|e| match e {});
            resp.status(code).body(UnsyncBoxBody::new(body)).unwrap()
        }
        Reply::Stream(rx) => {
            let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((chunk.map(Frame::data), rx))
            });
            resp.status(200)
                .body(UnsyncBoxBody::new(StreamBody::new(chunks)))
                .unwrap()
        }
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

/// A list page. Its items carry no kind or apiVersion, as from a real API server.
fn list(kind: &str, rv: &str, next: Option<&str>, items: Vec<Value>) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut i| {
            let m = i.as_object_mut().unwrap();
            m.remove("kind");
            m.remove("apiVersion");
            i
        })
        .collect();
    let mut metadata = json!({ "resourceVersion": rv });
    if let Some(next) = next {
        metadata["continue"] = next.into();
        metadata["remainingItemCount"] = 1.into();
    }
    json!({"kind": kind, "apiVersion": "v1", "metadata": metadata, "items": items})
}

fn pod(name: &str, rv: &str, ip: &str) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "apps", "resourceVersion": rv,
            "uid": format!("uid-{name}"), "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn pod_list(rv: &str, next: Option<&str>, pods: Vec<Value>) -> Reply {
    Reply::Json(200, list("PodList", rv, next, pods))
}

fn pods(store: &Store) -> Vec<(String, String)> {
    store
        .state()
        .of_kind(Kind::Pod)
        .map(|o| match &**o {
            Object::Pod(p) => (
                p.metadata.name.clone(),
                p.status.pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            ),
            other => panic!("not a pod: {other:?}"),
        })
        .collect()
}

fn pod_set(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect()
}

fn param<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.query
        .split('&')
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

/// Polls `ok` until it holds, failing the test after a few seconds.
async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const PODS: &str = "/api/v1/pods";
const LIST_PODS: &str = "GET /api/v1/pods";
const WATCH_PODS: &str = "WATCH /api/v1/pods";

#[tokio::test]
async fn a_paginated_list_then_watch_events_keep_the_store_in_step() {
    let server = ApiServer::start().await;
    server.missing("/apis/gateway.networking.k8s.io/");
    server.reply(
        LIST_PODS,
        pod_list(
            "100",
            Some("eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ+/="),
            vec![pod("a", "90", "10.0.0.1"), pod("b", "91", "10.0.0.2")],
        ),
    );
    server.reply(
        LIST_PODS,
        pod_list("100", None, vec![pod("c", "92", "10.0.0.3")]),
    );
    let feed = server.watch(PODS);
    let store = Store::new();
    let _source = server.run_source(&store);

    eventually("the listed pods", || pods(&store).len() == 3).await;
    let first = server.nth(LIST_PODS, 1).await;
    assert_eq!(param(&first, "limit"), Some("500"));
    assert_eq!(param(&first, "continue"), None);
    assert_eq!(
        first.headers["authorization"], "Bearer istiod-token-1",
        "the token file is sent, trimmed"
    );
    let second = server.nth(LIST_PODS, 2).await;
    assert_eq!(
        param(&second, "continue"),
        Some("eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ%2B%2F%3D"),
        "the continue token is passed back, encoded"
    );

    let watch = server.nth(WATCH_PODS, 1).await;
    assert_eq!(param(&watch, "resourceVersion"), Some("100"));
    assert_eq!(param(&watch, "allowWatchBookmarks"), Some("true"));
    assert!(param(&watch, "timeoutSeconds").is_some());

    feed.event("ADDED", pod("d", "101", "10.0.0.4"));
    feed.event("MODIFIED", pod("a", "102", "10.0.0.9"));
    // One event split across writes, then another in the same write as its end.
    let deleted = json!({"type": "DELETED", "object": pod("b", "103", "10.0.0.2")}).to_string();
    let (head, tail) = deleted.split_at(deleted.len() / 2);
    feed.raw(head.as_bytes());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let added = json!({"type": "ADDED", "object": pod("e", "104", "10.0.0.5")}).to_string();
    feed.raw(format!("{tail}\n{added}\n").as_bytes());
    eventually("the watch events applied", || {
        pods(&store)
            == pod_set(&[
                ("a", "10.0.0.9"),
                ("c", "10.0.0.3"),
                ("d", "10.0.0.4"),
                ("e", "10.0.0.5"),
            ])
    })
    .await;
    assert!(store.errors().is_empty(), "{:?}", store.errors());

    // The CRDs that are not installed were asked for once and are retried slowly; the core
    // kinds were listed and watched regardless.
    let routes = "GET /apis/gateway.networking.k8s.io/v1/httproutes";
    server.nth(routes, 1).await;
    assert_eq!(server.seen(routes).len(), 1);
    assert_eq!(
        server
            .seen("WATCH /apis/gateway.networking.k8s.io/v1/httproutes")
            .len(),
        0
    );
    server
        .nth("WATCH /apis/security.istio.io/v1/authorizationpolicies", 1)
        .await;
    server.nth("WATCH /api/v1/namespaces", 1).await;
    assert_eq!(
        server.seen(WATCH_PODS).len(),
        1,
        "the watch never reconnected"
    );
}

#[tokio::test]
async fn a_bookmark_advances_the_version_the_next_watch_starts_from() {
    let server = ApiServer::start().await;
    server.reply(
        LIST_PODS,
        pod_list("10", None, vec![pod("a", "5", "10.0.0.1")]),
    );
    let feed = server.watch(PODS);
    let store = Store::new();
    let _source = server.run_source(&store);

    assert_eq!(
        param(&server.nth(WATCH_PODS, 1).await, "resourceVersion"),
        Some("10")
    );
    feed.event("MODIFIED", pod("a", "11", "10.0.0.2"));
    feed.event(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "20",
            "annotations": {"k8s.io/initial-events-end": "true"}}}),
    );
    feed.end();
    let again = server.nth(WATCH_PODS, 2).await;
    assert_eq!(param(&again, "resourceVersion"), Some("20"));
    assert_eq!(pods(&store), pod_set(&[("a", "10.0.0.2")]));
    assert_eq!(
        server.seen(LIST_PODS).len(),
        1,
        "a clean end does not re-list"
    );
}

#[tokio::test]
async fn an_expired_version_relists_and_drops_what_was_deleted_meanwhile() {
    let server = ApiServer::start().await;
    server.reply(
        LIST_PODS,
        pod_list(
            "10",
            None,
            vec![pod("a", "1", "10.0.0.1"), pod("b", "2", "10.0.0.2")],
        ),
    );
    let feed = server.watch(PODS);
    server.reply(
        LIST_PODS,
        pod_list("30", None, vec![pod("a", "25", "10.0.0.7")]),
    );
    // The watch after the second list is refused with HTTP 410 outright.
    server.reply(
        &format!("WATCH {PODS}"),
        Reply::Json(
            410,
            status(410, "Expired", "too old resource version: 30 (45)"),
        ),
    );
    server.reply(
        LIST_PODS,
        pod_list(
            "50",
            None,
            vec![pod("a", "25", "10.0.0.7"), pod("c", "48", "10.0.0.3")],
        ),
    );
    let store = Store::new();
    let _source = server.run_source(&store);

    server.nth(WATCH_PODS, 1).await;
    assert_eq!(
        pods(&store),
        pod_set(&[("a", "10.0.0.1"), ("b", "10.0.0.2")])
    );
    feed.event(
        "ERROR",
        status(410, "Expired", "too old resource version: 10 (28)"),
    );
    let second = server.nth(WATCH_PODS, 2).await;
    assert_eq!(param(&second, "resourceVersion"), Some("30"));
    assert!(
        pods(&store).iter().all(|(name, _)| name != "b"),
        "b, deleted between the lists, is gone"
    );
    let third = server.nth(WATCH_PODS, 3).await;
    assert_eq!(param(&third, "resourceVersion"), Some("50"));
    assert_eq!(server.seen(LIST_PODS).len(), 3);
    eventually("the third list applied", || {
        pods(&store) == pod_set(&[("a", "10.0.0.7"), ("c", "10.0.0.3")])
    })
    .await;
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_keeps_its_last_good_version() {
    let server = ApiServer::start().await;
    let mut broken = pod("bad", "3", "10.0.0.3");
    broken["status"]["podIP"] = "10.0.0.300".into();
    server.reply(
        LIST_PODS,
        pod_list("10", None, vec![pod("a", "1", "10.0.0.1"), broken]),
    );
    let feed = server.watch(PODS);
    let store = Store::new();
    let _source = server.run_source(&store);
    let errors = || -> Vec<String> { store.errors().iter().map(ToString::to_string).collect() };

    eventually("the listed pod", || pods(&store).len() == 1).await;
    assert_eq!(
        errors(),
        vec![
            "kubernetes/Pod/apps/bad: Pod apps/bad: field status.podIP: invalid IP address syntax"
        ]
    );

    server.nth(WATCH_PODS, 1).await;
    let mut bad_a = pod("a", "11", "10.0.0.1");
    bad_a["spec"]["containers"][0]["ports"][0]["containerPort"] = "http".into();
    feed.event("MODIFIED", bad_a);
    feed.event("ADDED", pod("z", "12", "10.0.0.26"));
    eventually("the error for a", || errors().len() == 2).await;
    let e = errors();
    assert!(
        e[0].starts_with(
            "kubernetes/Pod/apps/a: Pod apps/a: field spec.containers[0].ports[0].containerPort: invalid type"
        ),
        "{e:?}"
    );
    eventually("the pod after the broken one", || pods(&store).len() == 2).await;
    assert!(
        pods(&store).contains(&("a".into(), "10.0.0.1".into())),
        "a kept its last good version"
    );

    // Fixing a clears only a's error; deleting the broken pod clears its own.
    feed.event("MODIFIED", pod("a", "13", "10.0.0.11"));
    eventually("a fixed", || errors().len() == 1).await;
    assert!(errors()[0].starts_with("kubernetes/Pod/apps/bad:"));
    assert!(pods(&store).contains(&("a".into(), "10.0.0.11".into())));
    let mut gone = pod("bad", "14", "10.0.0.3");
    gone["status"]["podIP"] = "10.0.0.300".into();
    feed.event("DELETED", gone);
    eventually("no errors left", || errors().is_empty()).await;

    // Junk that is not an event at all is skipped; the watch carries on.
    feed.raw(b"{\"type\": \"ADDED\", \"object\": \n");
    feed.raw(b"[1, 2, 3]\n");
    feed.event("ADDED", pod("y", "15", "10.0.0.25"));
    eventually("the pod after the junk", || pods(&store).len() == 3).await;
    assert_eq!(server.seen(WATCH_PODS).len(), 1);
}

#[tokio::test]
async fn a_watch_cut_mid_event_resumes_from_the_last_version() {
    let server = ApiServer::start().await;
    server.reply(
        LIST_PODS,
        pod_list("10", None, vec![pod("a", "1", "10.0.0.1")]),
    );
    let first = server.watch(PODS);
    let second = server.watch(PODS);
    let store = Store::new();
    let _source = server.run_source(&store);

    server.nth(WATCH_PODS, 1).await;
    first.event("ADDED", pod("b", "11", "10.0.0.2"));
    let half = json!({"type": "ADDED", "object": pod("c", "12", "10.0.0.3")}).to_string();
    first.raw(&half.as_bytes()[..half.len() / 2]);
    eventually("b", || pods(&store).len() == 2).await;
    first.cut();

    let again = server.nth(WATCH_PODS, 2).await;
    assert_eq!(param(&again, "resourceVersion"), Some("11"));
    assert_eq!(pods(&store).len(), 2, "the half event was not applied");
    second.event("ADDED", pod("c", "12", "10.0.0.3"));
    eventually("c", || pods(&store).len() == 3).await;
    assert_eq!(
        server.seen(LIST_PODS).len(),
        1,
        "a cut watch resumes without re-listing"
    );
}

const REVIEWS: &str = "POST /apis/authentication.k8s.io/v1/tokenreviews";

fn review(status: Value) -> Reply {
    Reply::Json(
        201,
        json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null}, "spec": {"token": "redacted"}, "status": status}),
    )
}

#[tokio::test]
async fn token_review_sends_the_token_and_reads_the_pod_binding() {
    let server = ApiServer::start().await;
    server.reply(
        REVIEWS,
        review(json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:apps:web", "uid": "u-1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:apps"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["web-0"],
                    "authentication.kubernetes.io/pod-uid": ["8d2e-11"],
                    "authentication.kubernetes.io/node-name": ["node-1"],
                    "authentication.kubernetes.io/credential-id": ["JTI=abc"]}}})),
    );
    server.reply(
        REVIEWS,
        review(json!({"authenticated": false, "user": {}, "error": "token has expired"})),
    );
    server.reply(
        REVIEWS,
        Reply::Json(401, status(401, "Unauthorized", "Unauthorized")),
    );
    let client = server.client();

    let t = client
        .token_review("workload-jwt", &["istio-ca".to_string()])
        .await
        .unwrap();
    assert!(t.authenticated);
    assert_eq!(t.username, "system:serviceaccount:apps:web");
    assert_eq!(t.service_account(), Some(("apps", "web")));
    assert_eq!(t.pod_name.as_deref(), Some("web-0"));
    assert_eq!(t.pod_uid.as_deref(), Some("8d2e-11"));
    assert_eq!(t.node_name.as_deref(), Some("node-1"));
    assert_eq!(t.audiences, vec!["istio-ca"]);
    let sent = server.nth(REVIEWS, 1).await;
    assert_eq!(sent.headers["authorization"], "Bearer istiod-token-1");
    assert_eq!(sent.headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(
        body["spec"],
        json!({"token": "workload-jwt", "audiences": ["istio-ca"]})
    );

    // The token file is read again for each request, so a rotated token is used.
    std::fs::write(server.dir.join("token"), "istiod-token-2").unwrap();
    let t = client.token_review("old-jwt", &[]).await.unwrap();
    assert!(!t.authenticated);
    assert_eq!(t.service_account(), None);
    assert_eq!(t.error.as_deref(), Some("token has expired"));
    let sent = server.nth(REVIEWS, 2).await;
    assert_eq!(sent.headers["authorization"], "Bearer istiod-token-2");
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["spec"], json!({"token": "old-jwt"}));

    let e = client.token_review("x", &[]).await.unwrap_err();
    assert!(matches!(e, KubeError::Unauthorized { .. }), "{e:?}");
    assert!(e.to_string().contains("ClusterRole"), "{e}");

    std::fs::remove_file(server.dir.join("token")).unwrap();
    let e = client.token_review("x", &[]).await.unwrap_err();
    assert!(matches!(e, KubeError::Token { .. }), "{e:?}");
    assert_eq!(
        server.seen(REVIEWS).len(),
        3,
        "nothing sent without a token"
    );
}

#[tokio::test]
async fn patch_status_merge_patches_the_status_subresource() {
    let server = ApiServer::start().await;
    let route =
        "PATCH /apis/gateway.networking.k8s.io/v1/namespaces/apps/httproutes/reviews/status";
    server.reply(route, Reply::Json(200, json!({"kind": "HTTPRoute"})));
    let key = ObjectKey {
        kind: Kind::HTTPRoute,
        namespace: "apps".into(),
        name: "reviews".into(),
    };
    let status = json!({"parents": [{"parentRef": {"name": "waypoint"},
        "controllerName": "istio.io/istiod-lite", "conditions": []}]});
    server
        .client()
        .patch_status(&key, status.clone())
        .await
        .unwrap();
    let sent = server.nth(route, 1).await;
    assert_eq!(sent.headers["content-type"], "application/merge-patch+json");
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body, json!({ "status": status }));

    let ns = ObjectKey {
        kind: Kind::Namespace,
        namespace: String::new(),
        name: "apps".into(),
    };
    let e = server
        .client()
        .patch_status(&ns, json!({}))
        .await
        .unwrap_err();
    assert!(matches!(e, KubeError::NotFound { .. }), "{e:?}");
    assert_eq!(server.seen("PATCH /api/v1/namespaces/apps/status").len(), 1);
}

/// A CA and a leaf for 127.0.0.1 signed by it, in PEM and as a server config.
fn tls_server() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (ca_pem, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn https_is_verified_against_the_ca_bundle() {
    let (ca_pem, acceptor) = tls_server();
    let server = ApiServer::start_with(Some(acceptor)).await;
    server.reply(
        LIST_PODS,
        pod_list("10", None, vec![pod("a", "1", "10.0.0.1")]),
    );
    std::fs::write(server.dir.join("ca.crt"), &ca_pem).unwrap();
    let (other_ca, _) = tls_server();
    std::fs::write(server.dir.join("other.crt"), &other_ca).unwrap();

    let wrong =
        KubeClient::new(server.config().with_ca_file(server.dir.join("other.crt"))).unwrap();
    let e = wrong.token_review("x", &[]).await.unwrap_err();
    assert!(matches!(e, KubeError::Tls { .. }), "{e:?}");
    assert!(server.seen(REVIEWS).is_empty());

    let e = KubeClient::new(server.config()).err().unwrap();
    assert!(matches!(e, KubeError::NoCa { .. }), "{e:?}");

    let client = KubeClient::new(server.config().with_ca_file(server.dir.join("ca.crt"))).unwrap();
    let store = Store::new();
    let _source = Running(tokio::spawn(
        Box::new(KubeSource::new(client).with_kinds(&[Kind::Pod])).run(store.clone()),
    ));
    eventually("the pod listed over TLS", || pods(&store).len() == 1).await;
    server.nth(WATCH_PODS, 1).await;
}

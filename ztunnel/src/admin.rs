//! Admin (`/config_dump`, `/quitquitquit`), Prometheus (`/metrics`) and readiness
//! (`/healthz/ready`) endpoints: small HTTP/1.1 servers off the data path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::inpod::InPod;
use crate::proxy::ProxyState;
use crate::proxy::inbound::{BindFailure, InboundListeners};

pub type Body = Full<Bytes>;

const MAX_CONNECTIONS: usize = 64;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves `handler` on `listener` until `drain` resolves (shutdown).
pub async fn serve<H>(
    listener: TcpListener,
    component: &'static str,
    drain: impl std::future::Future<Output = ()>,
    handler: H,
) where
    H: Fn(&Method, &str) -> Response<Body> + Clone + Send + Sync + 'static,
{
    tokio::pin!(drain);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, component, "listener established");
    }
    // Off the data path, so bounded: a scraper or a stuck client cannot take the file
    // descriptors the proxy needs.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(component, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut drain => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(component, "too many connections; dropping one");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = handler(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(MAX_CONNECTION_AGE, conn).await;
            drop(slot);
        });
    }
}

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

fn not_found(path: &str) -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain",
        format!("no endpoint {path}\n"),
    )
}

/// The admin endpoints.
pub fn admin_handler(
    state: Arc<ProxyState>,
    inbound: Arc<InboundListeners>,
    inpod: Option<Arc<InPod>>,
    failures: Arc<std::sync::Mutex<Vec<BindFailure>>>,
    quit: Arc<Notify>,
) -> impl Fn(&Method, &str) -> Response<Body> + Clone + Send + Sync + 'static {
    move |method, path| match (method, path) {
        (&Method::GET, "/config_dump") => {
            let dump = config_dump(&state, &inbound, inpod.as_deref(), &failures);
            let body = serde_json::to_vec_pretty(&dump).expect("JSON values serialize");
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::POST, "/quitquitquit") => {
            quit.notify_one();
            respond(StatusCode::OK, "text/plain", "shutting down\n")
        }
        (&Method::GET, "/healthz/ready") => ready(&state, inpod.as_deref()),
        (&Method::GET, "/") => respond(
            StatusCode::OK,
            "text/plain",
            "GET /config_dump\nGET /healthz/ready\nPOST /quitquitquit\n",
        ),
        _ => not_found(path),
    }
}

pub fn metrics_handler(
    state: Arc<ProxyState>,
) -> impl Fn(&Method, &str) -> Response<Body> + Clone + Send + Sync + 'static {
    move |_, path| match path {
        "/metrics" | "/stats/prometheus" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        _ => not_found(path),
    }
}

pub fn readiness_handler(
    state: Arc<ProxyState>,
    inpod: Option<Arc<InPod>>,
) -> impl Fn(&Method, &str) -> Response<Body> + Clone + Send + Sync + 'static {
    move |_, path| match path {
        "/healthz/ready" => ready(&state, inpod.as_deref()),
        _ => not_found(path),
    }
}

/// Readiness is only served once start-up finished: config loaded, listeners bound. Following
/// istiod-lite, it also waits until every xDS type has been ACKed once; under in-pod capture,
/// until the node agent's pods have been taken over.
fn ready(state: &ProxyState, inpod: Option<&InPod>) -> Response<Body> {
    if let Some(inpod) = inpod.filter(|i| !i.is_synced()) {
        let why = if inpod.is_connected() {
            "receiving the node agent's pods"
        } else {
            "waiting for the node agent"
        };
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        );
    }
    match &state.xds {
        Some(xds) if !xds.is_ready() => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "not ready: waiting for the first xDS push of {}\n",
                xds.waiting_for().join(", ")
            ),
        ),
        _ => respond(StatusCode::OK, "text/plain", "ready\n"),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn config_dump(
    state: &ProxyState,
    inbound: &InboundListeners,
    inpod: Option<&InPod>,
    failures: &std::sync::Mutex<Vec<BindFailure>>,
) -> Value {
    let snap = state.store.snapshot();
    let mut workloads: Vec<_> = snap.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<_> = snap.services().collect();
    services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    let mut policies: Vec<_> = snap.policies().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut local: Vec<_> = snap
        .local_workloads(&state.cfg.node_name)
        .map(|w| w.uid.clone())
        .collect();
    local.sort();
    let certificates: Vec<Value> = state
        .certs
        .status()
        .into_iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(),
                "state": format!("{:?}", c.state),
                "notBefore": unix(c.not_before),
                "notAfter": unix(c.not_after),
            })
        })
        .collect();
    let pool: Vec<Value> = state
        .pool
        .stats()
        .into_iter()
        .map(|p| {
            json!({
                "src": p.src,
                "dst": p.dst,
                "addr": p.addr.to_string(),
                "connections": p.connections.iter().map(|c| json!({
                    "id": c.id,
                    "dead": c.dead,
                    "retired": c.retired,
                    "activeStreams": c.active_streams,
                    "idleForMs": c.idle_for_ms,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "node": state.cfg.node_name,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "localWorkloads": local,
        "certificates": certificates,
        "pool": pool,
        "listeners": {
            "inboundHbone": inbound.addrs(),
            "bindFailures": *failures.lock().expect("failure list lock poisoned"),
        },
        "activeConnections": state.active_connections(),
        "connections": state.metrics.live_connections(),
        "recentDenials": state.metrics.recent_denials(),
        "pods": inpod.map(|i| i.status()),
        "nodeAgent": inpod.map(|i| json!({"connected": i.is_connected(), "synced": i.is_synced()})),
        "xds": state.xds.as_ref().map(|x| x.dump()),
    })
}

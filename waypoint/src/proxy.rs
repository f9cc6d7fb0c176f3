//! The data path: HBONE in, HTTP (or opaque TCP) routed and authorized, HBONE out.
//!
//! Each CONNECT stream names the original destination (a Service VIP and port, or a workload
//! address). The stream is read as HTTP/1.1 or HTTP/2 when the client speaks it first (the
//! HTTP/2 preface or an HTTP/1.1 request line), else as opaque TCP, which is authorized and
//! forwarded to an endpoint unchanged.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::certs::CertManager;
use mesh_core::hbone::{Connect, StreamIo};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};
use ztunnel::state::{AppProtocol, Workload};

use crate::authz::{self, Attributes, Verdict};
use crate::config::Config as Flags;
use crate::metrics::{Metrics, RequestLabels};
use crate::resources::{Config, ConfigStore, Target};
use crate::routes::{Backend, Decision, Filter, HeaderModifier, Redirect, RequestView, Rule};
use crate::upstream::{self, Balancer, Body, BoxError, UpstreamError, Upstreams, Version};
use mirror::Mirror;

mod mirror;

/// Largest request body held for retries; larger ones are streamed and not retried.
const MAX_RETRY_BODY: u64 = 1024 * 1024;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What was detected on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the first bytes a client sent; `None` while they could still be either.
pub fn classify(b: &[u8]) -> Option<Detected> {
    if b.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| b.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let could_be = H2_PREFACE.starts_with(b) || METHODS.iter().any(|m| m.starts_with(b));
    if could_be { None } else { Some(Detected::Tcp) }
}

/// Reads until the protocol is clear, or `wait` passes without the client speaking (a
/// server-first protocol): then it is TCP. What was read is given back to the stream.
async fn detect(io: &mut StreamIo, wait: Duration) -> Detected {
    let mut buf = [0u8; 16];
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + wait;
    let found = loop {
        if let Some(d) = classify(&buf[..n]) {
            break d;
        }
        if n == buf.len() {
            break Detected::Tcp;
        }
        match tokio::time::timeout_at(deadline, io.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Detected::Tcp,
            Ok(Ok(k)) => n += k,
        }
    };
    io.unread(Bytes::copy_from_slice(&buf[..n]));
    found
}

/// Who is calling, as known for a whole connection.
struct Peer {
    /// The SPIFFE ID without its scheme, as policies name principals.
    principal: String,
    namespace: String,
    ip: IpAddr,
    workload: Option<Arc<Workload>>,
}

/// One CONNECT stream's context, shared by its requests.
struct StreamCtx {
    target: Target,
    dst: SocketAddr,
    peer: Peer,
}

impl StreamCtx {
    fn service_host(&self) -> Option<&str> {
        match &self.target {
            Target::Service(s) => Some(&s.hostname),
            Target::Workload(_) => None,
        }
    }

    fn target_namespace(&self) -> &str {
        match &self.target {
            Target::Service(s) => &s.namespace,
            Target::Workload(w) => &w.namespace,
        }
    }
}

pub struct Proxy {
    pub flags: Arc<Flags>,
    pub store: ConfigStore,
    pub upstreams: Arc<Upstreams>,
    pub balancer: Arc<Balancer>,
    pub metrics: Metrics,
    pub certs: CertManager,
}

impl Proxy {
    /// Serves one inbound HBONE connection.
    pub async fn serve_connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        drain: impl std::future::Future<Output = ()>,
    ) {
        let peer = tcp.peer_addr().ok();
        let cert = match self.certs.fetch(&self.flags.identity).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "no certificate to accept HBONE with; dropping the connection");
                return;
            }
        };
        let tls = match cert.server_config() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "unusable certificate; dropping the connection");
                return;
            }
        };
        let this = Arc::clone(&self);
        let served = mesh_core::hbone::serve_connection(
            tcp,
            tls,
            &mesh_core::hbone::ServerConfig::default(),
            drain,
            move |c| Arc::clone(&this).on_connect(c),
        )
        .await;
        if let Err(e) = served {
            debug!(peer = ?peer, error = %e, "HBONE connection ended");
        }
    }

    async fn on_connect(self: Arc<Self>, c: Connect) {
        let Some(dst) = c
            .request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            c.refuse(
                StatusCode::BAD_REQUEST,
                "the CONNECT authority must be ip:port",
            );
            return;
        };
        let config = self.store.get();
        let Some(target) = config.target(dst.ip()) else {
            warn!(%dst, peer = %c.peer_identity, "refused: the destination does not use this waypoint");
            c.refuse(
                StatusCode::NOT_FOUND,
                &format!(
                    "{dst} does not use waypoint {}/{}",
                    self.flags.namespace, self.flags.name
                ),
            );
            return;
        };
        let peer_ip = c.peer_addr.ip();
        let peer = Peer {
            principal: c
                .peer_identity
                .to_string()
                .trim_start_matches("spiffe://")
                .to_owned(),
            namespace: c.peer_identity.namespace().to_owned(),
            ip: peer_ip,
            workload: config.mesh.workload_by_ip(peer_ip).cloned(),
        };
        let stream = match c.accept() {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "could not accept the stream");
                return;
            }
        };
        let mut io = StreamIo::new(stream);
        // A port declared TCP or TLS is opaque: no waiting for a client that may never speak
        // first. Otherwise the first bytes decide.
        let declared = match &target {
            Target::Service(s) => s.app_protocol(dst.port()),
            Target::Workload(_) => AppProtocol::Unknown,
        };
        let detected = match declared {
            AppProtocol::Tcp | AppProtocol::Tls => Detected::Tcp,
            _ => detect(&mut io, self.flags.detect_timeout).await,
        };
        let ctx = Arc::new(StreamCtx { target, dst, peer });
        match detected {
            Detected::Tcp => self.forward_tcp(io, &ctx, &config).await,
            Detected::Http1 | Detected::Http2 => self.serve_http(io, ctx, detected).await,
        }
    }

    async fn serve_http(self: Arc<Self>, io: StreamIo, ctx: Arc<StreamCtx>, proto: Detected) {
        let this = Arc::clone(&self);
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            let ctx = Arc::clone(&ctx);
            async move { Ok::<_, Infallible>(this.handle(req, ctx).await) }
        });
        let io = TokioIo::new(io);
        let served = if proto == Detected::Http2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        };
        if let Err(e) = served {
            debug!(error = %e, "downstream HTTP connection ended with an error");
        }
    }

    /// Opaque TCP: authorized without HTTP attributes, then copied to an endpoint.
    async fn forward_tcp(&self, mut io: StreamIo, ctx: &StreamCtx, config: &Config) {
        let policies = config.policies_for(ctx.service_host());
        if !policies.is_empty() {
            let headers = HeaderMap::new();
            let a = Attributes {
                principal: Some(&ctx.peer.principal),
                source_namespace: Some(&ctx.peer.namespace),
                source_ip: ctx.peer.ip,
                host: "",
                path: "",
                method: "",
                port: ctx.dst.port(),
                headers: &headers,
            };
            if let Verdict::Deny { policy, reason } =
                authz::evaluate(&policies, &a, &mut Vec::new())
            {
                info!(target: "access", src = %ctx.peer.principal, dst = %ctx.dst, %policy, %reason, "TCP connection denied");
                io.reset();
                return;
            }
        }
        let endpoints = endpoints(config, &ctx.target, ctx.dst.port());
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|(_, a)| *a).collect();
        let Some(lease) = self.balancer.pick(&addrs, None) else {
            warn!(dst = %ctx.dst, "no healthy endpoint for a TCP connection");
            io.reset();
            return;
        };
        let Some((workload, _)) = endpoints.iter().find(|(_, a)| *a == lease.addr) else {
            return;
        };
        let started = Instant::now();
        match self.upstreams.open(workload, lease.addr).await {
            Ok(mut up) => {
                lease.done(true);
                let copied = tokio::io::copy_bidirectional(&mut io, &mut up).await;
                let (sent, received) = copied.unwrap_or_default();
                info!(
                    target: "access",
                    src = %ctx.peer.principal,
                    dst = %ctx.dst,
                    upstream = %workload.name,
                    sent,
                    received,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "TCP connection"
                );
            }
            Err(e) => {
                lease.done(false);
                warn!(dst = %ctx.dst, error = %e, "TCP upstream connection failed");
                io.reset();
            }
        }
    }

    /// One HTTP request, start to response headers (the body streams after).
    async fn handle(&self, mut req: Request<Incoming>, ctx: Arc<StreamCtx>) -> Response<Body> {
        let started = Instant::now();
        let config = self.store.get();
        let grpc = is_grpc(req.headers());
        let upgrade = (req.version() < http::Version::HTTP_2
            && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let host = request_host(&parts.uri, &parts.headers);
        let path = parts.uri.path().to_owned();
        let method = parts.method.clone();
        let mut log = AccessLog {
            started,
            method: method.clone(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            host: host.clone(),
            route: None,
            upstream: None,
            reason: None,
            grpc,
            request_bytes: Arc::new(AtomicU64::new(0)),
        };
        let h2 = parts.version == http::Version::HTTP_2;

        // Authorization first: a refused request learns nothing about routes.
        let policies = config.policies_for(ctx.service_host());
        if !policies.is_empty() {
            let a = Attributes {
                principal: Some(&ctx.peer.principal),
                source_namespace: Some(&ctx.peer.namespace),
                source_ip: ctx.peer.ip,
                host: host_without_port(&host),
                path: &path,
                method: method.as_str(),
                port: ctx.dst.port(),
                headers: &parts.headers,
            };
            let mut dry = Vec::new();
            let verdict = authz::evaluate(&policies, &a, &mut dry);
            for d in dry {
                info!(policy = %d.policy, would = d.would, src = %ctx.peer.principal, %path, "dry-run policy");
            }
            if let Verdict::Deny { policy, reason } = verdict {
                log.reason = Some(format!("denied by {policy}: {reason}"));
                return self.local_reply(&ctx, log, StatusCode::FORBIDDEN, "RBAC: access denied");
            }
        }

        let view = RequestView {
            method: &method,
            path: &path,
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let decision = match &ctx.target {
            Target::Service(s) => {
                config
                    .routes
                    .decide(&s.hostname, ctx.dst.port(), &ctx.peer.namespace, &view)
            }
            Target::Workload(_) => Decision::PassThrough,
        };
        let (rule, prefix) = match decision {
            Decision::PassThrough => (None, None),
            Decision::NoMatch => {
                log.reason = Some("no route matched".to_owned());
                return self.local_reply(&ctx, log, StatusCode::NOT_FOUND, "no route matched");
            }
            Decision::Matched { rule, prefix } => (Some(rule), prefix),
        };
        let mut response_headers: Vec<HeaderModifier> = Vec::new();
        let mut rewritten_host = None;
        let mut mirrors: Vec<Mirror> = Vec::new();
        if let Some(rule) = &rule {
            log.route = Some(format!("{}#{}", rule.route, rule.index));
            for f in &rule.filters {
                match f {
                    Filter::RequestHeaders(m) => m.apply(&mut parts.headers),
                    Filter::ResponseHeaders(m) => response_headers.push(m.clone()),
                    Filter::Redirect(r) => {
                        let resp =
                            redirect(r, &host, &parts.uri, prefix.as_deref(), ctx.dst.port());
                        return self.finish(
                            &ctx,
                            log,
                            resp.map(|b| b.map_err(|never| match never {}).boxed()),
                        );
                    }
                    Filter::Rewrite(r) => {
                        if let Some(h) = &r.hostname {
                            rewritten_host = Some(h.clone());
                        }
                        if let Some(m) = &r.path {
                            let new_path = m.apply(&path, prefix.as_deref());
                            set_path(&mut parts.uri, &new_path);
                        }
                    }
                    Filter::Mirror { backend, percent } => {
                        if fastrand::u32(0..100) < *percent
                            && let Some(m) = self.mirror(&config, backend, &parts, &host, h2)
                        {
                            mirrors.push(m);
                        }
                    }
                }
            }
        }

        // The backend: the rule's weighted choice, or the destination itself.
        let (backend_host, backend_port, backend_filters) = match &rule {
            None => match &ctx.target {
                Target::Service(s) => (Some(s.hostname.clone()), ctx.dst.port(), None),
                Target::Workload(_) => (None, ctx.dst.port(), None),
            },
            Some(rule) => match choose(rule) {
                None => {
                    log.reason = Some("the rule has no backend with weight".to_owned());
                    return self.local_reply(
                        &ctx,
                        log,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no backend",
                    );
                }
                Some(b) => match &b.target {
                    Err(why) => {
                        log.reason = Some(format!("invalid backend: {why}"));
                        return self.local_reply(
                            &ctx,
                            log,
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "invalid backend",
                        );
                    }
                    Ok((h, p)) => (Some(h.clone()), *p, Some(&b.filters)),
                },
            },
        };
        for f in backend_filters.into_iter().flatten() {
            match f {
                Filter::RequestHeaders(m) => m.apply(&mut parts.headers),
                Filter::ResponseHeaders(m) => response_headers.push(m.clone()),
                _ => {}
            }
        }
        let target = match &backend_host {
            Some(h) => match config.mesh.service_by_host(h) {
                Some(s) => Target::Service(Arc::clone(s)),
                None => {
                    log.reason = Some(format!("backend service {h} is unknown"));
                    return self.local_reply(
                        &ctx,
                        log,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy upstream",
                    );
                }
            },
            None => ctx.target.clone(),
        };
        let endpoints = endpoints(&config, &target, backend_port);
        if endpoints.is_empty() {
            log.reason = Some(format!(
                "{} has no healthy endpoint for port {backend_port}",
                backend_host.as_deref().unwrap_or("the workload")
            ));
            return self.local_reply(
                &ctx,
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
            );
        }

        // The request as sent upstream.
        let authority = match &rewritten_host {
            Some(h) => h.to_str().unwrap_or_default().to_owned(),
            None => host.clone(),
        };
        strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
        parts.headers.remove(header::HOST);
        trace_context(&mut parts.headers);
        if !parts.headers.contains_key("x-request-id") {
            let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
        }
        let version = if h2 { Version::Http2 } else { Version::Http1 };
        let retry = rule.as_ref().and_then(|r| r.retry.clone());
        let counter = Arc::clone(&log.request_bytes);
        let mut body = Some(Counted::new(body, counter, None).boxed());
        let buffered = match (&retry, body.take()) {
            (Some(_), Some(b)) if b.size_hint().upper().is_some_and(|n| n <= MAX_RETRY_BODY) => {
                match b.collect().await {
                    Ok(c) => Some(c.to_bytes()),
                    Err(e) => {
                        log.reason = Some(format!("reading the request body: {e}"));
                        return self.local_reply(
                            &ctx,
                            log,
                            StatusCode::BAD_REQUEST,
                            "bad request body",
                        );
                    }
                }
            }
            (_, b) => {
                body = b;
                None
            }
        };
        if !mirrors.is_empty() {
            let copies = match (&buffered, body.take()) {
                (Some(b), _) => (0..mirrors.len())
                    .map(|_| upstream::full(b.clone()))
                    .collect(),
                (None, Some(b)) => {
                    let (original, copies) = mirror::tee(b, mirrors.len());
                    body = Some(original);
                    copies
                }
                (None, None) => Vec::new(),
            };
            for (m, copy) in mirrors.into_iter().zip(copies) {
                m.send(&self.upstreams, copy);
            }
        }
        let attempts = 1 + retry.as_ref().map_or(0, |r| r.attempts);
        let per_try = rule.as_ref().and_then(|r| r.backend_timeout);
        let whole = rule.as_ref().and_then(|r| r.request_timeout);
        let send_all = async {
            let mut avoid = None;
            let mut last: Option<Result<Response<Incoming>, String>> = None;
            for attempt in 0..attempts {
                if attempt > 0
                    && let Some(r) = &retry
                {
                    tokio::time::sleep(jittered(r.backoff, attempt)).await;
                }
                let attempt_body = match (&buffered, body.take()) {
                    (Some(b), _) => upstream::full(b.clone()),
                    (None, Some(b)) => b,
                    (None, None) => break,
                };
                let Some(lease) = self.balancer.pick(
                    &endpoints.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
                    avoid,
                ) else {
                    break;
                };
                let Some((workload, _)) = endpoints.iter().find(|(_, a)| *a == lease.addr) else {
                    break;
                };
                let up = upstream_request(&parts, attempt_body, &authority, version);
                let addr = lease.addr;
                let sent = self.upstreams.send(workload, addr, version, up);
                let result = match per_try {
                    Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                    None => Ok(sent.await),
                };
                let more = attempt + 1 < attempts;
                match result {
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        lease.done(status < 500);
                        let retryable = retry.as_ref().is_some_and(|r| r.retries_status(status));
                        if retryable && more {
                            debug!(%addr, status, attempt, "retrying");
                            avoid = Some(addr);
                            last = Some(Ok(resp));
                            continue;
                        }
                        return Ok((resp, workload.clone()));
                    }
                    Ok(Err(e)) => {
                        lease.done(false);
                        let connect = e.is_connect();
                        debug!(%addr, error = %e, attempt, "upstream request failed");
                        last = Some(Err(describe(&e)));
                        if retry.is_some() && more {
                            avoid = Some(addr);
                            continue;
                        }
                        return Err((
                            if connect {
                                StatusCode::SERVICE_UNAVAILABLE
                            } else {
                                StatusCode::BAD_GATEWAY
                            },
                            describe(&e),
                        ));
                    }
                    Err(()) => {
                        lease.done(false);
                        last = Some(Err(format!(
                            "no response from {addr} within the backend timeout"
                        )));
                        if retry.is_some() && more {
                            avoid = Some(addr);
                            continue;
                        }
                        return Err((
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout".to_owned(),
                        ));
                    }
                }
            }
            match last {
                Some(Ok(resp)) => {
                    let w = endpoints[0].0.clone();
                    Ok((resp, w))
                }
                Some(Err(e)) => Err((StatusCode::SERVICE_UNAVAILABLE, e)),
                None => Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream".to_owned(),
                )),
            }
        };
        let outcome = match whole {
            Some(t) => match tokio::time::timeout(t, send_all).await {
                Ok(r) => r,
                Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "request timeout".to_owned())),
            },
            None => send_all.await,
        };
        match outcome {
            Err((status, why)) => {
                log.reason = Some(why.clone());
                self.local_reply(&ctx, log, status, &why)
            }
            Ok((mut resp, workload)) => {
                log.upstream = Some(workload);
                for m in &response_headers {
                    m.apply(resp.headers_mut());
                }
                if let Some(client_side) = upgrade
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        let (Ok(down), Ok(up)) = (client_side.await, upstream_side.await) else {
                            debug!("upgrade failed on one side");
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(down),
                            &mut TokioIo::new(up),
                        )
                        .await;
                    });
                }
                self.finish(&ctx, log, resp.map(|b| b.map_err(BoxError::from).boxed()))
            }
        }
    }

    /// A copy of the request for `backend`, addressed and with an endpoint leased; its body
    /// follows once the original's is known (see [`mirror`]).
    fn mirror(
        &self,
        config: &Config,
        backend: &Backend,
        parts: &http::request::Parts,
        host: &str,
        h2: bool,
    ) -> Option<Mirror> {
        let (h, port) = backend.target.as_ref().ok()?;
        let svc = config.mesh.service_by_host(h)?;
        let endpoints = endpoints(config, &Target::Service(Arc::clone(svc)), *port);
        let lease = self
            .balancer
            .pick(&endpoints.iter().map(|(_, a)| *a).collect::<Vec<_>>(), None)?;
        let (workload, _) = endpoints.into_iter().find(|(_, a)| *a == lease.addr)?;
        let version = if h2 { Version::Http2 } else { Version::Http1 };
        let mut req = upstream_request(parts, (), host, version);
        strip_hop_by_hop(req.headers_mut(), false);
        Some(Mirror {
            req,
            workload,
            lease,
            version,
        })
    }

    /// A response the waypoint makes itself; gRPC clients get it as a gRPC status.
    fn local_reply(
        &self,
        ctx: &StreamCtx,
        log: AccessLog,
        status: StatusCode,
        message: &str,
    ) -> Response<Body> {
        let resp = if log.grpc {
            let code = match status {
                StatusCode::FORBIDDEN => 7,
                StatusCode::NOT_FOUND => 12,
                StatusCode::GATEWAY_TIMEOUT => 4,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => 14,
                _ => 13,
            };
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", code.to_string())
                .header(
                    "grpc-message",
                    HeaderValue::from_str(message).unwrap_or(HeaderValue::from_static("error")),
                )
                .header("x-waypoint-status", status.as_str())
                .body(upstream::empty())
        } else {
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(upstream::full(Bytes::from(format!("{message}\n"))))
        };
        let resp = resp.unwrap_or_else(|_| Response::new(upstream::empty()));
        let mut log = log;
        if log.grpc {
            // Counted under the status the client would have seen over plain HTTP.
            log.reason.get_or_insert_with(|| message.to_owned());
        }
        let code = status;
        self.finish_with_code(ctx, log, resp, code)
    }

    fn finish(&self, ctx: &StreamCtx, log: AccessLog, resp: Response<Body>) -> Response<Body> {
        let code = resp.status();
        self.finish_with_code(ctx, log, resp, code)
    }

    /// Wraps the response body so the request is counted and logged once it is complete.
    fn finish_with_code(
        &self,
        ctx: &StreamCtx,
        log: AccessLog,
        resp: Response<Body>,
        code: StatusCode,
    ) -> Response<Body> {
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: ctx
                .peer
                .workload
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |w| w.name.clone()),
            source_workload_namespace: ctx.peer.namespace.clone(),
            source_principal: format!("spiffe://{}", ctx.peer.principal),
            destination_service: ctx.service_host().unwrap_or("unknown").to_owned(),
            destination_service_namespace: ctx.target_namespace().to_owned(),
            destination_workload: log
                .upstream
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |w| w.name.clone()),
            destination_workload_namespace: log
                .upstream
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |w| w.namespace.clone()),
            request_protocol: if log.grpc { "grpc" } else { "http" },
            response_code: code.as_u16(),
            response_flags: if log.reason.is_some() { "local" } else { "-" },
        };
        let metrics = self.metrics.clone();
        let src = ctx.peer.principal.clone();
        let dst = ctx.dst;
        let (parts, body) = resp.into_parts();
        let on_end = Box::new(move |resp_bytes: u64| {
            let ms = log.started.elapsed().as_secs_f64() * 1000.0;
            let req_bytes = log.request_bytes.load(Ordering::Relaxed);
            metrics.request(&labels, ms, req_bytes, resp_bytes);
            info!(
                target: "access",
                src = %src,
                %dst,
                method = %log.method,
                host = %log.host,
                path = %log.path,
                status = code.as_u16(),
                route = log.route.as_deref().unwrap_or("-"),
                upstream = log.upstream.as_ref().map_or("-", |w| w.name.as_str()),
                reason = log.reason.as_deref().unwrap_or("-"),
                request_bytes = req_bytes,
                response_bytes = resp_bytes,
                duration_ms = format!("{ms:.3}"),
                "request"
            );
        });
        let body = Counted::new(body, Arc::new(AtomicU64::new(0)), Some(on_end)).boxed();
        Response::from_parts(parts, body)
    }
}

/// What the access log and metrics need once a request ends.
struct AccessLog {
    started: Instant,
    method: Method,
    path: String,
    host: String,
    route: Option<String>,
    upstream: Option<Arc<Workload>>,
    reason: Option<String>,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
}

fn describe(e: &UpstreamError) -> String {
    e.to_string()
}

/// Backoff before retry `attempt` (1-based): the base, doubled per attempt, ±50%.
fn jittered(base: Duration, attempt: u32) -> Duration {
    let base = if base.is_zero() {
        Duration::from_millis(25)
    } else {
        base
    };
    base.saturating_mul(1 << (attempt - 1).min(6))
        .mul_f64(0.5 + fastrand::f64())
}

/// The weighted random choice among a rule's backends.
fn choose(rule: &Rule) -> Option<&Backend> {
    if rule.total_weight == 0 {
        return None;
    }
    let mut x = fastrand::u64(..rule.total_weight);
    for b in &rule.backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    None
}

/// The healthy endpoints of `target` for `port`: each workload with the address and target
/// port to reach it on.
fn endpoints(config: &Config, target: &Target, port: u16) -> Vec<(Arc<Workload>, SocketAddr)> {
    match target {
        Target::Workload(w) => w
            .addresses
            .first()
            .map(|ip| vec![(Arc::clone(w), SocketAddr::new(*ip, port))])
            .unwrap_or_default(),
        Target::Service(svc) => {
            let Some(service_target) = svc.target_port(port) else {
                return Vec::new();
            };
            svc.endpoints
                .iter()
                .filter_map(|uid| config.mesh.workload_by_uid(uid))
                .filter(|w| w.healthy)
                .filter_map(|w| {
                    let ip = w.addresses.first()?;
                    let p = w.target_port(&svc.key(), port).unwrap_or(service_target);
                    Some((Arc::clone(w), SocketAddr::new(*ip, p)))
                })
                .collect()
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The request's host (with port, if it had one): `:authority`, else `Host`.
fn request_host(uri: &Uri, headers: &HeaderMap) -> String {
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn host_without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') && !h.contains(':') && p.parse::<u16>().is_ok() => h,
        Some((h, p)) if h.ends_with(']') && p.parse::<u16>().is_ok() => h,
        _ => host,
    }
}

/// Replaces the path of `uri`, keeping its query.
fn set_path(uri: &mut Uri, path: &str) {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(parts) {
            *uri = u;
        }
    }
}

/// The request sent upstream: `parts` with `body`, addressed for `version`.
fn upstream_request<B>(
    parts: &http::request::Parts,
    body: B,
    authority: &str,
    version: Version,
) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.uri_mut() = upstream_uri(&parts.uri, authority, version);
    req.headers_mut().remove(header::HOST);
    if version == Version::Http1
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

/// Origin form for HTTP/1.1 (the host goes in `Host`), absolute for HTTP/2 (`:authority`).
fn upstream_uri(uri: &Uri, authority: &str, version: Version) -> Uri {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let built = match version {
        Version::Http1 => pq.parse::<Uri>(),
        Version::Http2 => format!("http://{authority}{pq}").parse::<Uri>(),
    };
    built.unwrap_or_else(|_| uri.clone())
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1). The upgrade
/// headers stay on an upgrade request, which must reach the backend as such.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(c) = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
    {
        let named: Vec<String> = c
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !(s.is_empty() || keep_upgrade && s == "upgrade"))
            .collect();
        for n in named {
            headers.remove(n.as_str());
        }
    }
    for h in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(h);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// W3C trace context: the waypoint is a hop of its own, so a request carrying `traceparent`
/// keeps its trace id with a new parent id, and one without gets a new trace.
fn trace_context(headers: &mut HeaderMap) {
    let span = fastrand::u64(1..);
    let next = match headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        Some(tp) => match tp.split('-').collect::<Vec<_>>().as_slice() {
            ["00", trace, _parent, flags]
                if trace.len() == 32
                    && flags.len() == 2
                    && trace.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                format!("00-{trace}-{span:016x}-{flags}")
            }
            _ => format!(
                "00-{:016x}{:016x}-{span:016x}-01",
                fastrand::u64(1..),
                fastrand::u64(..)
            ),
        },
        None => format!(
            "00-{:016x}{:016x}-{span:016x}-01",
            fastrand::u64(1..),
            fastrand::u64(..)
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&next) {
        headers.insert("traceparent", v);
    }
}

fn redirect(
    r: &Redirect,
    host: &str,
    uri: &Uri,
    prefix: Option<&str>,
    service_port: u16,
) -> Response<Full<Bytes>> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let hostname = r
        .hostname
        .as_deref()
        .unwrap_or_else(|| host_without_port(host));
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(s)) => well_known_port(s),
        (None, None) => service_port,
    };
    let port_part = if port == well_known_port(scheme) {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = match &r.path {
        Some(m) => m.apply(uri.path(), prefix),
        None => uri.path().to_owned(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{hostname}{port_part}{path}{query}");
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn well_known_port(scheme: &str) -> u16 {
    match scheme {
        "https" => 443,
        _ => 80,
    }
}

/// A body that counts the data passing through and reports the total once, at its end (or
/// when dropped early).
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> Counted<B> {
    fn new(
        inner: B,
        count: Arc<AtomicU64>,
        on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
    ) -> Self {
        Self {
            inner,
            count,
            on_end,
        }
    }

    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.count.load(Ordering::Relaxed));
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.end();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.end();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;

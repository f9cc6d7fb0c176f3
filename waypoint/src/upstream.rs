//! Upstreams: picking an endpoint per request (least outstanding requests between two random
//! choices), passive outlier detection, and pooled HTTP connections over HBONE.
//!
//! - An endpoint that fails `consecutive_failures` times in a row (a 5xx answer or a failed
//!   connection) is ejected for the base ejection time, doubled with each ejection up to the
//!   maximum; once the time is up it takes traffic again. At most half an endpoint set is
//!   ejected at once, so a broken deployment degrades rather than goes dark.
//! - HTTP/2 connections are shared by all requests to an endpoint; HTTP/1.1 connections are
//!   kept idle per endpoint and reused. Each rides its own HBONE stream from the shared HBONE
//!   pool, so many requests to one node share one mutual-TLS connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::SpiffeId;
use mesh_core::hbone::{Dialer, Pool, PoolKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;
use ztunnel::state::{Protocol, Workload};

use crate::config::OutlierConfig;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A [`Body`] of exactly `bytes`.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An empty [`Body`].
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
/// Endpoint records not used for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Health and load of one endpoint.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until: AtomicU64,
    last_used: AtomicU64,
}

impl EndpointStats {
    fn new(now: u64) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            last_used: AtomicU64::new(now),
        }
    }
}

/// Picks endpoints and keeps their health.
pub struct Balancer {
    outlier: OutlierConfig,
    epoch: Instant,
    stats: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
}

/// A request in flight to an endpoint; report how it went with [`Lease::done`].
pub struct Lease {
    pub addr: SocketAddr,
    stats: Arc<EndpointStats>,
    balancer: Arc<Balancer>,
}

impl Lease {
    /// Records the outcome: `ok` false for a 5xx or a failed connection. A lease dropped
    /// without it (the client went away) counts neither way.
    pub fn done(self, ok: bool) {
        self.balancer.record(&self.stats, self.addr, ok);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(outlier: OutlierConfig) -> Arc<Self> {
        Arc::new(Self {
            outlier,
            epoch: Instant::now(),
            stats: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stats_for(&self, addrs: &[SocketAddr]) -> Vec<Arc<EndpointStats>> {
        let now = self.now_ms();
        let mut map = self.stats.lock().expect("balancer lock poisoned");
        addrs
            .iter()
            .map(|a| {
                let s = map
                    .entry(*a)
                    .or_insert_with(|| Arc::new(EndpointStats::new(now)));
                s.last_used.store(now, Ordering::Relaxed);
                Arc::clone(s)
            })
            .collect()
    }

    /// Chooses among `candidates` (not empty), avoiding `avoid` (a failed attempt's endpoint)
    /// when there is a choice.
    pub fn pick(
        self: &Arc<Self>,
        candidates: &[SocketAddr],
        avoid: Option<SocketAddr>,
    ) -> Option<Lease> {
        if candidates.is_empty() {
            return None;
        }
        let stats = self.stats_for(candidates);
        let now = self.now_ms();
        let mut usable: Vec<usize> = (0..candidates.len())
            .filter(|i| stats[*i].ejected_until.load(Ordering::Relaxed) <= now)
            .collect();
        if usable.is_empty() {
            usable = (0..candidates.len()).collect();
        }
        if usable.len() > 1
            && let Some(a) = avoid
        {
            usable.retain(|i| candidates[*i] != a);
        }
        let i = match usable.len() {
            1 => usable[0],
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (usable[a], usable[b]);
                if stats[b].in_flight.load(Ordering::Relaxed)
                    < stats[a].in_flight.load(Ordering::Relaxed)
                {
                    b
                } else {
                    a
                }
            }
        };
        stats[i].in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            addr: candidates[i],
            stats: Arc::clone(&stats[i]),
            balancer: Arc::clone(self),
        })
    }

    fn record(&self, s: &EndpointStats, addr: SocketAddr, ok: bool) {
        if ok {
            s.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = s.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < self.outlier.consecutive_failures {
            return;
        }
        let now = self.now_ms();
        if s.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        if !self.may_eject(addr, now) {
            return;
        }
        let times = s.ejections.fetch_add(1, Ordering::Relaxed);
        let ejection = self
            .outlier
            .base_ejection
            .saturating_mul(1 << times.min(16))
            .min(self.outlier.max_ejection);
        s.ejected_until
            .store(now + ejection.as_millis() as u64, Ordering::Relaxed);
        s.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %addr,
            failures = n,
            ejected_for_ms = ejection.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
    }

    /// At most half of the endpoints sharing `addr`'s port are ejected at once.
    fn may_eject(&self, addr: SocketAddr, now: u64) -> bool {
        let map = self.stats.lock().expect("balancer lock poisoned");
        let recent = now.saturating_sub(FORGET_AFTER.as_millis() as u64);
        let peers: Vec<&Arc<EndpointStats>> = map
            .iter()
            .filter(|(a, s)| {
                a.port() == addr.port() && s.last_used.load(Ordering::Relaxed) >= recent
            })
            .map(|(_, s)| s)
            .collect();
        let ejected = peers
            .iter()
            .filter(|s| s.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        (ejected + 1) * 2 <= peers.len().max(2)
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = self.now_ms();
        self.stats
            .lock()
            .expect("balancer lock poisoned")
            .get(&addr)
            .is_some_and(|s| s.ejected_until.load(Ordering::Relaxed) > now)
    }

    /// Endpoint health for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let now = self.now_ms();
        let map = self.stats.lock().expect("balancer lock poisoned");
        let mut v: Vec<_> = map
            .iter()
            .map(|(a, s)| {
                let until = s.ejected_until.load(Ordering::Relaxed);
                serde_json::json!({
                    "address": a.to_string(),
                    "inFlight": s.in_flight.load(Ordering::Relaxed),
                    "consecutiveFailures": s.consecutive_failures.load(Ordering::Relaxed),
                    "ejections": s.ejections.load(Ordering::Relaxed),
                    "ejectedForMs": until.saturating_sub(now),
                })
            })
            .collect();
        v.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
        serde_json::Value::Array(v)
    }

    /// Forgets endpoints unused for a long time.
    pub fn forget_unused(&self) {
        let now = self.now_ms();
        let cutoff = now.saturating_sub(FORGET_AFTER.as_millis() as u64);
        self.stats
            .lock()
            .expect("balancer lock poisoned")
            .retain(|_, s| {
                s.last_used.load(Ordering::Relaxed) >= cutoff
                    || s.in_flight.load(Ordering::Relaxed) > 0
            });
    }
}

/// HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Why a request could not be sent upstream (no response came back).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("request to {addr} failed: {error}")]
    Request {
        addr: SocketAddr,
        error: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the request may have reached the application (a retry may repeat it).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

enum Idle {
    H1(Vec<http1::SendRequest<Body>>),
    H2(http2::SendRequest<Body>),
}

/// Pooled upstream HTTP connections.
pub struct Upstreams {
    identity: SpiffeId,
    hbone: Pool,
    dialer: Dialer,
    idle: Mutex<HashMap<(SocketAddr, Version), Idle>>,
    /// Serialises the opening of HTTP/2 connections per endpoint, so a burst opens one.
    opening: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
}

/// A byte stream to an endpoint: over HBONE, or plain TCP to a workload outside the mesh.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl Upstreams {
    pub fn new(identity: SpiffeId, hbone: Pool, dialer: Dialer) -> Self {
        Self {
            identity,
            hbone,
            dialer,
            idle: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a byte stream to `addr` on `workload`.
    pub async fn open(
        &self,
        workload: &Workload,
        addr: SocketAddr,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let err = |reason: String| UpstreamError::Connect { addr, reason };
        match workload.protocol {
            Protocol::Hbone => {
                let key = PoolKey {
                    src: self.identity.clone(),
                    dst: vec![workload.identity.clone()],
                    addr: SocketAddr::new(addr.ip(), mesh_core::hbone::HBONE_PORT),
                    src_ip: None,
                };
                let req = Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(addr.to_string())
                    .body(())
                    .map_err(|e| err(e.to_string()))?;
                let stream = self
                    .hbone
                    .connect(&key, req)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                Ok(Box::new(stream.into_io()))
            }
            _ => {
                let tcp = self
                    .dialer
                    .connect(addr, None)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                Ok(Box::new(tcp))
            }
        }
    }

    /// Sends `req` to `addr` on `workload` over `version`.
    pub async fn send(
        &self,
        workload: &Workload,
        addr: SocketAddr,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match version {
            Version::Http1 => {
                let mut sender = match self.idle_h1(addr) {
                    Some(s) => s,
                    None => {
                        let io = self.open(workload, addr).await?;
                        let (sender, conn) = http1::Builder::new()
                            .handshake(TokioIo::new(io))
                            .await
                            .map_err(|error| UpstreamError::Request { addr, error })?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.with_upgrades().await {
                                debug!(error = %e, "upstream HTTP/1.1 connection ended");
                            }
                        });
                        sender
                    }
                };
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|error| UpstreamError::Request { addr, error })?;
                self.return_h1(addr, sender);
                Ok(resp)
            }
            Version::Http2 => {
                let mut sender = self.h2_sender(workload, addr).await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|error| UpstreamError::Request { addr, error })
            }
        }
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let Some(Idle::H1(list)) = idle.get_mut(&(addr, Version::Http1)) else {
            return None;
        };
        list.retain(|s| !s.is_closed());
        let i = list.iter().position(|s| s.is_ready())?;
        Some(list.swap_remove(i))
    }

    /// Keeps a connection whose response is under way: it is reused once ready again.
    fn return_h1(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let entry = idle
            .entry((addr, Version::Http1))
            .or_insert_with(|| Idle::H1(Vec::new()));
        if let Idle::H1(list) = entry {
            list.retain(|s| !s.is_closed());
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(sender);
            }
        }
    }

    async fn h2_sender(
        &self,
        workload: &Workload,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(s) = self.live_h2(addr) {
            return Ok(s);
        }
        let gate = {
            let mut opening = self.opening.lock().expect("pool lock poisoned");
            Arc::clone(opening.entry(addr).or_default())
        };
        let _guard = gate.lock().await;
        if let Some(s) = self.live_h2(addr) {
            return Ok(s);
        }
        let io = self.open(workload, addr).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| UpstreamError::Request { addr, error })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.idle
            .lock()
            .expect("pool lock poisoned")
            .insert((addr, Version::Http2), Idle::H2(sender.clone()));
        Ok(sender)
    }

    fn live_h2(&self, addr: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        match idle.get(&(addr, Version::Http2)) {
            Some(Idle::H2(s)) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                idle.remove(&(addr, Version::Http2));
                None
            }
            None => None,
        }
    }

    /// Drops pooled connections to endpoints no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(IpAddr) -> bool) {
        self.idle
            .lock()
            .expect("pool lock poisoned")
            .retain(|(a, _), _| keep(a.ip()));
        self.opening
            .lock()
            .expect("pool lock poisoned")
            .retain(|a, _| keep(a.ip()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    fn outlier() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(200),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_less_loaded_of_two_is_chosen() {
        let b = Balancer::new(outlier());
        let eps = addrs(2);
        // Ten requests held open on the first endpoint…
        let held: Vec<Lease> = (0..10).map(|_| b.pick(&eps[..1], None).unwrap()).collect();
        // …so with two candidates every new one goes to the second.
        for _ in 0..20 {
            let l = b.pick(&eps, None).unwrap();
            assert_eq!(l.addr, eps[1]);
            l.done(true);
        }
        drop(held);
    }

    #[test]
    fn consecutive_failures_eject_and_time_brings_back() {
        let b = Balancer::new(outlier());
        let eps = addrs(2);
        for _ in 0..3 {
            b.pick(&eps[..1], None).unwrap().done(false);
        }
        assert!(b.is_ejected(eps[0]));
        for _ in 0..50 {
            let l = b.pick(&eps, None).unwrap();
            assert_eq!(l.addr, eps[1], "an ejected endpoint gets no traffic");
            l.done(true);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(!b.is_ejected(eps[0]));
        let back = (0..50)
            .filter(|_| {
                let l = b.pick(&eps, None).unwrap();
                let hit = l.addr == eps[0];
                l.done(true);
                hit
            })
            .count();
        assert!(
            back > 0,
            "the endpoint takes traffic again after its ejection"
        );
    }

    #[test]
    fn a_success_resets_the_count_and_half_at_most_are_ejected() {
        let b = Balancer::new(outlier());
        let eps = addrs(2);
        for _ in 0..2 {
            b.pick(&eps[..1], None).unwrap().done(false);
        }
        b.pick(&eps[..1], None).unwrap().done(true);
        b.pick(&eps[..1], None).unwrap().done(false);
        assert!(!b.is_ejected(eps[0]), "failures were not consecutive");
        // Both fail: only one of the two may be ejected.
        b.pick(&eps, None).unwrap().done(true);
        for _ in 0..3 {
            b.pick(&eps[..1], None).unwrap().done(false);
            b.pick(&eps[1..], None).unwrap().done(false);
        }
        let ejected = eps.iter().filter(|a| b.is_ejected(**a)).count();
        assert_eq!(ejected, 1);
        // With every candidate ejected, traffic still flows.
        assert!(b.pick(&eps[..1], None).is_some());
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let b = Balancer::new(outlier());
        let eps = addrs(3);
        for _ in 0..30 {
            let l = b.pick(&eps, Some(eps[0])).unwrap();
            assert_ne!(l.addr, eps[0]);
            l.done(true);
        }
        // With no other choice it is used all the same.
        assert_eq!(b.pick(&eps[..1], Some(eps[0])).unwrap().addr, eps[0]);
    }
}

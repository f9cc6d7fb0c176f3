//! The HBONE client: a pool of mTLS HTTP/2 connections, many CONNECT streams on each.
//!
//! Connections are keyed by (source identity, expected destination identities, destination
//! address). For one key, connections are opened one at a time: a burst of callers for a new
//! key shares the first connection instead of racing to open many, and if opening fails every
//! caller that was waiting for it gets that failure instead of retrying one after another.
//! A connection is dropped from the pool the moment its driver ends (GOAWAY, error, or a
//! PING left unanswered), so a dead connection is never handed out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{
    CLIENT_MAX_STREAMS, H2Stream, HboneError, PING_INTERVAL, PING_TIMEOUT, REASON_HEADER,
    h2_client_builder, keepalive,
};
use crate::certs::CertManager;
use crate::identity::SpiffeId;
use crate::tls;

/// Who connects to whom: one pool of connections per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: Vec<SpiffeId>,
    pub addr: SocketAddr,
    /// Source address to bind, so the far side sees the workload's own address.
    pub src_ip: Option<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub tls_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: CLIENT_MAX_STREAMS,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            tls_timeout: Duration::from_secs(10),
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
        }
    }
}

/// Where a connection's socket is made. Normally in the proxy's own network namespace; with
/// in-pod capture a workload's sockets are made inside its pod's namespace, so they leave
/// through the pod's interface with its address.
pub trait SocketMaker: Send + Sync + std::fmt::Debug {
    /// A TCP socket for a connection made on behalf of the local workload at `owner`, or
    /// `None` when that workload has no namespace of its own here.
    fn tcp_for(&self, owner: IpAddr, v6: bool) -> std::io::Result<Option<TcpSocket>>;
}

/// Opens the TCP connections HBONE runs over, and the plain ones to applications.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    /// SO_MARK for the proxy's own sockets, so in-pod redirection rules skip them.
    pub mark: Option<u32>,
    /// Makes sockets in a workload's own network namespace (in-pod capture).
    pub sockets: Option<Arc<dyn SocketMaker>>,
}

impl Dialer {
    /// Connects to `addr`, from `src_ip` when given and of the same family (and inside the
    /// namespace of the workload at `src_ip`, if it has one).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> std::io::Result<TcpStream> {
        self.connect_for(addr, src_ip, src_ip).await
    }

    /// Like [`connect`](Self::connect), with the socket made for the local workload at
    /// `owner` (in its network namespace, when it has one).
    pub async fn connect_for(
        &self,
        addr: SocketAddr,
        src_ip: Option<IpAddr>,
        owner: Option<IpAddr>,
    ) -> std::io::Result<TcpStream> {
        let v6 = addr.is_ipv6();
        let made = match (&self.sockets, owner) {
            (Some(maker), Some(owner)) => maker.tcp_for(owner, v6)?,
            _ => None,
        };
        let socket = match made {
            Some(s) => s,
            None if v6 => TcpSocket::new_v6()?,
            None => TcpSocket::new_v4()?,
        };
        if let Some(mark) = self.mark {
            socket2::SockRef::from(&socket).set_mark(mark)?;
        }
        socket.set_nodelay(true)?;
        if let Some(ip) = src_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            crate::sockets::set_bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    }
}

/// A CONNECT stream checked out of the pool. Dropping it frees its slot on the connection.
pub struct PooledStream {
    pub stream: H2Stream,
    _slot: StreamSlot,
}

impl PooledStream {
    /// The stream as bytes to read and write; it keeps its slot for as long as it lives.
    pub fn into_io(self) -> super::StreamIo {
        super::StreamIo::holding(self.stream, self._slot)
    }
}

/// Counts reported by `/config_dump`.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub src: String,
    pub dst: Vec<String>,
    pub addr: SocketAddr,
    pub connections: Vec<ConnStats>,
}

#[derive(Debug, Clone)]
pub struct ConnStats {
    pub id: u64,
    /// A dead connection still listed would be a bug: it is removed as its driver ends.
    pub dead: bool,
    /// Takes no new streams (the peer sent GOAWAY); the ones on it finish.
    pub retired: bool,
    pub active_streams: usize,
    pub idle_for_ms: Option<u64>,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: PoolConfig,
    certs: CertManager,
    dialer: Dialer,
    keys: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct KeyPool {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while opening a connection for this key.
    opening: tokio::sync::Mutex<()>,
    /// Counts completed attempts to open, and the outcome of the last one.
    attempts: AtomicU64,
    last_error: Mutex<Option<HboneError>>,
}

struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    dead: AtomicBool,
    retired: AtomicBool,
    idle_since: Mutex<Option<Instant>>,
    driver: Mutex<Option<tokio::task::AbortHandle>>,
}

pub(super) struct StreamSlot {
    conn: Arc<Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().expect("idle lock poisoned") = Some(Instant::now());
        }
    }
}

impl Conn {
    /// Stops handing this connection out; streams already on it finish undisturbed (after a
    /// GOAWAY the peer still serves them), and the driver ends when they do.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Closes the connection now, whatever is on it.
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        if let Some(h) = self.driver.lock().expect("driver lock poisoned").take() {
            h.abort();
        }
    }
}

impl KeyPool {
    /// Claims a stream on a live connection with room, if there is one.
    fn claim(&self, max: usize) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().expect("pool lock poisoned");
        // Prefer the busiest connection that still has room, so idle ones can age out.
        let conn = conns
            .iter()
            .filter(|c| !c.dead.load(Ordering::Acquire) && !c.retired.load(Ordering::Acquire))
            // The peer may allow fewer streams than we would open.
            .filter(|c| {
                c.active.load(Ordering::Acquire) < max.min(c.send.current_max_send_streams())
            })
            .max_by_key(|c| c.active.load(Ordering::Acquire))?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        *conn.idle_since.lock().expect("idle lock poisoned") = None;
        Some(conn.clone())
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .expect("pool lock poisoned")
            .retain(|c| c.id != id);
    }
}

impl Pool {
    pub fn new(cfg: PoolConfig, certs: CertManager, dialer: Dialer) -> Self {
        let inner = Arc::new(Inner {
            cfg,
            certs,
            dialer,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Opens a CONNECT stream to `authority` through a pooled connection for `key`; returns
    /// once the far side answered 200.
    pub async fn connect(
        &self,
        key: &PoolKey,
        request: Request<()>,
    ) -> Result<PooledStream, HboneError> {
        // One deadline for everything: a peer that accepts and never answers must not hold
        // the caller forever.
        let deadline = self.inner.cfg.connect_timeout + self.inner.cfg.tls_timeout;
        tokio::time::timeout(deadline, self.open_stream(key, request))
            .await
            .map_err(|_| HboneError::StreamTimeout(key.addr))?
    }

    async fn open_stream(
        &self,
        key: &PoolKey,
        request: Request<()>,
    ) -> Result<PooledStream, HboneError> {
        debug_assert_eq!(request.method(), Method::CONNECT);
        let kp = self.key_pool(key);
        // One retry: a pooled connection may have received GOAWAY just before we used it.
        let mut retried = false;
        loop {
            let conn = self.checkout(key, &kp).await?;
            let slot = StreamSlot { conn: conn.clone() };
            let send = conn.send.clone();
            let sent = match send.ready().await {
                Ok(mut ready) => ready.send_request(clone_request(&request), false),
                Err(e) => Err(e),
            };
            let (response, send_stream) = match sent {
                Ok(pair) => pair,
                Err(e) if !retried => {
                    debug!(conn = conn.id, error = %e, "pooled connection unusable, retrying");
                    // Still listed (its streams are in flight) but never handed out again; it
                    // leaves the pool when its driver ends or its last stream closes.
                    conn.retire();
                    retried = true;
                    continue;
                }
                Err(e) => {
                    return Err(HboneError::H2 {
                        addr: key.addr,
                        error: Arc::new(e),
                    });
                }
            };
            let response = response.await.map_err(|e| HboneError::H2 {
                addr: key.addr,
                error: Arc::new(e),
            })?;
            if response.status() != StatusCode::OK {
                let reason = response
                    .headers()
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                return Err(HboneError::Refused {
                    status: response.status(),
                    reason,
                });
            }
            return Ok(PooledStream {
                stream: H2Stream {
                    send: send_stream,
                    recv: response.into_body(),
                },
                _slot: slot,
            });
        }
    }

    /// Connections per key, for debugging.
    pub fn stats(&self) -> Vec<PoolStats> {
        let keys = self.inner.keys.lock().expect("pool map lock poisoned");
        let now = Instant::now();
        let mut out: Vec<_> = keys
            .iter()
            .map(|(k, kp)| PoolStats {
                src: k.src.to_string(),
                dst: k.dst.iter().map(ToString::to_string).collect(),
                addr: k.addr,
                connections: kp
                    .conns
                    .lock()
                    .expect("pool lock poisoned")
                    .iter()
                    .map(|c| ConnStats {
                        id: c.id,
                        dead: c.dead.load(Ordering::Acquire),
                        retired: c.retired.load(Ordering::Acquire),
                        active_streams: c.active.load(Ordering::Acquire),
                        idle_for_ms: c
                            .idle_since
                            .lock()
                            .expect("idle lock poisoned")
                            .map(|t| now.duration_since(t).as_millis() as u64),
                    })
                    .collect(),
            })
            .filter(|s| !s.connections.is_empty())
            .collect();
        out.sort_by(|a, b| (&a.src, a.addr).cmp(&(&b.src, b.addr)));
        out
    }

    fn key_pool(&self, key: &PoolKey) -> Arc<KeyPool> {
        let mut keys = self.inner.keys.lock().expect("pool map lock poisoned");
        if let Some(kp) = keys.get(key) {
            return kp.clone();
        }
        keys.entry(key.clone()).or_default().clone()
    }

    async fn checkout(&self, key: &PoolKey, kp: &Arc<KeyPool>) -> Result<Arc<Conn>, HboneError> {
        let max = self.inner.cfg.max_streams;
        if let Some(c) = kp.claim(max) {
            return Ok(c);
        }
        let seen = kp.attempts.load(Ordering::Acquire);
        let _opening = kp.opening.lock().await;
        if let Some(c) = kp.claim(max) {
            return Ok(c);
        }
        if kp.attempts.load(Ordering::Acquire) != seen {
            // Someone tried while we waited and failed: share their answer.
            if let Some(e) = kp.last_error.lock().expect("error lock poisoned").clone() {
                return Err(e);
            }
        }
        let result = self.open(key, kp).await;
        *kp.last_error.lock().expect("error lock poisoned") = result.as_ref().err().cloned();
        kp.attempts.fetch_add(1, Ordering::AcqRel);
        let conn = result?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        *conn.idle_since.lock().expect("idle lock poisoned") = None;
        kp.conns
            .lock()
            .expect("pool lock poisoned")
            .push(conn.clone());
        Ok(conn)
    }

    async fn open(&self, key: &PoolKey, kp: &Arc<KeyPool>) -> Result<Arc<Conn>, HboneError> {
        let cfg = &self.inner.cfg;
        let addr = key.addr;
        let cert = self.inner.certs.fetch(&key.src).await?;
        let tls_cfg = cert
            .client_config(key.dst.clone())
            .map_err(|e| HboneError::TlsConfig(e.to_string()))?;
        let tcp = tokio::time::timeout(
            cfg.connect_timeout,
            self.inner.dialer.connect(addr, key.src_ip),
        )
        .await
        .map_err(|_| HboneError::ConnectTimeout(addr))?
        .map_err(|e| HboneError::Connect {
            addr,
            error: Arc::new(e),
        })?;
        let tls = tokio::time::timeout(
            cfg.tls_timeout,
            TlsConnector::from(tls_cfg).connect(tls::placeholder_server_name(), tcp),
        )
        .await
        .map_err(|_| HboneError::TlsTimeout(addr))?
        .map_err(|e| HboneError::Tls {
            addr,
            error: tls::describe_handshake_error(&e),
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::NoH2 { addr });
        }
        let (send, mut connection) = tokio::time::timeout(
            cfg.tls_timeout,
            h2_client_builder().handshake::<_, Bytes>(tls),
        )
        .await
        .map_err(|_| HboneError::TlsTimeout(addr))?
        .map_err(|e| HboneError::H2 {
            addr,
            error: Arc::new(e),
        })?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            send,
            active: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            idle_since: Mutex::new(Some(Instant::now())),
            driver: Mutex::new(None),
        });
        let ping = connection.ping_pong();
        let (interval, timeout) = (cfg.ping_interval, cfg.ping_timeout);
        let weak_conn = Arc::downgrade(&conn);
        let weak_kp = Arc::downgrade(kp);
        let driver = tokio::spawn(async move {
            let unanswered = async {
                match ping {
                    Some(pp) => keepalive(pp, interval, timeout).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                res = connection => {
                    if let Err(e) = res {
                        debug!(conn = id, %addr, error = %e, "HBONE connection ended");
                    }
                }
                true = unanswered => {
                    warn!(conn = id, %addr, "HBONE connection unresponsive to PING, closing");
                }
            }
            if let Some(c) = weak_conn.upgrade() {
                c.dead.store(true, Ordering::Release);
            }
            if let Some(kp) = weak_kp.upgrade() {
                kp.remove(id);
            }
        });
        *conn.driver.lock().expect("driver lock poisoned") = Some(driver.abort_handle());
        debug!(conn = id, %addr, src = %key.src, "HBONE connection established");
        Ok(conn)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(keys) = self.keys.get_mut() {
            for kp in keys.values() {
                for c in kp.conns.lock().expect("pool lock poisoned").iter() {
                    c.kill();
                }
            }
        }
    }
}

/// Closes connections that have carried no stream for the idle timeout, and forgets empty keys.
async fn reap_idle(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => {
            (i.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let timeout = inner.cfg.idle_timeout;
        let now = Instant::now();
        let mut keys = inner.keys.lock().expect("pool map lock poisoned");
        keys.retain(|_, kp| {
            let mut conns = kp.conns.lock().expect("pool lock poisoned");
            conns.retain(|c| {
                let unused = c.active.load(Ordering::Acquire) == 0;
                let idle = unused
                    && c.idle_since
                        .lock()
                        .expect("idle lock poisoned")
                        .is_some_and(|t| now.duration_since(t) >= timeout);
                let drained = unused && c.retired.load(Ordering::Acquire);
                if idle || drained || c.dead.load(Ordering::Acquire) {
                    debug!(conn = c.id, "closing idle HBONE connection");
                    c.kill();
                    false
                } else {
                    true
                }
            });
            // Keep keys someone is opening a connection for.
            !conns.is_empty() || Arc::strong_count(kp) > 1
        });
    }
}

fn clone_request(r: &Request<()>) -> Request<()> {
    let mut out = Request::new(());
    *out.method_mut() = r.method().clone();
    *out.uri_mut() = r.uri().clone();
    *out.version_mut() = r.version();
    *out.headers_mut() = r.headers().clone();
    out
}

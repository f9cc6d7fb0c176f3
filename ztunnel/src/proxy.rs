//! The data path: outbound capture, SOCKS5, inbound HBONE and inbound plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_core::certs::CertManager;
use mesh_core::hbone::{Dialer, Pool};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::Store;
use crate::xds::XdsStatus;

pub mod inbound;
pub mod inbound_plaintext;
pub mod orig_dst;
pub mod outbound;
pub mod socks5;

/// Where the proxy is in its life: listeners stop when draining starts, and connections still
/// open when the drain time is up are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Draining,
    Closed,
}

/// Everything a connection handler needs, shared by all of them.
pub struct ProxyState {
    pub cfg: Config,
    /// The xDS client's status when following istiod-lite; `None` standalone.
    pub xds: Option<XdsStatus>,
    pub store: Store,
    pub certs: CertManager,
    pub pool: Pool,
    pub metrics: Metrics,
    pub dialer: Dialer,
    /// ztunnel's own listening addresses: outbound traffic to them is a loop.
    pub own_addrs: Vec<SocketAddr>,
    pub phase: watch::Receiver<Phase>,
    /// Allowed inbound connections, evaluated again when policies change.
    pub authorized: Arc<crate::rbac::revoke::Authorized>,
    pub(crate) active: AtomicUsize,
    /// Most connections active at once since memory was last trimmed.
    pub(crate) peak: AtomicUsize,
}

impl ProxyState {
    /// Resolves once the proxy starts draining (or is already past serving).
    pub async fn draining(&self) {
        let mut phase = self.phase.clone();
        let _ = phase.wait_for(|p| *p != Phase::Serving).await;
    }

    /// Connections being proxied right now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a connection as active while alive.
pub(crate) struct ActiveGuard(Arc<ProxyState>);

impl ActiveGuard {
    pub(crate) fn new(state: &Arc<ProxyState>) -> Self {
        let now = state.active.fetch_add(1, Ordering::Relaxed) + 1;
        state.peak.fetch_max(now, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts on `listener` until draining starts, running `handle` on its own task per
/// connection; those tasks end when the phase reaches `Closed`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    component: &'static str,
    state: Arc<ProxyState>,
    handle: F,
) where
    F: Fn(Arc<ProxyState>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, component, "listener established");
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let guard = ActiveGuard::new(&state);
                    let fut = handle(state.clone(), stream, peer);
                    let mut phase = state.phase.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = fut => {}
                            _ = phase.wait_for(|p| *p == Phase::Closed) => {}
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(component, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = state.draining() => break,
        }
    }
}

/// Runs an inbound connection's copy until it ends, or until a config change (a policy, or the
/// destination's waypoint) denies the connection: then the copy is dropped (closing both
/// sides) and the record says why.
pub(crate) async fn copy_while_allowed<E: std::fmt::Display>(
    copy: impl std::future::Future<Output = Result<(), E>>,
    mut registration: crate::rbac::revoke::Registration,
    record: &mut crate::metrics::ConnectionRecord,
) {
    tokio::select! {
        copied = copy => {
            if let Err(e) = copied {
                record.fail(e);
            }
        }
        Ok(why) = &mut registration.revoked => {
            record.deny(&why.policy, &format!("closed after a config change: {}", why.reason));
        }
    }
}

/// Resets the connection (RST rather than FIN) so the client sees a refusal, not an EOF.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

//! Wires a ztunnel together: config, certificates, pool, listeners, admin; and takes it apart.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::certs::{CertManager, CertSource};
use mesh_core::devca::DevCa;
use mesh_core::hbone::{Dialer, Pool, PoolConfig};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::admin;
use crate::ca_client::CaClient;
use crate::config::{Config, ControlPlaneAddr, MeshSource};
use crate::grpc;
use crate::inpod::{InPod, PodNetworks};
use crate::local;
use crate::metrics::Metrics;
use crate::proxy::inbound::{BindFailure, InboundListeners};
use crate::proxy::{self, Phase, ProxyState, accept_loop};
use crate::state::Store;
use crate::xds::{XdsClient, XdsStatus};

/// How often listeners that failed to bind are tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Addresses the ztunnel actually listens on (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Default)]
pub struct Addrs {
    pub outbound: Option<SocketAddr>,
    pub inbound_plaintext: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
}

/// Where this ztunnel's mesh config comes from, once started.
enum Source {
    Local(std::path::PathBuf),
    Xds(ControlPlaneAddr, Channel, XdsStatus),
}

/// A running ztunnel.
pub struct Ztunnel {
    pub addrs: Addrs,
    state: Arc<ProxyState>,
    inbound: Arc<InboundListeners>,
    inpod: Option<Arc<InPod>>,
    phase: watch::Sender<Phase>,
    quit: Arc<Notify>,
    failures: Arc<Mutex<Vec<BindFailure>>>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    Ok(mesh_core::sockets::bind_optional(addr, what).await?)
}

/// Where workload certificates come from: istiod-lite's CA when a CA (or xDS) address is
/// configured, else the development CA (standalone mode).
pub fn cert_source(cfg: &Config) -> anyhow::Result<Arc<dyn CertSource>> {
    if let Some(addr) = &cfg.ca_address {
        let ca = CaClient::new(cfg, addr)
            .with_context(|| format!("setting up the CA client for {addr}"))?;
        info!(%addr, "certificates from istiod-lite's CA");
        return Ok(Arc::new(ca));
    }
    let ca_dir = cfg
        .dev_ca_dir
        .clone()
        .context("standalone mode needs a development CA directory (--dev-ca-dir)")?;
    let ca = DevCa::load_or_create(&ca_dir)
        .with_context(|| format!("loading the development CA from {}", ca_dir.display()))?;
    warn!(dir = %ca_dir.display(), "using the development CA: certificates are signed with a local key, not by the mesh CA");
    Ok(Arc::new(ca))
}

/// What to do after the mesh config changed (a reloaded file or an xDS update): follow the
/// local workloads with the inbound listeners, and stop rotating certificates no local
/// workload needs any more.
fn on_change_hook(
    authorized: Arc<crate::rbac::revoke::Authorized>,
    inbound: Arc<InboundListeners>,
    failures: Arc<Mutex<Vec<BindFailure>>>,
    certs: CertManager,
    store: Store,
    node: String,
) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        *failures.lock().expect("failure list lock poisoned") = inbound.reconcile();
        let snap = store.snapshot();
        let closed = authorized.recheck(&snap);
        if closed > 0 {
            info!(closed, "closed connections the new config denies");
        }
        // Only mesh (HBONE) workloads use certificates.
        let wanted: std::collections::HashSet<_> = snap
            .local_workloads(&node)
            .filter(|w| w.protocol == crate::state::Protocol::Hbone)
            .map(|w| w.identity.clone())
            .collect();
        certs.retain(|id| wanted.contains(id));
        // Certificates for local mesh workloads are fetched ahead of their first connection,
        // as Istio's ztunnel does, so that connection does not wait on the CA.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let held: std::collections::HashSet<String> = certs
                .status()
                .into_iter()
                .map(|c| c.identity.to_string())
                .collect();
            for w in snap.local_workloads(&node) {
                if w.protocol == crate::state::Protocol::Hbone
                    && !held.contains(&w.identity.to_string())
                {
                    let (certs, id) = (certs.clone(), w.identity.clone());
                    rt.spawn(async move {
                        if let Err(e) = certs.fetch(&id).await {
                            warn!(identity = %id, error = %e, "certificate prefetch failed; retried on first use");
                        }
                    });
                }
            }
        }
    })
}

impl Ztunnel {
    /// Loads the mesh config (standalone) or starts following istiod-lite, binds every
    /// listener and starts serving. Fails (with the reason) if the config is unusable or a
    /// listener cannot be bound. Following istiod-lite, readiness waits for the first push.
    pub async fn start(cfg: Config, ca: Arc<dyn CertSource>) -> anyhow::Result<Self> {
        let store = Store::default();
        let source = match &cfg.mesh {
            MeshSource::Local(path) => {
                local::load(path, &store).context("loading the mesh config")?;
                Source::Local(path.clone())
            }
            MeshSource::Xds(addr) => {
                let channel =
                    grpc::channel_from_config(addr, cfg.xds_root_cert.as_deref(), cfg.socket_mark)
                        .with_context(|| format!("setting up the xDS client for {addr}"))?;
                Source::Xds(addr.clone(), channel, XdsStatus::new(addr))
            }
        };
        let metrics = Metrics::new();
        let certs = CertManager::new(ca, cfg.cert_ttl);
        let pod_networks = match &cfg.inpod_socket {
            Some(_) => {
                crate::inpod::netns::remember_home()
                    .context("in-pod capture needs its own network namespace at hand")?;
                Some(Arc::new(PodNetworks::default()))
            }
            None => None,
        };
        let dialer = Dialer {
            mark: cfg.socket_mark,
            sockets: pod_networks
                .clone()
                .map(|n| n as Arc<dyn mesh_core::hbone::SocketMaker>),
        };
        let pool = Pool::new(
            PoolConfig {
                idle_timeout: cfg.pool_idle_timeout,
                connect_timeout: cfg.connect_timeout,
                tls_timeout: cfg.handshake_timeout,
                ..PoolConfig::default()
            },
            certs.clone(),
            dialer.clone(),
        );

        let outbound = bind(cfg.outbound_addr, "outbound").await?;
        let inbound_plaintext = bind(cfg.inbound_plaintext_addr, "inbound plaintext").await?;
        let socks5 = bind(cfg.socks5_addr, "SOCKS5").await?;
        let admin_l = bind(cfg.admin_addr, "admin").await?;
        let metrics_l = bind(cfg.metrics_addr, "metrics").await?;
        let readiness_l = bind(cfg.readiness_addr, "readiness").await?;
        let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let addrs = Addrs {
            outbound: local(&outbound),
            inbound_plaintext: local(&inbound_plaintext),
            socks5: local(&socks5),
            admin: local(&admin_l),
            metrics: local(&metrics_l),
            readiness: local(&readiness_l),
        };
        let own_addrs = [
            addrs.outbound,
            addrs.inbound_plaintext,
            addrs.socks5,
            addrs.admin,
            addrs.metrics,
            addrs.readiness,
        ]
        .into_iter()
        .flatten()
        .collect();

        let node = cfg.node_name.clone();
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let state = Arc::new(ProxyState {
            cfg,
            xds: match &source {
                Source::Xds(_, _, status) => Some(status.clone()),
                Source::Local(_) => None,
            },
            store: store.clone(),
            certs: certs.clone(),
            pool,
            metrics: metrics.clone(),
            dialer,
            own_addrs,
            phase: phase_rx,
            authorized: Default::default(),
            active: Default::default(),
            peak: Default::default(),
        });
        let inbound = Arc::new(InboundListeners::new(state.clone()));
        let inpod = match (&state.cfg.inpod_socket, pod_networks) {
            (Some(path), Some(nets)) => {
                let inpod = InPod::new(state.clone(), nets, tokio::runtime::Handle::current());
                inpod.follow_agent(path.clone());
                info!(agent = %path.display(), "in-pod capture: pods come from the node agent");
                Some(inpod)
            }
            _ => None,
        };
        let failures = Arc::new(Mutex::new(inbound.reconcile()));
        let quit = Arc::new(Notify::new());

        let mut tasks = Vec::new();
        if let Some(l) = outbound {
            tasks.push(tokio::spawn(accept_loop(
                l,
                "outbound",
                state.clone(),
                proxy::outbound::serve_redirected,
            )));
        }
        if let Some(l) = inbound_plaintext {
            tasks.push(tokio::spawn(accept_loop(
                l,
                "inbound_plaintext",
                state.clone(),
                proxy::inbound_plaintext::serve,
            )));
        }
        if let Some(l) = socks5 {
            tasks.push(tokio::spawn(accept_loop(
                l,
                "socks5",
                state.clone(),
                proxy::socks5::serve,
            )));
        }
        if let Some(l) = admin_l {
            let h = admin::admin_handler(
                state.clone(),
                inbound.clone(),
                inpod.clone(),
                failures.clone(),
                quit.clone(),
            );
            tasks.push(tokio::spawn(admin::serve(l, "admin", draining(&state), h)));
        }
        if let Some(l) = metrics_l {
            let h = admin::metrics_handler(state.clone());
            tasks.push(tokio::spawn(admin::serve(
                l,
                "metrics",
                draining(&state),
                h,
            )));
        }
        if let Some(l) = readiness_l {
            tasks.push(tokio::spawn(admin::serve(
                l,
                "readiness",
                draining(&state),
                admin::readiness_handler(state.clone(), inpod.clone()),
            )));
        }
        let on_change = on_change_hook(
            state.authorized.clone(),
            inbound.clone(),
            failures.clone(),
            certs.clone(),
            store.clone(),
            node,
        );
        match source {
            Source::Local(path) => {
                tasks.push(tokio::spawn(local::watch(
                    path,
                    store,
                    state.cfg.config_poll,
                    metrics.config_reload_errors.clone(),
                    move || on_change(),
                )));
            }
            Source::Xds(addr, channel, status) => {
                let client = XdsClient::new(
                    &state.cfg,
                    &addr,
                    channel,
                    store,
                    metrics.clone(),
                    status,
                    on_change,
                );
                info!(%addr, "following istiod-lite");
                tasks.push(tokio::spawn(client.run()));
            }
        }
        tasks.push(tokio::spawn(crate::memory::trim_after_bursts(
            state.clone(),
        )));
        {
            // A workload address may appear on the node after its config does: retry binds.
            let inbound = inbound.clone();
            let failures = failures.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(BIND_RETRY).await;
                    let pending = !failures
                        .lock()
                        .expect("failure list lock poisoned")
                        .is_empty();
                    if pending {
                        let now = inbound.reconcile();
                        *failures.lock().expect("failure list lock poisoned") = now;
                    }
                }
            }));
        }
        match &state.xds {
            None => info!(node = %state.cfg.node_name, "ztunnel ready"),
            Some(_) => {
                info!(node = %state.cfg.node_name, "ztunnel started; ready once istiod-lite's first push is applied")
            }
        }
        Ok(Self {
            addrs,
            state,
            inbound,
            inpod,
            phase,
            quit,
            failures,
            tasks,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// The xDS client's status, when following istiod-lite.
    pub fn xds_status(&self) -> Option<&XdsStatus> {
        self.state.xds.as_ref()
    }

    /// Addresses of the per-workload inbound HBONE listeners.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound.addrs()
    }

    /// Inbound listeners that should exist but could not be opened (retried every few seconds).
    pub fn bind_failures(&self) -> Vec<BindFailure> {
        self.failures
            .lock()
            .expect("failure list lock poisoned")
            .clone()
    }

    /// Resolves when `/quitquitquit` is called.
    pub async fn quit_requested(&self) {
        self.quit.notified().await
    }

    /// Stops accepting, then gives in-flight connections up to the drain timeout to finish.
    pub async fn shutdown(self) {
        let _ = self.phase.send(Phase::Draining);
        if let Some(inpod) = &self.inpod {
            inpod.stop();
        }
        let deadline = Instant::now() + self.state.cfg.drain_timeout;
        while self.state.active_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.state.active_connections();
        if left > 0 {
            warn!(
                connections = left,
                "drain timeout reached; closing remaining connections"
            );
        }
        let _ = self.phase.send(Phase::Closed);
        for t in &self.tasks {
            t.abort();
        }
        drop(self.inbound);
        info!("ztunnel stopped");
    }
}

/// Resolves when `state` starts draining.
fn draining(state: &Arc<ProxyState>) -> impl std::future::Future<Output = ()> + use<> {
    let state = state.clone();
    async move { state.draining().await }
}

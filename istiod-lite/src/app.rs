//! Wires istiod-lite together: source → store → translation → xDS, the CA, the listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use mesh_core::devca::DevCa;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::auth::{Authenticator, NodeTokens};
use crate::ca::CaService;
use crate::config::{Config, SourceConfig};
use crate::debug::Debug;
use crate::metrics::Metrics;
use crate::server::{self, Services, ServingCert};
use crate::source::Source;
use crate::source::dir::DirSource;
use crate::store::Store;
use crate::xds::{self, AdsService, Registry, Snapshot};

/// Directory of the self-managed CA inside the state directory.
const CA_SUBDIR: &str = "ca";

/// Addresses actually listened on (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Default)]
pub struct Addrs {
    pub xds_plaintext: Option<SocketAddr>,
    pub xds_tls: Option<SocketAddr>,
    pub debug: Option<SocketAddr>,
}

/// A running istiod-lite.
pub struct Istiod {
    pub addrs: Addrs,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub ca: Arc<DevCa>,
    pub node_tokens: NodeTokens,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    Ok(mesh_core::sockets::bind_optional(addr, what).await?)
}

/// Loads the CA: the operator's if configured, else the self-managed root in the state
/// directory (created on first start, reused after a restart so the trust root survives).
pub fn load_ca(cfg: &Config) -> anyhow::Result<DevCa> {
    match &cfg.plugged_ca_dir {
        Some(dir) => DevCa::load_plugged(dir)
            .with_context(|| format!("loading the CA from {}", dir.display())),
        None => {
            let dir = cfg.state_dir.join(CA_SUBDIR);
            DevCa::load_or_create(&dir)
                .with_context(|| format!("loading the CA root from {}", dir.display()))
        }
    }
}

impl Istiod {
    /// Loads the initial config and the CA, binds every listener and starts serving. Fails
    /// (with the reason) if a listener cannot be bound or the CA cannot be loaded; a broken
    /// config object is reported and skipped, never fatal.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::default());
        let ca = Arc::new(load_ca(&cfg)?);
        let node_tokens = NodeTokens::new(&cfg.state_dir);

        let mut kube_client = None;
        let mut initial_sync = None;
        let (source, authenticator): (Box<dyn Source>, Arc<dyn Authenticator>) = match &cfg.source {
            SourceConfig::Directory(dir) => {
                let src = DirSource::new(dir).with_poll(cfg.dir_poll);
                // Read once now so the first snapshot is the whole directory, not a prefix.
                src.load(&store)?;
                (Box::new(src), Arc::new(node_tokens.clone()))
            }
            SourceConfig::Kubernetes(k) => {
                let client = crate::kubernetes::client(k).context("connecting to Kubernetes")?;
                kube_client = Some(client.clone());
                let (source, synced) = crate::kubernetes::source(&client);
                initial_sync = Some(synced);
                (
                    source,
                    Arc::new(crate::kubernetes::TokenReviewer::new(client))
                        as Arc<dyn Authenticator>,
                )
            }
        };

        let plaintext = bind(cfg.xds_plaintext_addr, "xDS plaintext").await?;
        let tls = bind(cfg.xds_tls_addr, "xDS TLS").await?;
        let debug_l = bind(cfg.debug_addr, "debug").await?;
        let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let addrs = Addrs {
            xds_plaintext: local(&plaintext),
            xds_tls: local(&tls),
            debug: local(&debug_l),
        };

        let mut tasks = Vec::new();
        {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let what = source.describe();
                if let Err(e) = source.run(store).await {
                    error!(source = %what, error = %e, "config source stopped; serving the last config");
                }
            }));
        }
        if let Some(synced) = initial_sync {
            // Serving a partly listed cluster would tell proxies that workloads are gone.
            let wait = synced.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
                        tracing::warn!(pending = ?synced.pending(), "waiting for the first list of every kind from the API server");
                    }
                }
            }
            info!("initial list from the API server complete");
        }
        // The first snapshot is built before anything is served, so the first proxy to
        // connect gets the whole config rather than an empty one.
        let mut builder = xds::SnapshotBuilder::new(cfg.mesh.clone());
        let first = builder.build(&store.state(), &Snapshot::default());
        let (publish, snapshots) = watch::channel(Arc::new(first));
        tasks.push(tokio::spawn(xds::run_builder(
            store.clone(),
            cfg.mesh.clone(),
            builder,
            publish,
            metrics.clone(),
            cfg.debounce,
            cfg.max_push_delay,
        )));

        if let Some(client) = kube_client {
            tasks.push(tokio::spawn(crate::kubernetes::write_status(
                client,
                snapshots.clone(),
            )));
        }
        let ads = AdsService::new(
            snapshots.clone(),
            registry.clone(),
            metrics.clone(),
            Some(authenticator.clone()),
        )
        .with_max_response_bytes(cfg.max_response_bytes);
        let ca_svc = CaService::new(
            ca.clone(),
            store.clone(),
            authenticator,
            metrics.clone(),
            cfg.mesh.trust_domain.clone(),
        );
        let services = Services::new(ads, Some(ca_svc));
        if let Some(l) = plaintext {
            info!(addr = ?addrs.xds_plaintext, "xDS and CA listening (plaintext)");
            tasks.push(tokio::spawn(server::serve(
                l,
                None,
                services.clone(),
                cfg.auth_deadline,
            )));
        }
        if let Some(l) = tls {
            let serving = ServingCert::issue(&ca).context("issuing the serving certificate")?;
            let tls_cfg = serving.server_config()?;
            tasks.push(tokio::spawn(serving.rotate(ca.clone())));
            info!(addr = ?addrs.xds_tls, "xDS and CA listening (TLS)");
            tasks.push(tokio::spawn(server::serve(
                l,
                Some(tls_cfg),
                services,
                cfg.auth_deadline,
            )));
        }
        if let Some(l) = debug_l {
            info!(addr = ?addrs.debug, "debug endpoints listening");
            tasks.push(tokio::spawn(crate::debug::serve(
                l,
                Debug {
                    store: store.clone(),
                    snapshots: snapshots.clone(),
                    registry: registry.clone(),
                    metrics: metrics.clone(),
                },
            )));
        }
        Ok(Self {
            addrs,
            store,
            registry,
            metrics,
            ca,
            node_tokens,
            snapshots,
            tasks,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// Stops everything: listeners, streams, the source.
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

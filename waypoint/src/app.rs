//! Starting and stopping the waypoint: its certificate, the xDS stream, the HBONE listener
//! and the admin, metrics and readiness endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use http::{Method, StatusCode};
use mesh_core::certs::CertManager;
use mesh_core::hbone::{Dialer, Pool, PoolConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use ztunnel::admin::{self, respond};
use ztunnel::ca_client::CaClient;
use ztunnel::grpc::{self, Token};
use ztunnel::xds::{ClientParts, XdsClient, XdsStatus, proxy_node};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::resources::{Config as MeshConfig, ConfigStore, Me, TYPE_URLS, WaypointResources};
use crate::upstream::{Balancer, Upstreams};

/// How long streams in flight get to finish at shutdown.
const DRAIN_TIME: Duration = Duration::from_secs(5);

pub struct Waypoint {
    proxy: Arc<Proxy>,
    xds: XdsStatus,
    draining: watch::Sender<bool>,
    quit: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind(
    addr: Option<std::net::SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .with_context(|| format!("binding the {what} listener on {a}")),
    }
}

impl Waypoint {
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let cfg = Arc::new(cfg);
        let metrics = Metrics::new();
        let ca = CaClient::with_parts(
            &cfg.xds,
            cfg.xds_root_cert.as_deref(),
            cfg.token_file.clone(),
            &cfg.cluster_id,
            cfg.socket_mark,
        )
        .with_context(|| format!("setting up the CA client for {}", cfg.xds))?;
        let certs = CertManager::new(Arc::new(ca), cfg.cert_ttl);
        let dialer = Dialer {
            mark: cfg.socket_mark,
            sockets: None,
        };
        let pool = Pool::new(PoolConfig::default(), certs.clone(), dialer.clone());
        let store = ConfigStore::default();
        let proxy = Arc::new(Proxy {
            flags: Arc::clone(&cfg),
            store: store.clone(),
            upstreams: Arc::new(Upstreams::new(cfg.identity.clone(), pool, dialer)),
            balancer: Balancer::new(cfg.outlier),
            metrics: metrics.clone(),
            certs: certs.clone(),
        });

        let hbone = TcpListener::bind(cfg.hbone_addr)
            .await
            .with_context(|| format!("binding the HBONE listener on {}", cfg.hbone_addr))?;
        let admin_l = bind(cfg.admin_addr, "admin").await?;
        let metrics_l = bind(cfg.metrics_addr, "metrics").await?;
        let readiness_l = bind(cfg.readiness_addr, "readiness").await?;
        info!(addr = %cfg.hbone_addr, identity = %cfg.identity, "HBONE listener established");

        let (draining, drain_rx) = watch::channel(false);
        let drained = move || {
            let mut rx = drain_rx.clone();
            async move {
                let _ = rx.wait_for(|d| *d).await;
            }
        };
        let quit = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();

        // Follow istiod-lite.
        let channel =
            grpc::channel_from_config(&cfg.xds, cfg.xds_root_cert.as_deref(), cfg.socket_mark)
                .with_context(|| format!("setting up the xDS client for {}", cfg.xds))?;
        let xds = XdsStatus::for_types(&cfg.xds, &TYPE_URLS);
        let me = Me {
            namespace: cfg.namespace.clone(),
            name: cfg.name.clone(),
        };
        let parts = ClientParts {
            addr: cfg.xds.clone(),
            channel,
            token: Token::new(cfg.token_file.clone()),
            cluster_id: cfg.cluster_id.clone(),
            node: proxy_node("router", &cfg.name, &cfg.namespace, &cfg.node),
            status: xds.clone(),
            report: Arc::new(metrics.clone()),
        };
        let upstreams = Arc::clone(&proxy.upstreams);
        let client = XdsClient::with_resources(parts, WaypointResources::default(), move |r| {
            let next = MeshConfig::build(r, &me);
            let mesh = Arc::clone(&next.mesh);
            store.replace(next);
            // Connections to endpoints that left the mesh are not kept.
            upstreams.retain(|ip| mesh.workload_by_ip(ip).is_some());
        });
        info!(addr = %cfg.xds, "following istiod-lite");
        tasks.push(tokio::spawn(client.run()));

        // Our certificate, ahead of the first connection; readiness waits for it.
        let have_cert = Arc::new(AtomicBool::new(false));
        {
            let certs = certs.clone();
            let id = cfg.identity.clone();
            let have_cert = Arc::clone(&have_cert);
            tasks.push(tokio::spawn(async move {
                let mut delay = Duration::from_millis(200);
                loop {
                    match certs.fetch(&id).await {
                        Ok(_) => {
                            have_cert.store(true, Ordering::Relaxed);
                            info!(identity = %id, "certificate obtained");
                            return;
                        }
                        Err(e) => {
                            warn!(identity = %id, error = %e, retry_in_ms = delay.as_millis() as u64, "no certificate yet");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }));
        }

        {
            let proxy = Arc::clone(&proxy);
            let drained = drained.clone();
            tasks.push(tokio::spawn(async move {
                let stop = drained();
                tokio::pin!(stop);
                loop {
                    let tcp = tokio::select! {
                        r = hbone.accept() => match r {
                            Ok((s, _)) => s,
                            Err(e) => {
                                warn!(error = %e, "HBONE accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                        _ = &mut stop => return,
                    };
                    tokio::spawn(Arc::clone(&proxy).serve_connection(tcp, drained()));
                }
            }));
        }
        {
            let balancer = Arc::clone(&proxy.balancer);
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    balancer.forget_unused();
                }
            }));
        }

        let ready = {
            let xds = xds.clone();
            let have_cert = Arc::clone(&have_cert);
            move || -> Result<(), String> {
                let mut missing = Vec::new();
                if !xds.is_ready() {
                    missing.push(format!(
                        "config from istiod-lite ({})",
                        xds.waiting_for().join(", ")
                    ));
                }
                if !have_cert.load(Ordering::Relaxed) {
                    missing.push("its certificate".to_owned());
                }
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("waiting for {}\n", missing.join(" and ")))
                }
            }
        };
        if let Some(l) = readiness_l {
            let ready = ready.clone();
            let h = move |_: &Method, path: &str| match path {
                "/healthz/ready" => match ready() {
                    Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
                    Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
                },
                other => respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no endpoint {other}\n"),
                ),
            };
            tasks.push(tokio::spawn(admin::serve(l, "readiness", drained(), h)));
        }
        if let Some(l) = metrics_l {
            let metrics = metrics.clone();
            let h = move |_: &Method, path: &str| match path {
                "/metrics" | "/stats/prometheus" => respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.encode(),
                ),
                other => respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no endpoint {other}\n"),
                ),
            };
            tasks.push(tokio::spawn(admin::serve(l, "metrics", drained(), h)));
        }
        if let Some(l) = admin_l {
            let proxy = Arc::clone(&proxy);
            let xds = xds.clone();
            let quit = Arc::clone(&quit);
            let cfg = Arc::clone(&cfg);
            let h = move |method: &Method, path: &str| match path {
                "/config_dump" => {
                    let body = json!({
                        "waypoint": {
                            "name": cfg.name,
                            "namespace": cfg.namespace,
                            "identity": cfg.identity.to_string(),
                            "ready": ready().is_ok(),
                        },
                        "xds": xds.dump(),
                        "config": proxy.store.get().dump(),
                        "endpoints": proxy.balancer.dump(),
                    });
                    respond(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_string_pretty(&body).unwrap_or_default(),
                    )
                }
                "/metrics" | "/stats/prometheus" => respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    proxy.metrics.encode(),
                ),
                "/quitquitquit" if method == Method::POST => {
                    quit.notify_one();
                    respond(StatusCode::OK, "text/plain", "OK\n")
                }
                other => respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no endpoint {other}\n"),
                ),
            };
            tasks.push(tokio::spawn(admin::serve(l, "admin", drained(), h)));
        }
        Ok(Self {
            proxy,
            xds,
            draining,
            quit,
            tasks,
        })
    }

    pub fn xds_status(&self) -> &XdsStatus {
        &self.xds
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Resolves when `POST /quitquitquit` is received.
    pub async fn quit_requested(&self) {
        self.quit.notified().await;
    }

    /// Stops accepting, tells clients to go elsewhere (GOAWAY), and gives streams in flight a
    /// little time to finish.
    pub async fn shutdown(self) {
        let _ = self.draining.send(true);
        tokio::time::sleep(DRAIN_TIME.min(Duration::from_millis(500))).await;
        for t in &self.tasks {
            t.abort();
        }
    }
}

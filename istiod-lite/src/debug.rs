//! The debug and monitoring endpoints (15014): what istiod-lite computed, who is connected and
//! what each proxy acknowledged, what was rejected, and metrics. JSON, for people and for the
//! `ambient` CLI.
//!
//! - `/debug/connections` connected proxies, per type: sent and acknowledged versions, NACKs
//! - `/debug/config`      the computed workloads, services and policies, decoded
//! - `/debug/status`      Gateway, route and policy status conditions
//! - `/debug/errors`      config objects rejected (file, object, field) and warnings
//! - `/metrics`           Prometheus
//! - `/ready`             200 once the first config is translated

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_proto::security::{self as sec, string_match::MatchType};
use mesh_proto::workload::{self, address, gateway_address};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::metrics::Metrics;
use crate::store::Store;
use crate::xds::{Registry, Snapshot};

const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Debug {
    pub store: Store,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

impl Debug {
    fn handle(&self, path: &str) -> Response<Full<Bytes>> {
        let snap = self.snapshots.borrow().clone();
        let body = match path {
            "/ready" | "/healthz/ready" => {
                return if snap.version > 0 {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "config not translated yet\n",
                    )
                };
            }
            "/metrics" | "/stats/prometheus" => {
                return respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                );
            }
            "/debug/connections" => json!({
                "version": snap.version,
                "proxies": self.registry.list(),
            }),
            "/debug/config" => config_json(&snap),
            "/debug/status" => json!({"version": snap.version, "status": snap.statuses}),
            "/debug/errors" => json!({
                "errors": self.store.errors(),
                "warnings": snap.warnings,
            }),
            _ => {
                return respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "not found; try /debug/connections, /debug/config, /debug/status, /debug/errors, /metrics, /ready\n",
                );
            }
        };
        let mut text = serde_json::to_string_pretty(&body).expect("JSON values serialize");
        text.push('\n');
        respond(StatusCode::OK, "application/json", text)
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// Serves the debug endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, debug: Debug) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("too many debug connections; dropping one");
            continue;
        };
        let d = debug.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = d.handle(req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(MAX_CONNECTION_AGE, conn).await;
            drop(slot);
        });
    }
}

/// The snapshot's resources as readable JSON.
pub fn config_json(snap: &Snapshot) -> Value {
    use mesh_proto::waypoint as wp;
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    use prost::Message;
    let empty = Default::default();
    for (name, r) in snap.of_type(mesh_proto::ADDRESS_TYPE_URL).unwrap_or(&empty) {
        let Ok(a) = workload::Address::decode(r.body.as_slice()) else {
            continue;
        };
        match &a.r#type {
            Some(address::Type::Workload(w)) => workloads.push(workload_json(w)),
            Some(address::Type::Service(s)) => services.push(service_json(name, s)),
            None => {}
        }
    }
    let policies: Vec<Value> = snap
        .of_type(mesh_proto::AUTHORIZATION_TYPE_URL)
        .unwrap_or(&empty)
        .values()
        .filter_map(|r| sec::Authorization::decode(r.body.as_slice()).ok())
        .map(|p| policy_json(&p))
        .collect();
    let routes: Vec<Value> = snap
        .of_type(mesh_proto::ROUTE_TYPE_URL)
        .unwrap_or(&empty)
        .iter()
        .filter_map(|(name, r)| Some((name, wp::Route::decode(r.body.as_slice()).ok()?)))
        .map(|(name, r)| {
            let parents: Vec<String> = r
                .parents
                .iter()
                .map(|p| match p.port {
                    0 => p.hostname.clone(),
                    port => format!("{}:{port}", p.hostname),
                })
                .collect();
            json!({"name": name, "parents": parents, "rules": r.rules.len()})
        })
        .collect();
    let waypoint_policies: Vec<Value> = snap
        .of_type(mesh_proto::WAYPOINT_POLICY_TYPE_URL)
        .unwrap_or(&empty)
        .iter()
        .filter_map(|(name, r)| Some((name, wp::Policy::decode(r.body.as_slice()).ok()?)))
        .map(|(name, p)| {
            let action = if p.action == wp::PolicyAction::Deny as i32 {
                "DENY"
            } else {
                "ALLOW"
            };
            json!({"name": name, "action": action, "targets": p.targets,
                "rules": p.rules.len(), "dryRun": p.dry_run})
        })
        .collect();
    json!({
        "version": snap.version,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "routes": routes,
        "waypointPolicies": waypoint_policies,
    })
}

fn ip(bytes: &[u8]) -> Value {
    match bytes.len() {
        4 => Value::from(
            IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked")).to_string(),
        ),
        16 => Value::from(
            IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked")).to_string(),
        ),
        _ => Value::from(format!("invalid({} bytes)", bytes.len())),
    }
}

fn waypoint_json(w: &Option<workload::GatewayAddress>) -> Value {
    match w
        .as_ref()
        .and_then(|w| w.destination.as_ref().map(|d| (d, w.hbone_mtls_port)))
    {
        Some((gateway_address::Destination::Hostname(h), port)) => {
            json!({"hostname": h.hostname, "namespace": h.namespace, "port": port})
        }
        Some((gateway_address::Destination::Address(a), port)) => {
            json!({"address": ip(&a.address), "port": port})
        }
        None => Value::Null,
    }
}

fn workload_json(w: &workload::Workload) -> Value {
    let protocol = match workload::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(workload::TunnelProtocol::Hbone) => "HBONE",
        _ => "TCP",
    };
    let services: serde_json::Map<String, Value> = w
        .services
        .iter()
        .map(|(k, pl)| {
            let ports: Vec<Value> = pl
                .ports
                .iter()
                .map(|p| json!({"port": p.service_port, "targetPort": p.target_port}))
                .collect();
            (k.clone(), Value::from(ports))
        })
        .collect();
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "addresses": w.addresses.iter().map(|a| ip(a)).collect::<Vec<_>>(),
        "node": w.node,
        "protocol": protocol,
        "identity": format!("spiffe://{}/ns/{}/sa/{}", w.trust_domain, w.namespace, w.service_account),
        "serviceAccount": w.service_account,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "workloadName": w.workload_name,
        "status": if w.status == workload::WorkloadStatus::Healthy as i32 { "Healthy" } else { "Unhealthy" },
        "waypoint": waypoint_json(&w.waypoint),
        "services": services,
        "authorizationPolicies": w.authorization_policies,
    })
}

fn service_json(name: &str, s: &workload::Service) -> Value {
    json!({
        "name": name,
        "hostname": s.hostname,
        "addresses": s.addresses.iter().map(|a| ip(&a.address)).collect::<Vec<_>>(),
        "ports": s.ports.iter().map(|p| json!({"port": p.service_port, "targetPort": p.target_port})).collect::<Vec<_>>(),
        "waypoint": waypoint_json(&s.waypoint),
    })
}

fn policy_json(p: &sec::Authorization) -> Value {
    let strings = |v: &[sec::StringMatch]| -> Vec<String> {
        v.iter()
            .map(|m| match &m.match_type {
                Some(MatchType::Exact(s)) => s.clone(),
                Some(MatchType::Prefix(s)) => format!("{s}*"),
                Some(MatchType::Suffix(s)) => format!("*{s}"),
                Some(MatchType::Presence(())) => "*".into(),
                None => String::new(),
            })
            .collect()
    };
    let cidrs = |v: &[sec::Address]| -> Vec<String> {
        v.iter()
            .map(|a| format!("{}/{}", ip(&a.address).as_str().unwrap_or("?"), a.length))
            .collect()
    };
    let sas = |v: &[sec::ServiceAccountMatch]| -> Vec<String> {
        v.iter()
            .map(|s| format!("{}/{}", s.namespace, s.service_account))
            .collect()
    };
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            Value::from(
                r.clauses
                    .iter()
                    .map(|c| {
                        Value::from(
                            c.matches
                                .iter()
                                .map(|m| {
                                    let mut o = serde_json::Map::new();
                                    let mut put = |k: &str, v: Vec<String>| {
                                        if !v.is_empty() {
                                            o.insert(k.into(), v.into());
                                        }
                                    };
                                    put("namespaces", strings(&m.namespaces));
                                    put("notNamespaces", strings(&m.not_namespaces));
                                    put("principals", strings(&m.principals));
                                    put("notPrincipals", strings(&m.not_principals));
                                    put("sourceIps", cidrs(&m.source_ips));
                                    put("notSourceIps", cidrs(&m.not_source_ips));
                                    put("destinationIps", cidrs(&m.destination_ips));
                                    put("notDestinationIps", cidrs(&m.not_destination_ips));
                                    put("serviceAccounts", sas(&m.service_accounts));
                                    put("notServiceAccounts", sas(&m.not_service_accounts));
                                    let ports =
                                        |v: &[u32]| v.iter().map(|p| p.to_string()).collect();
                                    put("destinationPorts", ports(&m.destination_ports));
                                    put("notDestinationPorts", ports(&m.not_destination_ports));
                                    Value::Object(o)
                                })
                                .collect::<Vec<_>>(),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let scope = match sec::Scope::try_from(p.scope) {
        Ok(sec::Scope::Global) => "Global",
        Ok(sec::Scope::Namespace) => "Namespace",
        _ => "WorkloadSelector",
    };
    let action = if p.action == sec::Action::Deny as i32 {
        "Deny"
    } else {
        "Allow"
    };
    json!({
        "name": format!("{}/{}", p.namespace, p.name),
        "scope": scope,
        "action": action,
        "rules": rules,
    })
}

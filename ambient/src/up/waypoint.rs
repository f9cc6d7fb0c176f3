//! Waypoints in their pods: started with their node's credentials, waited for, and probed for
//! readiness, which istiod-lite learns through the pod's `Ready` condition.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{CONTROL_PLANE_IP, Spec, Supervisor, WAYPOINT_ADMIN, ZTUNNEL_ADMIN, binary, step};
use crate::netns;
use crate::testbed::{self, Plan};
use crate::waypoints::{self, WaypointPlan};

/// How long `up` waits for a waypoint to be ready before going on without it.
pub(super) const READY_LIMIT: Duration = Duration::from_secs(30);

/// How long `up` waits, at least, for every ztunnel to learn that the ready waypoints are.
const ZTUNNELS_LIMIT: Duration = Duration::from_secs(10);

/// Asks each waypoint's `/healthz/ready` about once a second on a thread of its own, as a
/// kubelet's readiness probe would; the supervisor reads the answers.
pub(super) struct ReadinessProbe {
    results: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
    stop: Arc<AtomicBool>,
}

impl Supervisor {
    /// The waypoint of `w` in its pod, with the credentials of its node's ztunnel: they let
    /// it obtain the certificate of an identity of a pod on that node, its own.
    pub(super) fn start_waypoint(&mut self, w: &WaypointPlan) -> anyhow::Result<()> {
        let pod = self
            .plan
            .waypoint_pod(w)
            .with_context(|| format!("waypoint {} has no pod", w.key()))?
            .clone();
        let istiod_state = self.state_dir.join("istiod");
        let token = self.state_dir.join(format!("{}.token", pod.node));
        let spec = Spec {
            netns: pod.netns.clone(),
            program: binary("waypoint")?,
            args: vec![
                "--name".into(),
                w.name.clone(),
                "--namespace".into(),
                w.namespace.clone(),
                "--node".into(),
                pod.node.clone(),
                "--service-account".into(),
                w.name.clone(),
                "--xds-address".into(),
                format!("https://{CONTROL_PLANE_IP}:15012"),
                "--xds-root-cert".into(),
                istiod_state.join("ca/root-cert.pem").display().to_string(),
                "--token-file".into(),
                token.display().to_string(),
                "--hbone".into(),
                format!("0.0.0.0:{}", waypoints::MESH_PORT),
                "--admin".into(),
                WAYPOINT_ADMIN.into(),
                "--readiness".into(),
                format!("0.0.0.0:{}", waypoints::STATUS_PORT),
                "--metrics".into(),
                format!("0.0.0.0:{}", waypoints::METRICS_PORT),
            ],
            env: vec![],
            log: self.state_dir.join("logs").join(w.log_name()),
        };
        self.spawn(&w.role(), spec)
    }

    /// Waits until every waypoint answers ready, up to `limit`, restarting one that exits;
    /// then tells istiod-lite which are. One that is not ready by then is named with its log,
    /// and the mesh comes up without it: the services that use it fail until it is ready.
    pub(super) fn wait_waypoints(&mut self, limit: Duration) {
        if self.plan.waypoints.is_empty() {
            return;
        }
        let deadline = Instant::now() + limit;
        let mut waiting: BTreeMap<String, String> = self
            .plan
            .waypoints
            .iter()
            .map(|w| (w.key(), "not asked yet".to_owned()))
            .collect();
        loop {
            for w in &self.plan.waypoints {
                if !waiting.contains_key(&w.key()) {
                    continue;
                }
                let Some(pod) = self.plan.waypoint_pod(w) else {
                    continue;
                };
                match probe_ready(&pod.netns, &waypoint_ready_addr(pod)) {
                    Ok(()) => {
                        waiting.remove(&w.key());
                        self.waypoint_ready.insert(w.key(), true);
                        step(format!("waypoint {} ready ({})", w.key(), pod.ip));
                    }
                    Err(e) => {
                        waiting.insert(w.key(), e);
                    }
                }
            }
            if waiting.is_empty() || Instant::now() > deadline {
                break;
            }
            self.restart_exited();
            std::thread::sleep(Duration::from_millis(200));
        }
        for (key, last) in &waiting {
            let Some(w) = self.plan.waypoints.iter().find(|w| &w.key() == key) else {
                continue;
            };
            let exited = self
                .children
                .get(&w.role())
                .and_then(|s| s.exited)
                .map(|(_, status)| format!("; it exited ({status})"))
                .unwrap_or_default();
            step(format!(
                "waypoint {key} not ready after {}s ({last}{exited}); services that use it fail until it is; see {}",
                limit.as_secs(),
                self.state_dir.join("logs").join(w.log_name()).display()
            ));
        }
        self.sync_mirror();
        self.wait_ztunnels_see_waypoints(deadline.max(Instant::now() + ZTUNNELS_LIMIT));
    }

    /// Waits until every ztunnel holds each ready waypoint's pod as healthy: until then it
    /// refuses the traffic that must pass that waypoint, so the mesh is not up yet.
    fn wait_ztunnels_see_waypoints(&self, deadline: Instant) {
        let uids: Vec<(String, String)> = self
            .plan
            .waypoints
            .iter()
            .filter(|w| self.waypoint_ready.get(&w.key()) == Some(&true))
            .filter_map(|w| Some((w.key(), self.plan.waypoint_pod(w)?.uid.clone())))
            .collect();
        for node in &self.plan.nodes {
            loop {
                let dump = match netns::http_get(&node.netns, ZTUNNEL_ADMIN, "/config_dump") {
                    Ok((200, body)) => serde_json::from_str(&body).map_err(|e| e.to_string()),
                    Ok((code, _)) => Err(format!("config_dump answered HTTP {code}")),
                    Err(e) => Err(format!("config_dump: {}", e.root_cause())),
                };
                let missing: Vec<&str> = uids
                    .iter()
                    .filter(|(_, uid)| !dump.as_ref().is_ok_and(|d| healthy_in(d, uid)))
                    .map(|(key, _)| key.as_str())
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    let detail = dump.err().map(|e| format!(" ({e})")).unwrap_or_default();
                    step(format!(
                        "the ztunnel on {} does not see waypoint {} as ready yet{detail}; traffic that uses it is refused until it does",
                        node.name,
                        missing.join(", ")
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Tells istiod-lite (through the pod's `Ready` condition in the copy it reads) when a
    /// waypoint becomes ready or stops being ready.
    pub(super) fn follow_waypoint_readiness(&mut self) {
        let Some(probe) = &self.probe else {
            return;
        };
        let mut changed = false;
        for (key, result) in probe.results() {
            let ready = result.is_ok();
            if self.waypoint_ready.get(&key) != Some(&ready) {
                match &result {
                    Ok(()) => step(format!("waypoint {key} is ready")),
                    Err(e) => step(format!("waypoint {key} is not ready: {e}")),
                }
                self.waypoint_ready.insert(key, ready);
                changed = true;
            }
        }
        if changed {
            self.sync_mirror();
        }
    }
}

impl ReadinessProbe {
    pub(super) fn start(plan: &Plan) -> Self {
        let targets: Vec<(String, String, String)> = plan
            .waypoints
            .iter()
            .filter_map(|w| {
                let pod = plan.waypoint_pod(w)?;
                Some((w.key(), pod.netns.clone(), waypoint_ready_addr(pod)))
            })
            .collect();
        let results = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        if !targets.is_empty() {
            let (results, stop) = (results.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (key, netns, addr) in &targets {
                        let r = probe_ready(netns, addr);
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key.clone(), r);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        Self { results, stop }
    }

    pub(super) fn results(&self) -> BTreeMap<String, Result<(), String>> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for ReadinessProbe {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a ztunnel's `/config_dump` lists the workload `uid` as healthy.
fn healthy_in(dump: &serde_json::Value, uid: &str) -> bool {
    dump["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["uid"] == uid && w["healthy"] == true))
}

/// Where a waypoint answers `/healthz/ready`: its pod's address, port 15021.
pub fn waypoint_ready_addr(pod: &testbed::PodPlan) -> String {
    std::net::SocketAddr::new(pod.ip, waypoints::STATUS_PORT).to_string()
}

/// `GET /healthz/ready` at `addr` inside `netns`: `Ok` on 200, else what came back.
pub fn probe_ready(netns: &str, addr: &str) -> Result<(), String> {
    match netns::http_get(netns, addr, "/healthz/ready") {
        Ok((200, _)) => Ok(()),
        Ok((code, body)) => Err(format!("HTTP {code}: {}", body.trim())),
        Err(e) => Err(format!("not answering ({})", e.root_cause())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::healthy_in;

    #[test]
    fn a_waypoint_counts_only_once_listed_healthy() {
        let uid = "Kubernetes//Pod/shop/waypoint-1";
        let dump = |healthy: bool| json!({"workloads": [{"uid": uid, "healthy": healthy}]});
        assert!(healthy_in(&dump(true), uid));
        assert!(!healthy_in(&dump(false), uid));
        assert!(!healthy_in(&dump(true), "Kubernetes//Pod/shop/other"));
        assert!(!healthy_in(&json!({}), uid));
    }
}
